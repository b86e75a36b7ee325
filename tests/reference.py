"""Independent float64 references: naive PyTorch that materializes the [N, V] logits."""
from __future__ import annotations

import torch


def as_f64_leaf(t):
    """A float64 leaf copy of ``t`` that requires grad (None stays None)."""
    return None if t is None else t.detach().double().requires_grad_(True)


def reference_logprobs(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100):
    """Log-probs and entropy ``[...]`` (0 at ignored positions) from materialized float64 logits."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)
