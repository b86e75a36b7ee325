"""Comparing metrics that are discontinuous functions of floats (accuracies, clip fractions) without comparing
float noise: a value within rounding of a threshold can land on either side, on one CPU and not on another (the
Intel and AMD machines of this kind round matmuls and ``exp`` differently), so such an element is left out of the
comparison instead of deciding the test."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from fastalign.trainers import losses

# A DPO reward margin (or ratio, value) is "separated" from its threshold by this much: far more (>= 100x) than the
# tolerances the tests compare rewards, log-probs and values with.
SEPARATED = 1e-3


def near(x: torch.Tensor, thresholds: Iterable[float | None], noise: float) -> torch.Tensor:
    """Bool ``[...]``: where ``x`` is within ``noise`` (relative to the threshold, at least absolute) of one of the
    ``thresholds`` (None ones skipped)."""
    out = torch.zeros(x.shape, dtype=torch.bool)
    for t in thresholds:
        if t is not None:
            out |= (x.double() - t).abs().cpu() <= noise * max(1.0, abs(t))
    return out


def assert_share_close(got, flags: torch.Tensor, ambiguous: torch.Tensor, what: str) -> None:
    """``got``, the share of True among ``flags [n]`` (the reference's decisions) computed elsewhere: equal to the
    reference's share up to the ``ambiguous`` elements (within rounding of the threshold), which may go either way.
    An empty ``flags`` must give 0."""
    n = flags.numel()
    want = float(flags.sum()) / max(n, 1)
    slack = float(ambiguous.sum()) / max(n, 1)
    assert abs(float(got) - want) <= slack + 1e-6, f"{what}: {float(got)} vs {want} (ambiguous share {slack})"


@contextlib.contextmanager
def recorded_calls(name: str):
    """Each call of ``fastalign.trainers.losses.<name>`` (``fused_linear_dpo_loss``, ``fused_linear_ppo_loss``, the
    trainers' fused ops) as ``(args, kwargs, output)``, while the context is open."""
    seen, op = [], getattr(losses, name)

    def recording(*args, **kwargs):
        out = op(*args, **kwargs)
        seen.append((args, kwargs, out))
        return out

    setattr(losses, name, recording)
    try:
        yield seen
    finally:
        setattr(losses, name, op)


def reward_margins(calls) -> list[torch.Tensor]:
    """``|chosen - rejected reward|`` ``[B]`` of each recorded ``fused_linear_dpo_loss`` call."""
    return [(out.chosen_rewards - out.rejected_rewards).abs() for _, _, out in calls]
