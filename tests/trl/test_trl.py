"""fastalign.trl against TRL 1.16 itself: the same trainer, seed and data, 3 optimizer steps, every logged number and
the final weights equal (relative 1e-5; absolute 1e-6 for numbers that are zero up to rounding, e.g. the rewards of
the first step, where TRL subtracts two equal reference and policy passes and fastalign two different ones; for the
rewards, differences of sequence log-probs, 1e-5 of those log-probs)."""
from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import fastalign.trl as fatrl  # noqa: E402
from fastalign.trl import head  # noqa: E402
from fastalign.trainers.tiny import tiny_llama, word_tokenizer  # noqa: E402
from helpers.trl import ATOL, RTOL, UNTIMED, WORDS, _dpo_dataset, _saved_tiny_llama, _sentences


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and its word-level tokenizer saved to disk (TRL builds a reference model from the path)."""
    return _saved_tiny_llama(tmp_path_factory.mktemp("tiny"), 0)


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    """Another one, the DPO reference: a reference equal to the policy gives rewards that are 0 up to rounding at
    the first step, whose signs (``rewards/accuracies``) are then rounding noise."""
    return _saved_tiny_llama(tmp_path_factory.mktemp("ref"), 1)


def _assert_same_run(ours, theirs) -> None:
    logs = [{k: v for k, v in log.items() if k not in UNTIMED} for log in ours.state.log_history]
    expected = [{k: v for k, v in log.items() if k not in UNTIMED} for log in theirs.state.log_history]
    assert [sorted(log) for log in logs] == [sorted(log) for log in expected]
    assert len(logs) >= 3
    for step, (log, ref) in enumerate(zip(logs, expected)):
        # Rewards are beta times differences of sequence log-probs: relative to the log-probs they difference
        logps = max(abs(ref.get("logps/chosen", 0.0)), abs(ref.get("logps/rejected", 0.0)))
        for key, value in ref.items():
            atol = max(ATOL, RTOL * logps) if key.startswith("rewards/") else ATOL
            assert math.isclose(log[key], value, rel_tol=RTOL, abs_tol=atol) or (
                math.isnan(value) and math.isnan(log[key])), f"log {step} {key}: {log[key]} vs TRL {value}"
    ours_params, their_params = dict(ours.model.named_parameters()), dict(theirs.model.named_parameters())
    assert ours_params.keys() == their_params.keys()
    moved = 0
    for name, param in their_params.items():
        diff = (ours_params[name].detach() - param.detach()).norm()
        assert diff <= RTOL * param.detach().norm() + 1e-12, f"{name}: |diff| {diff} vs |w| {param.norm()}"
    for name, param in ours.model.named_parameters():
        moved += param.requires_grad
    assert moved > 0


def _lora():
    # Random B (not the zero init): the adapter-disabled reference then differs from the policy at the first step
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _train(trainer_cls, config_cls, model_dir, tmp_path, dataset, peft, ref_dir=None, **config):
    args = config_cls(output_dir=str(tmp_path / trainer_cls.__module__), max_steps=3, logging_steps=1,
                      learning_rate=1e-3, report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
                      **config)
    extra = {}
    if peft:
        extra["peft_config"] = _lora()
    if ref_dir is not None:
        extra["ref_model"] = AutoModelForCausalLM.from_pretrained(ref_dir)
    trainer = trainer_cls(model=model_dir, args=args, train_dataset=dataset, **extra)
    trainer.train()
    return trainer


# --- DPO ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_trainer_matches_trl(model_dir, ref_dir, tmp_path, monkeypatch):
    """Every loss type, in one weighted list, with LD-DPO, a reference model and padding_free (TRL 1.16 falls back to
    padding; fastalign runs the policy packed: the same numbers)."""
    types = ["sigmoid", "bco_pair", "sft", "ipo", "hinge", "nca_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
             "apo_down", "discopop", "sigmoid_norm"]
    config = dict(per_device_train_batch_size=2, beta=0.5, loss_type=types,
                  loss_weights=[1.0 - 0.05 * i for i in range(len(types))], ld_alpha=0.5, padding_free=True)
    dataset = _dpo_dataset()
    theirs = _train(trl.DPOTrainer, trl.DPOConfig, model_dir, tmp_path / "trl", dataset, False, ref_dir, **config)
    packed, original = [], head.packed_hidden_states
    monkeypatch.setattr(head, "packed_hidden_states", lambda *args: packed.append(1) or original(*args))
    ours = _train(fatrl.DPOTrainer, trl.DPOConfig, model_dir, tmp_path / "fa", dataset, False, ref_dir, **config)
    assert len(packed) == 3 and ours.args.padding_free  # every step's policy forward ran packed
    _assert_same_run(ours, theirs)


@pytest.mark.slow
def test_dpo_trainer_with_lora_wpo_and_precomputed_reference_matches_trl(model_dir, tmp_path):
    """LoRA (frozen lm_head) with gradient checkpointing, the reference precomputed with the adapter disabled, WPO
    weights, an f-divergence, label smoothing and gradient accumulation."""
    config = dict(per_device_train_batch_size=2, gradient_checkpointing=True, precompute_ref_log_probs=True,
                  loss_type=["robust", "exo_pair"], label_smoothing=0.1, use_weighting=True,
                  f_divergence_type="js_divergence", gradient_accumulation_steps=2)
    dataset = _dpo_dataset(12)
    theirs = _train(trl.DPOTrainer, trl.DPOConfig, model_dir, tmp_path / "trl", dataset, True, **config)
    ours = _train(fatrl.DPOTrainer, trl.DPOConfig, model_dir, tmp_path / "fa", dataset, True, **config)
    _assert_same_run(ours, theirs)


# --- CPO, ORPO (trl.experimental) --------------------------------------------------------------------------------

PAIR_CASES = {
    "cpo_simpo_alphapo": ("CPOTrainer", "cpo", dict(loss_type="simpo", alpha=0.2, cpo_alpha=0.5, simpo_gamma=0.3,
                                                    label_smoothing=0.1)),
    "orpo": ("ORPOTrainer", "orpo", dict()),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_experimental_pair_trainers_match_trl(case, model_dir, tmp_path):
    import importlib

    name, module, options = PAIR_CASES[case]
    experimental = importlib.import_module(f"trl.experimental.{module}")
    config_cls = getattr(experimental, name.replace("Trainer", "Config"))
    config = dict(per_device_train_batch_size=2, beta=0.5, **options)
    dataset = _dpo_dataset()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def run(cls, where):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        args = config_cls(output_dir=str(where), max_steps=3, logging_steps=1, learning_rate=1e-3, report_to="none",
                          use_cpu=True, bf16=False, save_strategy="no", seed=0, **config)
        trainer = cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        return trainer

    theirs = run(getattr(experimental, name), tmp_path / "trl")
    ours = run(getattr(fatrl, name), tmp_path / "fa")
    _assert_same_run(ours, theirs)


# --- KTO ---------------------------------------------------------------------------------------------------------

def _kto_dataset(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": _sentences(5, n, 2, 5),
                              "completion": [" " + text for text in _sentences(6, n, 1, 6)],
                              "label": [bool(i % 3) for i in range(n)]})


@pytest.mark.slow
def test_kto_trainer_with_lora_matches_trl(model_dir, tmp_path):
    """kto with the batch KL estimate and unequal weights; the reference, precomputed, is the disabled adapter."""
    config = dict(per_device_train_batch_size=2, loss_type="kto", beta=0.5, desirable_weight=1.3,
                  undesirable_weight=0.7, precompute_ref_log_probs=True)
    dataset = _kto_dataset()
    theirs = _train(trl.KTOTrainer, trl.KTOConfig, model_dir, tmp_path / "trl", dataset, True, **config)
    ours = _train(fatrl.KTOTrainer, trl.KTOConfig, model_dir, tmp_path / "fa", dataset, True, **config)
    _assert_same_run(ours, theirs)


# --- GRPO --------------------------------------------------------------------------------------------------------

def _grpo_dataset(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": _sentences(4, n, 2, 5)})


def count_cats(completions, **kwargs) -> list[float]:
    """A rule reward: the number of "cat" words minus half the number of "dog" words."""
    return [c.split().count("cat") - 0.5 * c.split().count("dog") for c in completions]


GRPO_CASES = {
    "dapo_sequence_offpolicy_entropy": dict(loss_type="dapo", num_iterations=2, importance_sampling_level="sequence",
                                            off_policy_mask_threshold=0.01, entropy_coef=0.01),
    # TRL 1.16's entropy bonus: a mean over the effective mask for every loss type (dapo's included)
    "dapo_top_entropy_bonus": dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.05),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", GRPO_CASES.values(), ids=GRPO_CASES.keys())
def test_grpo_trainer_matches_trl(case, model_dir, tmp_path):
    config = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=5, beta=0.0, **case)
    _grpo_case(config, model_dir, tmp_path, peft=False)


@pytest.mark.slow
def test_grpo_trainer_with_lora_and_kl_matches_trl(model_dir, tmp_path):
    """LoRA (frozen lm_head) with the KL term (the reference log-probs come from the disabled adapter), the clip
    range and two-sided clip, 2 iterations per generation, gradient accumulation and checkpointing, a sampling
    temperature, the top-entropy mask and the adaptive entropy bonus."""
    config = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=5, beta=0.1,
                  loss_type="grpo", num_iterations=2, use_bias_correction_kl=True, gradient_accumulation_steps=2,
                  epsilon=0.05, epsilon_high=0.1, delta=1.2, gradient_checkpointing=True, temperature=0.8,
                  top_entropy_quantile=0.5, use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=100.0)
    _grpo_case(config, model_dir, tmp_path, peft=True)


def _grpo_case(config, model_dir, tmp_path, peft):
    dataset = _grpo_dataset()
    kwargs = dict(reward_funcs=count_cats)

    def run(cls, where):
        args = trl.GRPOConfig(output_dir=str(where), max_steps=3, logging_steps=1, learning_rate=1e-3,
                              report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0, **config)
        extra = {"peft_config": _lora()} if peft else {}
        trainer = cls(model=model_dir, args=args, train_dataset=dataset, **kwargs, **extra)
        trainer.train()
        return trainer

    theirs = run(trl.GRPOTrainer, tmp_path / "trl")
    ours = run(fatrl.GRPOTrainer, tmp_path / "fa")
    _assert_same_run(ours, theirs)


@pytest.fixture(scope="module")
def grpo_pair(model_dir, tmp_path_factory):
    """TRL's GRPOTrainer and fastalign's on the same weights (beta 0.1, entropy bonus, off-policy mask, clip range and
    delta), and a batch as TRL's generation step leaves it, with old / reference / sampling log-probs near the
    policy's and an importance-sampling ratio (read by vespo)."""
    trainers = []
    for cls in (trl.GRPOTrainer, fatrl.GRPOTrainer):
        args = trl.GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), report_to="none", use_cpu=True,
                              bf16=False, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                              beta=0.1, epsilon_high=0.3, delta=1.5, off_policy_mask_threshold=0.02,
                              entropy_coef=0.05, temperature=0.9)
        trainers.append(cls(model=model_dir, reward_funcs=count_cats, args=args, train_dataset=_grpo_dataset()))
    g = torch.Generator().manual_seed(0)
    vocab = trainers[0].model.config.vocab_size
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    near = lambda: -3.0 + 0.3 * torch.randn(4, 6, generator=g)  # noqa: E731 (the tiny model's log-probs are ~ -3)
    inputs = {"prompt_ids": torch.randint(3, vocab, (4, 3), generator=g), "prompt_mask": torch.ones(4, 3).long(),
              "completion_ids": torch.randint(3, vocab, (4, 6), generator=g), "completion_mask": completion_mask,
              "advantages": torch.randn(4, generator=g), "old_per_token_logps": near(),
              "ref_per_token_logps": near(), "sampling_per_token_logps": near(),
              # 1 at padding, as TRL's generation step leaves it (the ratio of a zeroed log-prob difference)
              "importance_sampling_ratio": 1 + 0.1 * torch.rand(4, 6, generator=g) * completion_mask,
              "num_items_in_batch": completion_mask.sum().float()}
    return trainers, inputs


@pytest.mark.parametrize("loss_type", [
    "grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "vespo",
    "luspo"])  # TRL 1.16 sums luspo's masked per-token loss per sequence (with the KL term it is [B, T])
def test_grpo_loss_gradients_and_metrics_of_every_loss_type_match_trl(grpo_pair, loss_type):
    """One ``_compute_loss`` of each trainer per loss type and importance-sampling level, 2 accumulation steps: the
    loss, the weights' gradients and every metric TRL logs."""
    trainers, inputs = grpo_pair
    for level in ("token", "sequence"):
        results = []
        for trainer in trainers:
            trainer.loss_type, trainer.importance_sampling_level = loss_type, level
            trainer.current_gradient_accumulation_steps = 2
            trainer.model.train()
            trainer._metrics["train"].clear()
            params = [p for p in trainer.model.parameters() if p.requires_grad]
            loss = trainer._compute_loss(trainer.model, inputs)
            results.append((loss.item(), torch.autograd.grad(loss, params), dict(trainer._metrics["train"])))
        (loss, grads, metrics), (ref_loss, ref_grads, ref_metrics) = results[1], results[0]
        assert math.isclose(loss, ref_loss, rel_tol=RTOL, abs_tol=ATOL), (level, loss, ref_loss)
        for grad, ref in zip(grads, ref_grads, strict=True):
            assert (grad - ref).norm() <= RTOL * ref.norm() + 1e-9, level
        assert metrics.keys() == ref_metrics.keys() and len(metrics) >= 3, level
        for key, ref in ref_metrics.items():
            assert all(math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL) for a, b in zip(metrics[key], ref, strict=True)), (
                level, key, metrics[key], ref)


# --- construction --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, error, message", [
    ("torch", TypeError, "fastalign_options: expected a dict"),
    ({"beta": 1}, ValueError, "expected keys among"),
    ({"backend": "cuda"}, ValueError, "fastalign_options\\['backend'\\]"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"deterministic": 1}, TypeError, "deterministic"),
])
def test_bad_fastalign_options_are_refused_before_anything_is_built(options, error, message, tmp_path):
    with pytest.raises(error, match=message):
        fatrl.DPOTrainer(model="unused", args=None, fastalign_options=options)
