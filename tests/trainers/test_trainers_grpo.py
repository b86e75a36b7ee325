"""GRPO trainer on a tiny Llama: rewards and advantages against an independent computation (group / batch / none,
weighted reward functions, None scores), truncated completions, num_iterations, fused vs reference backend, the
reference model only with beta != 0, reward models, config errors. Exact resume and 2 ranks vs one process are in
test_trainers.py and test_trainers_distributed.py (parametrized over the trainers)."""
import math
import os
import statistics

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig

from fastalign.trainers import GRPOConfig
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import word_tokenizer
from helpers.noise import near, recorded_calls
from helpers.trainers import capture_gradients, length, make_trainer

TASK = CountingTask()
pytestmark = pytest.mark.usefixtures("one_thread")


def first_number(prompt: str) -> int:
    return int(prompt.split()[0])


class Recorded:
    """Two reward functions that record what they returned: ``words`` (the completion's word count, None for
    prompts starting with an even number) and ``parity`` (of the prompt's first number: the same for a whole
    group)."""

    def __init__(self):
        self.calls = []

    def words(self, prompts, completions):
        scores = [None if first_number(p) % 2 == 0 else float(len(c.split())) for p, c in zip(prompts, completions)]
        self.calls.append(("words", scores))
        return scores

    def parity(self, prompts, completions):
        scores = [float(first_number(p) % 3) for p in prompts]
        self.calls.append(("parity", scores))
        return scores


def expected_advantages(rewards: list[list[float | None]], weights: list[float], group: int, scale: str):
    """TRL's advantages and reward metrics, in float64 Python: weighted sums skipping None, minus the group mean,
    over (unbiased std + 1e-4) of the group or the batch; ``reward_std`` the std of the rewards over the batch."""
    totals = [sum(w * r for w, r in zip(weights, row) if r is not None) for row in rewards]
    groups = [totals[i:i + group] for i in range(0, len(totals), group)]
    means = [statistics.fmean(g) for g in groups for _ in g]
    stds = [statistics.stdev(g) for g in groups for _ in g] if scale != "batch" else \
        [statistics.stdev(totals)] * len(totals)
    advantages = [(t - m) / (s + 1e-4) if scale != "none" else t - m for t, m, s in zip(totals, means, stds)]
    metrics = {"reward": statistics.fmean(totals), "reward_std": statistics.stdev(totals),
               "frac_reward_zero_std": statistics.fmean(float(s == 0) for s in stds)}
    return advantages, metrics


@pytest.mark.parametrize("scale_rewards, scale", [("group", "group"), ("batch", "batch"), ("none", "none"),
                                                  (True, "group"), (False, "none")])
def test_rewards_and_advantages_match_an_independent_computation(tmp_path, scale_rewards, scale):
    recorded = Recorded()
    trainer = make_trainer(tmp_path, [recorded.words, recorded.parity], num_generations=4,
                           per_device_train_batch_size=16, reward_weights=[2.0, -0.5], scale_rewards=scale_rewards)
    assert trainer.config.scale_rewards == scale
    even = [i for i, p in enumerate(trainer.prompts) if first_number(p) % 2 == 0]
    odd = [i for i, p in enumerate(trainer.prompts) if first_number(p) % 2 == 1]
    batch = trainer.rollout([i for i in even[:2] + odd[:2] for _ in range(4)])  # sampled: lengths vary in a group
    (_, words), (_, parity) = recorded.calls
    rewards = list(zip(words, parity))
    assert any(w is None for w in words) and any(w is not None for w in words)
    advantages, metrics = expected_advantages(rewards, [2.0, -0.5], 4, scale)
    torch.testing.assert_close(batch.advantages.double(), torch.tensor(advantages, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    assert 0 < metrics["frac_reward_zero_std"] < 1 or scale == "batch"
    for key, value in metrics.items():
        assert batch.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    present = [w for w in words if w is not None]
    assert batch.metrics["rewards/words/mean"] == pytest.approx(statistics.fmean(present), rel=1e-6)
    assert batch.metrics["rewards/words/std"] == pytest.approx(statistics.stdev(present), rel=1e-5)
    assert batch.metrics["rewards/parity/mean"] == pytest.approx(statistics.fmean(parity), rel=1e-6)
    lengths = (batch.targets != -100).sum(-1).float()
    assert batch.metrics["completions/mean_length"] == pytest.approx(float(lengths.mean()))
    assert batch.metrics["completions/max_length"] == float(lengths.max())
    assert batch.old_logprobs is None and batch.ref_logprobs is None  # on-policy, beta == 0


def test_mask_truncated_completions_drops_their_loss_but_counts_their_tokens(tmp_path):
    batches = {}
    for masked in (False, True):
        trainer = make_trainer(tmp_path, scripted=True, per_device_train_batch_size=16,
                               mask_truncated_completions=masked)
        batches[masked] = trainer.rollout(list(range(16)))  # some scripted responses end without EOS
    full, masked = batches[False], batches[True]
    kept = full.targets != -100
    truncated = ~(full.targets == trainer.tokenizer.eos_token_id).any(-1)
    assert truncated.any() and (~truncated).any()
    assert (masked.targets[truncated] == -100).all()
    assert torch.equal(masked.targets[~truncated], full.targets[~truncated])
    assert float(full.num_items_in_batch) == float(masked.num_items_in_batch) == float(kept.sum())
    assert full.metrics["completions/clipped_ratio"] == pytest.approx(float(truncated.float().mean()))


def test_num_iterations_reuses_each_generation_batch(tmp_path):
    """num_iterations=2: one generation per step, two optimizer steps on it; the first one has the gradient of the
    on-policy run (old log-probs equal the current ones), the second does not (the policy moved)."""
    runs = {}
    for iterations in (1, 2):
        trainer = make_trainer(tmp_path / str(iterations), length, num_iterations=iterations, max_steps=2,
                               lr_scheduler_type="constant", learning_rate=3e-2)
        calls, sample = [], trainer.sample
        trainer.sample = lambda queries: calls.append(len(queries)) or sample(queries)
        rollouts, rollout = [], trainer.rollout
        trainer.rollout = lambda indices: rollouts.append(rollout(indices)) or rollouts[-1]
        gradients = capture_gradients(trainer)
        history = trainer.train()
        runs[iterations] = calls, rollouts, gradients, history
    calls, rollouts, gradients, history = runs[2]
    assert calls == [8, 8] and len(gradients) == 4
    assert runs[1][1][0].old_logprobs is None
    old = rollouts[0].old_logprobs
    assert old is not None and old.shape == rollouts[0].targets.shape
    assert (old[rollouts[0].targets == -100] == 0).all() and (old[rollouts[0].targets != -100] < 0).all()
    for a, b in zip(gradients[0], runs[1][2][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(gradients[1], gradients[0]))
    assert [r["step"] for r in history] == [1, 2]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "cispo"])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, loss_type):
    """dapo/cispo: token sums over the step's tokens; grpo/dr_grpo: micro-batch losses over the accumulation steps.
    Either way 2 micro-batches of 4 give the gradients of one of 8."""
    gradients = []
    for micro, accumulation in ((8, 1), (4, 2)):
        trainer = make_trainer(tmp_path / str(micro), length, per_device_train_batch_size=micro,
                               gradient_accumulation_steps=accumulation, loss_type=loss_type, num_iterations=2)
        gradients.append(capture_gradients(trainer))
        trainer.train()
    assert len(gradients[0]) == 4 and all(any(g.abs().sum() > 0 for g in step) for step in gradients[0])
    for big, accumulated in zip(*gradients):
        for a, b in zip(big, accumulated):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max",
                "clip_ratio/region_mean", "cispo_clip_ratio")


def fused_and_reference_losses(tmp_path, **overrides):
    """Loss, metrics and gradients of one micro-batch on both backends, after a perturbation of the policy (ratios
    away from 1, some clipped), and the fused op's call (its args, kwargs and output)."""
    trainer = make_trainer(tmp_path, length, per_device_train_batch_size=16, **overrides)
    model = trainer.model
    batch = trainer.rollout([i for i in range(4) for _ in range(4)])
    torch.manual_seed(2)  # a perturbation that clips some ratios in every case below (not with seeds 0, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    results = {}
    with recorded_calls("fused_linear_grpo_loss") as calls:
        for backend in ("fused", "reference"):
            trainer.config.loss_backend = backend
            loss, metrics = trainer.compute_loss(batch, torch.arange(16))
            loss.backward()
            results[backend] = loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
    return results, calls[0], trainer.config.loss_config


def ratio_near_a_clip_edge(call, config) -> bool:
    """Whether an importance ratio of the fused op's call is within float noise (1e-4, relative) of a clip edge:
    there the clip metrics of the two backends may differ."""
    (_, _, targets, _), options, out = call
    mask = targets != -100
    old = options["old_logprobs"]
    log_ratio = (out.logprobs - (out.logprobs if old is None else old)).masked_fill(~mask, 0.0)
    if config.importance_sampling_level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        mask = mask.any(-1, keepdim=True)
    edges = [config.eps_high] if config.loss_type == "cispo" else [1 - config.epsilon, 1 + config.eps_high]
    return bool(near(log_ratio.exp(), edges, 1e-4)[mask].any())


@pytest.mark.parametrize("overrides", [
    dict(num_iterations=2),
    dict(num_iterations=2, loss_type="grpo", beta=0.1, epsilon_high=0.28, gradient_accumulation_steps=2),
    dict(num_iterations=2, loss_type="dr_grpo", importance_sampling_level="sequence", delta=1.5),
    dict(num_iterations=2, loss_type="cispo", epsilon_high=1.1, entropy_coef=0.01, temperature=0.8),
    dict(loss_type="vespo", beta=0.05, use_bias_correction_kl=True),
])
def test_fused_and_reference_backends_agree(tmp_path, overrides):
    results, call, config = fused_and_reference_losses(tmp_path, **overrides)
    (loss_f, metrics_f, grads_f), (loss_r, metrics_r, grads_r) = results.values()
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-6)
    assert metrics_f.keys() == metrics_r.keys() and {"entropy", "loss"} <= metrics_f.keys()
    assert config.loss_type == "vespo" or metrics_f.get("clip_ratio/region_mean", metrics_f.get("cispo_clip_ratio")) > 0
    skipped = set(CLIP_METRICS) if ratio_near_a_clip_edge(call, config) else set()
    for key in metrics_f.keys() - skipped:
        assert math.isnan(metrics_f[key]) == math.isnan(metrics_r[key]), key
        if not math.isnan(metrics_r[key]):
            assert metrics_f[key] == pytest.approx(metrics_r[key], rel=1e-4, abs=1e-5), key
    assert any(g.abs().sum() > 0 for g in grads_f)
    for g_f, g_r in zip(grads_f, grads_r):
        torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-5)


def test_every_loss_option_reaches_the_op(tmp_path):
    """The op's own tests check each option's math; here: the trainer hands every one of them (and its inputs) over
    as configured. (The top-entropy mask is left out of the backend comparison above: a random tiny model's
    entropies all sit within 0.05 of log V, so the threshold is within float noise of some token.)"""
    options = dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=0.1, epsilon_high=0.3, delta=2.0,
                   beta=0.02, use_bias_correction_kl=True, off_policy_mask_threshold=0.5, top_entropy_quantile=0.8,
                   entropy_coef=0.01, sapo_temperature_pos=0.9, sapo_temperature_neg=1.2, vespo_k_pos=1.5,
                   vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5)
    trainer = make_trainer(tmp_path, length, num_iterations=2, temperature=0.7, max_completion_length=5, **options)
    batch = trainer.rollout([0, 0, 0, 0])
    with recorded_calls("fused_linear_grpo_loss") as calls:
        trainer.compute_loss(batch, torch.tensor([3, 1]))
    ((_, _, targets, advantages), kwargs, _), = calls
    assert {k: kwargs[k] for k in options} == options and kwargs["max_completion_length"] == 5
    assert kwargs["temperature"] == 0.7 and float(kwargs["num_items_in_batch"]) == float((batch.targets != -100).sum())
    assert torch.equal(targets, batch.targets[[3, 1]]) and torch.equal(advantages, batch.advantages[[3, 1]])
    assert torch.equal(kwargs["old_logprobs"], batch.old_logprobs[[3, 1]])
    assert torch.equal(kwargs["ref_logprobs"], batch.ref_logprobs[[3, 1]])


def test_the_reference_model_exists_only_with_beta(tmp_path, monkeypatch):
    import fastalign.trainers.rollout as rollout

    copy = rollout.frozen_copy
    monkeypatch.setattr(rollout, "frozen_copy", lambda model: pytest.fail("reference model created with beta=0"))
    trainer = make_trainer(tmp_path)
    assert trainer.ref_model is None and trainer.ref_engine is None
    history = trainer.train()
    assert "kl" not in history[-1]
    monkeypatch.setattr(rollout, "frozen_copy", copy)
    trainer = make_trainer(tmp_path, beta=0.04)
    assert trainer.ref_model is not trainer.model
    batch = trainer.rollout([0, 0, 0, 0])
    assert batch.ref_logprobs is not None and batch.ref_logprobs.shape == batch.targets.shape
    _, metrics = trainer.compute_loss(batch, torch.arange(4))
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference


def test_several_reward_functions_and_a_reward_model(tmp_path):
    tok = word_tokenizer(TASK.words)
    reward_model = AutoModelForSequenceClassification.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id))
    trainer = make_trainer(tmp_path, [TASK.score, reward_model], reward_weights=[1.0, 0.5])
    history = trainer.train()
    names = {"rewards/score/mean", "rewards/LlamaForSequenceClassification/mean"}
    assert names <= history[-1].keys()
    assert history[-1]["rewards/LlamaForSequenceClassification/mean"] != 0
    assert history[-1]["reward"] == pytest.approx(history[-1]["rewards/score/mean"]
                                                  + 0.5 * history[-1]["rewards/LlamaForSequenceClassification/mean"],
                                                  rel=1e-5, abs=1e-6)
    assert os.path.isfile(tmp_path / "grpo" / "model.safetensors")


def test_grpo_raises_a_simple_reward(tmp_path):
    def sevens(prompts, completions):  # the share of "7" among the words of each completion
        return [c.split().count("7") / max(len(c.split()), 1) for c in completions]

    trainer = make_trainer(tmp_path, sevens, prompts=256, max_steps=30, per_device_train_batch_size=32,
                           num_generations=8, learning_rate=3e-3, lr_scheduler_type="constant")
    rewards = [r["reward"] for r in trainer.train()]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3


@pytest.mark.parametrize("field, value, error, match", [
    ("scale_rewards", "prompt", ValueError, "GRPOConfig.scale_rewards: expected one of"),
    ("num_generations", 1, ValueError, "GRPOConfig.num_generations: expected an int >= 2"),
    ("loss_type", "ppo", ValueError, "GRPOConfig.loss_type: expected one of"),
    ("loss_type", "dr_grpo", None, None),  # max_completion_length is passed on: dr_grpo's normalizer
    ("top_p", 0.0, ValueError, "GRPOConfig.top_p: expected a number in"),
    ("reward_weights", [1, "x"], ValueError, "GRPOConfig.reward_weights: expected None or a list of numbers"),
    ("epsilon_high", "high", TypeError, "GRPOConfig.epsilon_high: expected float or None"),
])
def test_config_errors_name_the_field(field, value, error, match):
    if error is None:
        assert GRPOConfig(**{field: value}).loss_config.max_completion_length == 512
        return
    with pytest.raises(error, match=match):
        GRPOConfig(**{field: value})


def test_trainer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"reward_weights: expected 2 weights \(one per reward function\)"):
        make_trainer(tmp_path, [TASK.score, TASK.score], reward_weights=[1.0])
    with pytest.raises(TypeError, match="reward_funcs: expected a callable"):
        make_trainer(tmp_path, [])
    with pytest.raises(ValueError, match="expected a divisor of the step's 6 completions .*, got 4"):
        make_trainer(tmp_path, per_device_train_batch_size=6).train()
    with pytest.raises(ValueError, match="reward_funcs\\[0\\]: returned 1 scores for 4 completions"):
        make_trainer(tmp_path, lambda p, c: [1.0]).rollout([0, 0, 0, 0])
