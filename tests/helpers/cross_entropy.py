"""The cross-entropy op's problem builder."""
from __future__ import annotations

import torch

IGNORE = -100

def problem(lead=(3, 5), h=6, v=37, *, ignore_frac=0.3, dtype=torch.float64, bias=True):
    gen = torch.Generator().manual_seed(sum(lead) + h + v)
    hidden = torch.randn(*lead, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / h ** 0.5 * 2
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, lead, generator=gen)
    targets[torch.rand(lead, generator=gen) < ignore_frac] = IGNORE
    return [None if x is None else x.to(dtype) for x in (hidden, weight, b)] + [targets]
