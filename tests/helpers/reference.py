"""Independent float64 references: naive PyTorch that materializes the [N, V] logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F

F64 = torch.float64


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


def trl_kto(policy, ref, labels, kl, beta, loss_type, w_d, w_u):
    """TRL's kto_loss (split by label, chosen then rejected, concatenated), ``losses.nanmean()`` and the metrics
    its ``get_batch_loss_metrics`` and ``log`` give for one step."""
    chosen_idx = torch.nonzero(labels).view(-1)
    rejected_idx = torch.nonzero(~labels).view(-1)
    pc, pr = policy.index_select(0, chosen_idx), policy.index_select(0, rejected_idx)
    rc, rr = ref.index_select(0, chosen_idx), ref.index_select(0, rejected_idx)
    chosen_losses, rejected_losses = torch.zeros(0, dtype=F64), torch.zeros(0, dtype=F64)
    chosen_rewards, rejected_rewards = torch.zeros(0, dtype=F64), torch.zeros(0, dtype=F64)
    if pc.shape[0] != 0:
        cl = pc - rc
        chosen_losses = 1 - F.sigmoid(beta * (cl - kl)) if loss_type == "kto" else 1 - F.sigmoid(beta * cl)
        chosen_rewards = beta * cl.detach()
    if pr.shape[0] != 0:
        rl = pr - rr
        rejected_losses = 1 - F.sigmoid(beta * (kl - rl)) if loss_type == "kto" else F.sigmoid(beta * rl)
        rejected_rewards = beta * rl.detach()
    losses = torch.cat((w_d * chosen_losses, w_u * rejected_losses), 0)
    metrics = {"kl": kl.item()}
    for side, rewards, logps in (("chosen", chosen_rewards, pc), ("rejected", rejected_rewards, pr)):
        if rewards.numel() > 0:
            metrics[f"rewards/{side}"] = rewards.nansum().item() / rewards.numel()
            metrics[f"logps/{side}"] = logps.detach().nansum().item() / rewards.numel()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.nanmean(), metrics


def trl_cpo(chosen, rejected, nll, beta, loss_type, eps, gamma, cpo_alpha, alpha):
    """TRL's cpo_loss, then ``losses.mean() + cpo_alpha * policy_nll_loss``."""
    if alpha != 0.0:
        rc = (1 - torch.exp(chosen).pow(-alpha)) / alpha
        rr = (1 - torch.exp(rejected).pow(-alpha)) / alpha
        logits = rc - rr
    else:
        logits = chosen - rejected
    if loss_type == "simpo":
        logits = logits - gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    if alpha != 0.0:
        chosen_rewards, rejected_rewards = beta * rc.detach(), beta * rr.detach()
    else:
        chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    nll = nll if cpo_alpha != 0 else torch.tensor(0.0, dtype=F64)
    loss = losses.mean() + cpo_alpha * nll
    metrics = {
        "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/rejected": rejected.detach().mean(), "logps/chosen": chosen.detach().mean(), "nll_loss": nll.detach(),
    }
    return loss, metrics


def trl_orpo(chosen, rejected, nll, beta):
    """TRL's odds_ratio_loss, then ``policy_nll_loss - losses.mean()``."""
    log_odds = (chosen - rejected) - (_trl_log1mexp(chosen) - _trl_log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    losses = beta * ratio
    chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/rejected": rejected.detach().mean(), "logps/chosen": chosen.detach().mean(), "nll_loss": nll.detach(),
        "log_odds_ratio": ratio.mean().detach(), "log_odds_chosen": log_odds.mean().detach(),
    }
    return nll - losses.mean(), metrics


def check(out, grads, want, *, rtol, atol):
    loss, metrics, want_grads = want
    torch.testing.assert_close(out.loss.double(), loss, rtol=rtol, atol=atol)
    assert set(out.metrics) == set(metrics)
    for k, v in metrics.items():
        torch.testing.assert_close(out.metrics[k].double(), v.double(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{k}: {m}")
    for got, ref in zip(grads, want_grads):
        scale = float(ref.abs().max())
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol * max(scale, 1.0))


def _trl_log1mexp(x):
    t = -0.6931471805599453
    return torch.where(x < t, torch.log1p(-torch.exp(x.clamp_max(t))), torch.log(-torch.expm1(x)))
