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
from fastalign.objectives.distill import DistillConfig
from fastalign.objectives.dpo import DPOOptions
from fastalign.objectives.grpo import GRPOLossConfig
from fastalign.objectives.kto import KTOOptions
from fastalign.objectives.ppo import PPOLossConfig
from fastalign.objectives.preference import CPOOptions
from fastalign.objectives.rloo import RLOOOptions
from fastalign.objectives.sft import CrossEntropyConfig

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
        if name in ("CPOConfig", "ORPOConfig", "DistillationConfig"):
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
    "rloo": (RLOOOptions, functional.fused_linear_rloo_loss, "RLOOConfig", {}),
    "sft": (CrossEntropyConfig, functional.fused_linear_cross_entropy, "SFTConfig", {}),
    "distill": (DistillConfig, functional.fused_linear_distill_loss, "DistillationConfig", {}),
}
TRAINER_ONLY_LOSS_OPTIONS = {  # loss options a trainer does not expose (it keeps the objective's default)
    "ppo": {"entropy_coef", "loss_agg", "cliprange_high", "dual_clip"},
    "sft": {"reduction", "label_smoothing", "z_loss"},
    "distill": {"hard_label_weight"},
}
NOT_OP_OPTIONS = {"rloo": {"beta", "num_generations", "normalize_advantages", "reward_clip_range"}}  # advantages'


@pytest.mark.parametrize("family", FAMILIES)
def test_op_signature_defaults_are_the_objectives(family):
    options, op, _, _ = FAMILIES[family]
    source = {k: v for k, v in field_defaults(options).items() if k not in NOT_OP_OPTIONS.get(family, ())}
    same_defaults(source, signature_defaults(op), op.__name__)


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f][2]])
def test_trainer_config_defaults_are_the_objectives(family):
    options, _, config, differ = FAMILIES[family]
    source = {k: v for k, v in field_defaults(options).items() if k not in TRAINER_ONLY_LOSS_OPTIONS.get(family, ())}
    same_defaults(source, field_defaults(getattr(trainers, config)), f"fastalign.trainers.{config}", differ=differ)


@pytest.mark.parametrize("family, config, shared", [
    ("grpo", "GRPOConfig", 3), ("dpo", "DPOConfig", 3), ("kto", "KTOConfig", 3), ("cpo", "CPOConfig", 3),
    ("rloo", "RLOOConfig", 6), ("sft", "SFTConfig", 1), ("distill", "DistillationConfig", 1)])
def test_objectives_defaults_are_trl_116(family, config, shared):
    theirs = field_defaults(trl_config(config))
    if family == "dpo":  # TRL keeps loss_type as a list
        theirs["loss_type"] = theirs["loss_type"][0] if len(theirs["loss_type"]) == 1 else tuple(theirs["loss_type"])
    ours = {k: v for k, v in field_defaults(FAMILIES[family][0]).items() if k in theirs}
    assert len(ours) >= shared
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


# a trainer config's property that builds its loss options, and the names it leaves out on purpose
LOSS_OPTIONS = {"DPOConfig": ("options", ()), "KTOConfig": ("options", ()), "GRPOConfig": ("loss_config", ()),
                "RLOOConfig": ("options", ()), "PPOConfig": ("loss_config", ("kl_coef", "kl_estimator"))}


@pytest.mark.parametrize("config", LOSS_OPTIONS)
def test_trainer_configs_hand_every_loss_option_on(config, tmp_path):
    """Each field a trainer config shares with its loss options reaches them: a changed value (every number of the
    config moved) arrives, none is dropped or rebuilt by hand."""
    cls, (prop, left_out) = getattr(trainers, config), LOSS_OPTIONS[config]
    defaults = field_defaults(cls)
    options = getattr(cls(output_dir=str(tmp_path)), prop)
    shared = [f.name for f in dataclasses.fields(options) if f.name in defaults and f.name not in left_out]
    moved = {n: defaults[n] * 0.5 + 0.25 for n in shared
             if isinstance(defaults[n], float) and not isinstance(defaults[n], bool)}
    assert len(moved) >= 2, (config, shared)
    options = getattr(cls(output_dir=str(tmp_path), **moved), prop)
    assert {n: getattr(options, n) for n in shared} == {n: moved.get(n, defaults[n]) for n in shared}
