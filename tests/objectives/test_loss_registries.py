"""The loss registries: the snippets of docs/loss-registries.md run as written (a new GRPO loss type in under 30
lines, a new DPO pair loss), give the loss they define, and leave the registries as they were."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastalign import fused_linear_dpo_loss, fused_linear_grpo_loss
from fastalign.objectives import dpo, grpo
from helpers.reference import reference_logprobs

DOC = Path(__file__).resolve().parents[2] / "docs" / "loss-registries.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def restore_registries():
    saved = dict(grpo.GRPO_LOSSES), dict(dpo.DPO_PAIR_LOSSES)
    yield
    for registry, before in zip((grpo.GRPO_LOSSES, dpo.DPO_PAIR_LOSSES), saved):
        registry.clear()
        registry.update(before)


def test_grpo_snippet_is_short_runs_and_computes_its_loss(restore_registries):
    code = snippets()[0]
    assert len(code.strip().splitlines()) < 30
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102 - the documented example itself
    assert "clipped_pg" in grpo.GRPO_LOSSES and scope["hidden"].grad is not None
    # the same loss from materialized float64 logits: -sg(min(r, 1.2)) A log pi + beta * r * k3, over the 10 tokens
    h, w, targets = scope["hidden"].detach().double(), scope["weight"].detach().double(), scope["targets"]
    lp, _ = reference_logprobs(h, w, targets)
    adv = torch.tensor([1.0, -0.5]).double()[:, None]
    r = torch.exp(lp + 3.7)
    d = -3.6 - lp
    want = (-torch.clamp(r, max=1.2) * adv * lp + 0.04 * r * (torch.exp(d) - d - 1)).sum() / 10
    torch.testing.assert_close(scope["out"].loss.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss_type: expected one of"):
        fused_linear_grpo_loss(h.float(), w.float(), targets, adv[:, 0].float(), loss_type="clipped_pg_typo")


def test_dpo_snippet_registers_a_pair_loss(restore_registries):
    exec(compile(snippets()[1], str(DOC), "exec"), {})  # noqa: S102
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(11, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (4, 3), generator=g)
    ref = torch.randn(2, 2, generator=g, dtype=torch.float64) - 6
    out = fused_linear_dpo_loss(hidden, weight, targets, ref_logps=ref, loss_type="sigmoid_margin", beta=0.3,
                                backend="torch")
    logps = reference_logprobs(hidden, weight, targets)[0].sum(-1).view(2, 2)
    ratios = logps - ref
    want = -F.logsigmoid(0.3 * (ratios[0] - ratios[1]) - 0.5).mean()
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)


def test_registries_hold_the_trl_loss_types():
    assert grpo.GRPO_LOSS_TYPES == ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
    assert set(grpo.GRPO_LOSSES) >= set(grpo.GRPO_LOSS_TYPES)
    assert dpo.DPO_LOSS_TYPES == ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
    with pytest.raises(ValueError, match="normalizer: expected one of"):
        grpo.register_grpo_loss("x", normalizer="mean")
