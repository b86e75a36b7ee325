"""Lightweight SFT, distillation, DPO, KTO, PPO, GRPO, RLOO and reward-model trainers on the fused ops (TRL's config
fields and metric names, loops you can read).

```python
from fastalign.trainers import (SFTTrainer, SFTConfig, DistillationTrainer, DistillationConfig, DPOTrainer,
                                DPOConfig, GRPOTrainer, GRPOConfig, KTOTrainer, KTOConfig, PPOTrainer, PPOConfig,
                                RLOOTrainer, RLOOConfig, RewardTrainer, RewardConfig)
SFTTrainer(model, tokenizer, train_dataset, config=SFTConfig(...), eval_dataset=None).train()
DistillationTrainer(student, tokenizer, prompts, teacher, config=DistillationConfig(...)).train()
DPOTrainer(model, tokenizer, train_dataset, config=DPOConfig(...), ref_model=None, eval_dataset=None).train()
KTOTrainer(model, tokenizer, train_dataset, config=KTOConfig(...), ref_model=None, eval_dataset=None).train()
PPOTrainer(model, tokenizer, prompts, reward_fn, config=PPOConfig(...), ref_model=None).train()
GRPOTrainer(model, tokenizer, prompts, reward_funcs, config=GRPOConfig(...)).train()
RLOOTrainer(model, tokenizer, prompts, reward_funcs, config=RLOOConfig(...)).train()
RewardTrainer(reward_model, tokenizer, train_dataset, config=RewardConfig(...), eval_dataset=None).train()
```

The same code runs on several processes under ``torchrun`` (DDP, or FSDP2 with ``parallelism="fsdp"``): see
``fastalign.trainers.distributed``.
"""
from .common import TrainingConfig
from .distill import DistillationConfig, DistillationTrainer
from .dpo import DPOConfig, DPOTrainer
from .grpo import GRPOConfig, GRPOTrainer
from .kto import KTOConfig, KTOTrainer
from .ppo import PPOConfig, PPOTrainer
from .reward import RewardConfig, RewardTrainer
from .rloo import RLOOConfig, RLOOTrainer
from .sft import SFTConfig, SFTTrainer

__all__ = ["DistillationConfig", "DistillationTrainer", "DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer",
           "KTOConfig", "KTOTrainer", "PPOConfig", "PPOTrainer", "RewardConfig", "RewardTrainer", "RLOOConfig",
           "RLOOTrainer", "SFTConfig", "SFTTrainer", "TrainingConfig"]
