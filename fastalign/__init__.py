"""fastalign: fused kernels for LLM alignment losses, computed from hidden states without materializing logits."""
from .functional import (fused_linear_cpo_loss, fused_linear_cross_entropy, fused_linear_distill_loss,
                         fused_linear_dpo_loss, fused_linear_grpo_loss, fused_linear_kto_loss, fused_linear_logprobs,
                         fused_linear_orpo_loss, fused_linear_ppo_loss, fused_linear_rloo_loss)
from .modules import FusedLinearLogProbs
from .ops.cross_entropy import CrossEntropyOutput
from .ops.distill import DistillLossOutput
from .ops.dpo import DPOLossOutput
from .ops.grpo import GRPOLossOutput
from .ops.kto import KTOLossOutput
from .ops.ppo import PPOLossOutput
from .ops.rloo import RLOOLossOutput

__all__ = ["fused_linear_logprobs", "fused_linear_ppo_loss", "fused_linear_grpo_loss", "fused_linear_dpo_loss",
           "fused_linear_kto_loss", "fused_linear_cpo_loss", "fused_linear_orpo_loss", "fused_linear_rloo_loss",
           "fused_linear_cross_entropy", "fused_linear_distill_loss", "FusedLinearLogProbs", "PPOLossOutput",
           "GRPOLossOutput", "DPOLossOutput", "KTOLossOutput", "RLOOLossOutput", "CrossEntropyOutput",
           "DistillLossOutput"]
__version__ = "0.1.0"
