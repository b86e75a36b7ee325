"""One source for every option's default: the objectives' dataclasses (``GRPOLossConfig``, ``DPOOptions``,
``KTOOptions``, ``PPOLossConfig``, ``CPOOptions``). The public ops' signatures and the trainers' configs must give
the same defaults for the same names, and those defaults must be TRL 1.16's (``GRPOConfig``, ``DPOConfig``,
``KTOConfig``, the experimental ``CPOConfig`` / ``ORPOConfig``; TRL 1.16 has no PPO trainer). A default changed in
one place only fails here."""
from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest

from fastalign import functional, trainers
from fastalign.objectives.dpo import DPOOptions
from fastalign.objectives.grpo import GRPOLossConfig
from fastalign.objectives.kto import KTOOptions
from fastalign.objectives.ppo import PPOLossConfig
from fastalign.objectives.preference import CPOOptions

trl = pytest.importorskip("trl")


def field_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def signature_defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def trl_config(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in ("CPOConfig", "ORPOConfig"):
            module = __import__(f"trl.experimental.{name[:-6].lower()}", fromlist=[name])
            return getattr(module, name)
        return getattr(trl, name)


def same_defaults(source: dict, other: dict, what: str, *, differ: dict | None = None) -> None:
    """Every option of ``source`` has the same default in ``other``, except the names in ``differ`` (documented
    different meanings, each with the value ``other`` must have)."""
    differ = differ or {}
    missing = set(source) - set(other) - set(differ)
    assert not missing, f"{what}: options without a default there: {sorted(missing)}"
    for name, value in source.items():
        want = differ.get(name, value)
        assert other.get(name, want) == want, f"{what}.{name}: default {other[name]!r}, expected {want!r}"


FAMILIES = {  # options class, public op, trainer config (None: no trainer), its differing names
    "grpo": (GRPOLossConfig, functional.fused_linear_grpo_loss, "GRPOConfig",
             # the op's dr_grpo normalizer has no default; the trainer's completion budget is TRL's
             {"max_completion_length": 512}),
    "dpo": (DPOOptions, functional.fused_linear_dpo_loss, "DPOConfig", {}),
    "kto": (KTOOptions, functional.fused_linear_kto_loss, "KTOConfig", {}),
    # the PPO trainer puts the KL in the rewards (TRL's PPO: kl_coef 0.05, k1); the loss' kl_coef is a loss term
    "ppo": (PPOLossConfig, functional.fused_linear_ppo_loss, "PPOConfig", {"kl_coef": 0.05, "kl_estimator": "k1"}),
    "cpo": (CPOOptions, functional.fused_linear_cpo_loss, None, {}),
}
TRAINER_ONLY_LOSS_OPTIONS = {"ppo": {"entropy_coef", "loss_agg", "cliprange_high", "dual_clip"}}  # not exposed


@pytest.mark.parametrize("family", FAMILIES)
def test_op_signature_defaults_are_the_objectives(family):
    options, op, _, _ = FAMILIES[family]
    same_defaults(field_defaults(options), signature_defaults(op), op.__name__)


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f][2]])
def test_trainer_config_defaults_are_the_objectives(family):
    options, _, config, differ = FAMILIES[family]
    source = {k: v for k, v in field_defaults(options).items() if k not in TRAINER_ONLY_LOSS_OPTIONS.get(family, ())}
    same_defaults(source, field_defaults(getattr(trainers, config)), f"fastalign.trainers.{config}", differ=differ)


@pytest.mark.parametrize("family, config", [("grpo", "GRPOConfig"), ("dpo", "DPOConfig"), ("kto", "KTOConfig"),
                                            ("cpo", "CPOConfig")])
def test_objectives_defaults_are_trl_116(family, config):
    theirs = field_defaults(trl_config(config))
    if family == "dpo":  # TRL keeps loss_type as a list
        theirs["loss_type"] = theirs["loss_type"][0] if len(theirs["loss_type"]) == 1 else tuple(theirs["loss_type"])
    ours = {k: v for k, v in field_defaults(FAMILIES[family][0]).items() if k in theirs}
    assert len(ours) >= 3
    differ = {"max_completion_length": None} if family == "grpo" else {}  # the op's dr_grpo normalizer: required
    same_defaults(ours, theirs, f"trl.{config}", differ={k: theirs[k] for k in differ})
    for name, value in differ.items():
        assert ours[name] == value


def test_trainer_defaults_are_trl_116():
    """The trainers' loss and completion options against TRL 1.16's configs (training arguments such as
    ``logging_steps`` are fastalign's own)."""
    ours = field_defaults(trainers.GRPOConfig)
    theirs = field_defaults(trl_config("GRPOConfig"))
    for name in [*field_defaults(GRPOLossConfig), "num_generations", "temperature", "top_p", "num_iterations",
                 "mask_truncated_completions", "scale_rewards", "multi_objective_aggregation", "use_adaptive_entropy",
                 "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target"]:
        assert ours[name] == theirs[name], f"GRPOConfig.{name}: {ours[name]!r}, TRL 1.16 {theirs[name]!r}"
    assert field_defaults(trl_config("ORPOConfig"))["beta"] == signature_defaults(
        functional.fused_linear_orpo_loss)["beta"]
