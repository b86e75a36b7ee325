"""Fused ops: autograd functions, backend dispatch, input validation and the chunked PyTorch backend."""
