"""TRL's DPO loss (``DPOTrainer._compute_loss``, TRL 1.16) and the Plackett-Luce ranking likelihood, written out in
float64 from per-token log-probs, independently of fastalign: the references of the DPO tests."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F64 = torch.float64


def _trl_scores(x, kind, alpha):
    if kind == "reverse_kl":
        return x
    if kind == "forward_kl":
        return 1 - torch.exp(-x)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(x)
    if abs(alpha - 1.0) < 1e-6:
        return x
    return (torch.exp(torch.clamp((alpha - 1.0) * x, max=80.0)) - 1.0) * (1.0 / (alpha - 1.0))


def trl_dpo(policy, ref, mask, loss_types, weights=None, *, beta=0.1, label_smoothing=0.0, discopop_tau=0.05,
            f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None, logits=None,
            use_weighting=False, bco_mean=None):
    """TRL 1.16 ``_compute_loss`` from per-token log-probs (``policy`` the only leaf), as in TRL's source."""
    per_token_logps = policy.masked_fill(~mask, 0.0)
    ref_per_token_logps = ref.masked_fill(~mask, 0.0)
    if ld_alpha is None:
        logps, ref_logps = per_token_logps.sum(1), ref_per_token_logps.sum(1)
    else:
        comp_pos = mask.long().cumsum(dim=1)
        comp_lens = mask.sum(dim=1).long()
        chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
        shared_lens = torch.minimum(chosen_lens, rejected_lens)
        shared_lens = torch.cat([shared_lens, shared_lens], dim=0)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
        tail_mask = comp_pos > shared_lens.unsqueeze(1)
        logps = (per_token_logps * shared_mask).sum(1) + ld_alpha * (per_token_logps * tail_mask).sum(1)
        ref_logps = (ref_per_token_logps * shared_mask).sum(1) + ld_alpha * (ref_per_token_logps * tail_mask).sum(1)
    chosen_logps, rejected_logps = logps.chunk(2)
    ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = _trl_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = _trl_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    delta_score = chosen_scores - rejected_scores
    chosen_mask, rejected_mask = mask.chunk(2)
    eps = label_smoothing
    loss = 0.0
    for loss_type, loss_weight in zip(loss_types, weights or [1.0] * len(loss_types)):
        if loss_type == "sigmoid":  # cDPO smoothing (TRL < 1.0; 1.x has eps = 0 here)
            per_sequence_loss = -F.logsigmoid(beta * delta_score) * (1 - eps) - F.logsigmoid(-beta * delta_score) * eps
        elif loss_type == "hinge":
            per_sequence_loss = torch.relu(1 - beta * delta_score)
        elif loss_type in ("ipo", "sigmoid_norm"):
            avg_delta = (chosen_scores / chosen_mask.sum(1).clamp(min=1.0)
                         - rejected_scores / rejected_mask.sum(1).clamp(min=1.0))
            if loss_type == "ipo":
                per_sequence_loss = (avg_delta - 1 / (2 * beta)) ** 2
            else:
                per_sequence_loss = -F.logsigmoid(beta * avg_delta)
        elif loss_type == "exo_pair":
            epsilon = torch.tensor(eps, dtype=F64)
            qw, log_qw = torch.sigmoid(beta * delta_score), F.logsigmoid(beta * delta_score)
            ql, log_ql = torch.sigmoid(-beta * delta_score), F.logsigmoid(-beta * delta_score)
            per_sequence_loss = qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
        elif loss_type == "nca_pair":
            cr, rr = beta * chosen_logratios, beta * rejected_logratios
            per_sequence_loss = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
        elif loss_type == "robust":
            clean = -(1 - eps) * F.logsigmoid(beta * delta_score)
            flipped = -eps * F.logsigmoid(-beta * delta_score)
            per_sequence_loss = (clean - flipped) / (1 - 2 * eps)
        elif loss_type == "bco_pair":
            m = 0.0 if bco_mean is None else bco_mean
            per_sequence_loss = (-F.logsigmoid(beta * chosen_logratios - m)
                                 - F.logsigmoid(-(beta * rejected_logratios - m)))
        elif loss_type == "sppo_hard":
            per_sequence_loss = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type in ("aot", "aot_unpaired"):
            if loss_type == "aot":
                delta = (torch.sort(chosen_logps - rejected_logps, dim=0)[0]
                         - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0])
            else:
                delta = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
            per_sequence_loss = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
        elif loss_type == "apo_zero":
            per_sequence_loss = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
        elif loss_type == "apo_down":
            per_sequence_loss = (torch.sigmoid(beta * chosen_logratios)
                                 + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
        elif loss_type == "discopop":
            lg = delta_score * beta
            modulation = torch.sigmoid(lg / discopop_tau)
            per_sequence_loss = -F.logsigmoid(lg) * (1 - modulation) + torch.exp(-lg) * modulation
        elif loss_type == "sft":  # cross_entropy over the chosen completion tokens
            chosen_tokens = policy.chunk(2)[0][chosen_mask]
            per_sequence_loss = (-chosen_tokens.mean()).expand(chosen_logps.shape[0])
        else:
            raise AssertionError(loss_type)
        if use_weighting:
            completion_lengths = mask.sum(dim=1).clamp_min(1)
            with torch.no_grad():
                log_denom = torch.logsumexp(2.0 * logits, -1) - 2.0 * torch.logsumexp(logits, -1)
                aligned = (per_token_logps - log_denom) * mask
            w = torch.exp(aligned.sum(1) / completion_lengths)
            chosen_w, rejected_w = w.chunk(2)
            per_sequence_loss = per_sequence_loss * chosen_w * rejected_w
        loss = loss + per_sequence_loss.mean() * loss_weight
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), chosen_logps, rejected_logps


def plackett_luce_reference(rewards: list[list[float]]) -> float:
    """Mean over groups of ``-log P(ranking)`` with ``rewards[k][b]`` of response k (best first) to prompt b."""
    k, b = len(rewards), len(rewards[0])
    total = 0.0
    for j in range(b):
        for i in range(k - 1):
            rest = sum(math.exp(rewards[m][j]) for m in range(i, k))
            total -= rewards[i][j] - math.log(rest)
    return total / b
