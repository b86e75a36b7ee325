"""fastalign: fused kernels for LLM alignment losses, computed from hidden states without materializing logits."""
from .functional import fused_linear_logprobs
from .modules import FusedLinearLogProbs

__all__ = ["fused_linear_logprobs", "FusedLinearLogProbs"]
__version__ = "0.1.0"
