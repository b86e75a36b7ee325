"""The distillation op's float64 reference (materialized logits of both heads) and its problem builder."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100

def reference_distill(sh, sw, th, tw, mask=None, *, beta=1.0, temperature=1.0, sb=None, tb=None,
                      num_items_in_batch=None, hard_label_weight=0.0, targets=None):
    """TRL's per-token generalized JSD from the full float64 logits of both models, reduced as TRL (sum over
    ``num_items_in_batch``, else the masked mean, 0 when nothing is masked in); the hard cross-entropy on the
    student's logits before the temperature, as Liger's distillation base."""
    zs = sh.double() @ sw.double().T + (0 if sb is None else sb.double())
    zt = th.double() @ tw.double().T + (0 if tb is None else tb.double())
    log_ps, log_pt = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if beta == 0:
        per_token = (pt * (log_pt - log_ps)).sum(-1)
    elif beta == 1:
        per_token = (ps * (log_ps - log_pt)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_ps + math.log(1 - beta), log_pt + math.log(beta)]), 0)
        per_token = (beta * pt * (log_pt - log_m)).sum(-1) + ((1 - beta) * ps * (log_ps - log_m)).sum(-1)
    m = torch.ones(per_token.shape, dtype=torch.float64) if mask is None else mask.double()
    count = num_items_in_batch if num_items_in_batch is not None else m.sum().clamp(min=1)
    loss = (per_token * m).sum() / count
    entropy = -(ps * log_ps).sum(-1) * m
    if targets is not None:
        ce = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                             reduction="none").view(targets.shape)
        loss = (1 - hard_label_weight) * loss + hard_label_weight * (ce * m).sum() / count
    return loss, entropy


def problem(lead=(3, 5), hs=6, ht=9, v=31, *, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    p = dict(sh=randn(*lead, hs), sw=randn(v, hs) / hs ** 0.5 * 2, th=randn(*lead, ht), tw=randn(v, ht) / ht ** 0.5 * 3,
             sb=randn(v) if bias else None, tb=randn(v) if bias else None,
             mask=torch.rand(lead, generator=gen) > 0.3, targets=torch.randint(0, v, lead, generator=gen))
    p["targets"][torch.rand(lead, generator=gen) < 0.2] = IGNORE
    return p
