"""fastalign inside TRL 1.16: ``from fastalign.trl import DPOTrainer`` instead of ``from trl import DPOTrainer``.

Each trainer is a subclass of TRL's class of the same name, with the same constructor and TRL's config class; the loss
runs through fastalign's fused op from the model's last hidden states and lm_head, inside the model's forward
(:mod:`fastalign.trl.head`). One extra keyword, ``fastalign_options=``, reaches the op's own options. Needs
``fastalign[trl]`` (``trl==1.16.*``). Option mapping: ``docs/trl.md``.
"""
from .distill import DistillationTrainer
from .dpo import DPOTrainer
from .grpo import GRPOTrainer
from .kto import KTOTrainer
from .preference import CPOTrainer, ORPOTrainer
from .rloo import RLOOTrainer
from .sft import SFTTrainer

__all__ = ["CPOTrainer", "DPOTrainer", "DistillationTrainer", "GRPOTrainer", "KTOTrainer", "ORPOTrainer", "RLOOTrainer",
           "SFTTrainer"]
