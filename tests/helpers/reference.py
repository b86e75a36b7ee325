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


def random_split_partials(n: int, splits: int, *, ignore_index: int, with_sum_ez: bool = True):
    """Plausible vocab-split statistics ``[splits, n]`` of the log-sum-exp kernel (``LsePartials``) and targets:
    sumexp >= 1 (the split's max contributes 1), sum_ez = sum exp(z - max)(z - max) <= 0, the target logit in one
    split only, every 5th row ignored."""
    from fastalign.kernels.lse_forward import LsePartials

    m = 3 * torch.randn(splits, n)
    sumexp = 1 + 30 * torch.rand(splits, n)
    sum_ez = -sumexp * (0.5 + 3 * torch.rand(splits, n)) if with_sum_ez else None
    home = torch.randint(0, splits, (n,))
    target_logit = torch.zeros(splits, n)
    target_logit[home, torch.arange(n)] = m[home, torch.arange(n)] - 4 * torch.rand(n)
    targets = torch.randint(0, 1000, (n,))
    targets[::5] = ignore_index
    return LsePartials(m, sumexp, sum_ez, target_logit), targets


def reference_row_stats(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100):
    """Every per-row statistic of a ``RowStatsSpec`` from materialized float64 logits ``[N, V]``, by name (argmax:
    the first maximal column, int64), and the logits themselves."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    valid = targets != ignore_index
    logp = torch.log_softmax(z, dim=-1)
    stats = dict(lse=torch.logsumexp(z, -1),
                 target_logit=torch.where(valid, z.gather(-1, torch.where(valid, targets, 0)[:, None])[:, 0], 0.0),
                 entropy=-(logp.exp() * logp).sum(-1), lse2=torch.logsumexp(2 * z, -1), logit_sum=z.sum(-1),
                 max_logit=z.max(-1).values, argmax=(z == z.max(-1, keepdim=True).values).to(torch.uint8).argmax(-1))
    return stats, z
