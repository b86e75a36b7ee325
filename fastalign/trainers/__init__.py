"""Lightweight DPO, KTO and PPO trainers on the fused ops (TRL's config fields and metric names, loops you can read).

```python
from fastalign.trainers import DPOTrainer, DPOConfig, KTOTrainer, KTOConfig, PPOTrainer, PPOConfig
DPOTrainer(model, tokenizer, train_dataset, config=DPOConfig(...), ref_model=None, eval_dataset=None).train()
KTOTrainer(model, tokenizer, train_dataset, config=KTOConfig(...), ref_model=None, eval_dataset=None).train()
PPOTrainer(model, tokenizer, prompts, reward_fn, config=PPOConfig(...), ref_model=None).train()
```

The same code runs on several processes under ``torchrun`` (DDP, or FSDP2 with ``parallelism="fsdp"``): see
``fastalign.trainers.distributed``.
"""
from .common import TrainingConfig
from .dpo import DPOConfig, DPOTrainer
from .kto import KTOConfig, KTOTrainer
from .ppo import PPOConfig, PPOTrainer

__all__ = ["DPOConfig", "DPOTrainer", "KTOConfig", "KTOTrainer", "PPOConfig", "PPOTrainer", "TrainingConfig"]
