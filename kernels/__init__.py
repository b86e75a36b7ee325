"""Triton kernels of fastalign (import as ``fastalign.kernels``).

Raw tensors in, raw tensors out: no autograd, no validation, no policy. One module per kernel family.
"""
if __name__ == "kernels":
    # Imported as the top-level ``kernels``: the repository root is on sys.path (``python -m pytest`` or a script run
    # from a checkout). That name belongs to Hugging Face's ``kernels`` package, which transformers >= 5.25 requires
    # and imports: load it in this module's place (or fail as if this folder were not there).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (fastalign's Triton kernels are 'fastalign.kernels')",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
