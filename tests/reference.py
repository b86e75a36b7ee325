"""Independent float64 references: naive PyTorch that materializes the [N, V] logits."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


UNTIMED_LOGS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
                "eval_samples_per_second", "eval_steps_per_second", "step_time", "total_flos"}
"""Keys of a Hugging Face trainer's ``log_history`` that are wall-clock numbers (they differ run to run)."""


def assert_same_training_run(ours, theirs, *, rtol: float = 1e-5, atol: float = 1e-6, min_logs: int = 3) -> None:
    """Two Hugging Face trainers after ``train()``: every logged number but the timings equal (``rtol``; ``atol``
    for numbers that are zero up to rounding), the same keys at every log, and the final weights equal in norm
    (``|w_ours - w_theirs| <= rtol |w_theirs|`` per parameter), with some trainable."""
    import math

    def logs(trainer):
        return [{k: v for k, v in log.items() if k not in UNTIMED_LOGS} for log in trainer.state.log_history]

    got, want = logs(ours), logs(theirs)
    assert [sorted(log) for log in got] == [sorted(log) for log in want]
    assert len(want) >= min_logs
    for step, (log, ref) in enumerate(zip(got, want)):
        for key, value in ref.items():
            assert math.isclose(log[key], value, rel_tol=rtol, abs_tol=atol) or (
                math.isnan(value) and math.isnan(log[key])), f"log {step} {key}: {log[key]} vs {value}"
    ours_params, their_params = dict(ours.model.named_parameters()), dict(theirs.model.named_parameters())
    assert ours_params.keys() == their_params.keys()
    for name, param in their_params.items():
        diff = (ours_params[name].detach() - param.detach()).norm()
        assert diff <= rtol * param.detach().norm() + 1e-12, f"{name}: |diff| {diff} vs |w| {param.norm()}"
    assert any(p.requires_grad for p in ours.model.parameters())


def reference_distill(sh, sw, th, tw, mask=None, *, beta=1.0, temperature=1.0, sb=None, tb=None,
                      num_items_in_batch=None, hard_label_weight=0.0, targets=None, ignore_index=-100):
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
        ce = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
                             reduction="none").view(targets.shape)
        loss = (1 - hard_label_weight) * loss + hard_label_weight * (ce * m).sum() / count
    return loss, entropy
