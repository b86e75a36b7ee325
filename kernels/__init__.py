"""Triton kernels of fastalign (import as ``fastalign.kernels``).

Raw tensors in, raw tensors out: no autograd, no validation, no policy. One module per kernel family.
"""
