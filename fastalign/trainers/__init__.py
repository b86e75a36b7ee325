"""Lightweight DPO and PPO trainers on the fused ops (TRL's config fields and metric names, loops you can read).

```python
from fastalign.trainers import DPOTrainer, DPOConfig, PPOTrainer, PPOConfig
DPOTrainer(model, tokenizer, train_dataset, config=DPOConfig(...), ref_model=None, eval_dataset=None).train()
PPOTrainer(model, tokenizer, prompts, reward_fn, config=PPOConfig(...), ref_model=None).train()
```
"""
from .common import TrainingConfig
from .dpo import DPOConfig, DPOTrainer
from .ppo import PPOConfig, PPOTrainer

__all__ = ["DPOConfig", "DPOTrainer", "PPOConfig", "PPOTrainer", "TrainingConfig"]
