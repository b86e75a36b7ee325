"""Alignment objectives (PPO, DPO) as plain PyTorch: the single source of truth for every formula."""
