"""RLOO trainer on a tiny Llama: the rollout's advantages against an independent computation (leave-one-out over
the group, the KL to the reference model from materialized logits, reward clipping, normalization), the fused and
reference loss backends agree, a short run learns the counting task's length reward and resumes exactly, config
errors, ``fastalign rloo --example``. (The advantage function and the loss against the real TRL: test_rloo_trl.py.)"""
import math
import os

import pytest
import torch
import yaml

from fastalign.trainers import RLOOConfig, RLOOTrainer
from fastalign.trainers.config_file import example_config, trainer_config
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import tiny_llama, word_tokenizer
from helpers.trainers import command, read_jsonl, train_until_killed, weights, write_config

TASK = CountingTask()
pytestmark = pytest.mark.usefixtures("one_thread")


def length(prompts, completions):
    """A reward that varies from the start: the word count / 6."""
    return [len(c.split()) / 6 for c in completions]


def make_trainer(tmp_path, reward_funcs=length, **overrides):
    tokenizer = word_tokenizer(TASK.words)
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64)
    fields = dict(output_dir=str(tmp_path / "rloo"), learning_rate=1e-3, per_device_train_batch_size=8,
                  num_generations=4, max_completion_length=6, max_steps=2, disable_tqdm=True) | overrides
    return RLOOTrainer(model, tokenizer, TASK.prompts(32, seed=3), reward_funcs, RLOOConfig(**fields))


def materialized_logprobs(model, batch, temperature):
    """``[B, R]`` log-probs of the batch's completion tokens from the model's whole logits (0 off the completion)."""
    with torch.no_grad():
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=position_ids).logits
    width = batch.targets.shape[1]
    logp = torch.log_softmax(logits[:, -width - 1:-1].double() / temperature, -1)
    valid = batch.targets != -100
    return logp.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0].masked_fill(~valid, 0.0)


def test_rollout_advantages_match_an_independent_computation(tmp_path):
    calls = []

    def recorded(prompts, completions):  # None for prompts starting with 3: unscorable
        calls.append([None if p.startswith("3 ") else r for p, r in zip(prompts, length(prompts, completions))])
        return calls[-1]

    trainer = make_trainer(tmp_path, recorded, beta=0.5, temperature=0.9, reward_clip_range=[0.2, 0.8],
                           normalize_advantages=True, per_device_train_batch_size=16)
    with torch.no_grad():  # a reference model that differs from the policy
        for p in trainer.ref_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    threes = [i for i, p in enumerate(trainer.prompts) if p.startswith("3 ")][:1]
    others = [i for i, p in enumerate(trainer.prompts) if not p.startswith("3 ")][:3]
    batch = trainer.rollout([i for i in threes + others for _ in range(4)])
    old = materialized_logprobs(trainer.model, batch, 0.9)
    ref = materialized_logprobs(trainer.ref_model, batch, 0.9)
    torch.testing.assert_close(batch.old_logprobs.double(), old, rtol=1e-4, atol=1e-4)
    kl = (old - ref).sum(-1)
    advantages = []
    for g in range(4):
        rewards = [None if r is None else min(max(r, 0.2), 0.8) - 0.5 * float(kl[4 * g + j])
                   for j, r in enumerate(calls[0][4 * g:4 * g + 4])]
        scored = [r for r in rewards if r is not None]
        advantages += [math.nan if r is None else r - (sum(scored) - r) / (len(scored) - 1) for r in rewards]
    present = [a for a in advantages if not math.isnan(a)]
    mean = sum(present) / len(present)
    std = math.sqrt(sum((a - mean) ** 2 for a in present) / (len(present) - 1))
    want = [0.0 if math.isnan(a) else (a - mean) / (std + 1e-4) for a in advantages]
    assert want[:4] == [0.0] * 4 and len(present) == 12  # the prompt starting with 3: unscorable
    torch.testing.assert_close(batch.advantages.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4,
                               atol=1e-4)
    mask = batch.targets != -100
    assert batch.metrics["kl"] == pytest.approx(float(((old - ref) * mask).sum() / mask.sum()), rel=1e-4)
    assert batch.metrics["reward"] == pytest.approx(sum(r for r in calls[0] if r is not None) / 12, rel=1e-6)


def test_fused_and_reference_losses_agree(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.0, per_device_train_batch_size=8, epsilon_high=0.28)
    batch = trainer.rollout([i for i in range(2) for _ in range(4)])
    batch = batch._replace(old_logprobs=batch.old_logprobs + 0.15 * torch.randn_like(batch.old_logprobs)
                           * (batch.targets != -100))  # ratios off 1: some clipped
    rows = torch.arange(8)
    fused, fused_metrics = trainer.compute_loss(batch, rows)
    trainer.config.loss_backend = "reference"
    reference, reference_metrics = trainer.compute_loss(batch, rows)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    assert fused_metrics.keys() == reference_metrics.keys() and "clip_ratio/region_mean" in fused_metrics
    for key, value in reference_metrics.items():
        assert fused_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert batch.ref_logprobs is None and trainer.ref_model is None  # beta == 0: no reference model


def short(prompts, completions):
    """A reward for stopping early: 1 - the word count / 6 (about 0.15 for the random model)."""
    return [1 - len(c.split()) / 6 for c in completions]


def test_a_short_run_learns_and_resumes_exactly(tmp_path):
    """8 steps (2 iterations per generation batch, 2 micro-batches) on the stopping reward: the mean reward rises
    (0.2 to 0.9 here); the same run killed after its step-4 checkpoint and resumed ends with the same weights and the
    same metrics."""
    options = dict(max_steps=8, save_steps=4, learning_rate=2e-2, lr_scheduler_type="constant", num_iterations=2,
                   gradient_accumulation_steps=2, per_device_train_batch_size=4)
    full = make_trainer(tmp_path / "full", short, **options)
    history = full.train()
    rewards = [r["reward"] for r in history]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.3, rewards
    assert all(math.isfinite(r["loss"]) and "kl" in r and "clip_ratio/region_mean" in r for r in history)
    crashed = make_trainer(tmp_path / "resumed", short, **options)
    train_until_killed(crashed, "rollout", 4)
    resumed = make_trainer(tmp_path / "resumed", short, **options)
    resumed.train(resume_from_checkpoint=True)
    for (key, a), b in zip(weights(full.model).items(), weights(resumed.model).values()):
        assert torch.equal(a, b), key
    assert read_jsonl(os.path.join(resumed.config.output_dir, "metrics.jsonl")) == history


@pytest.mark.parametrize("field, value, error, match", [
    ("num_generations", 1, ValueError, "RLOOConfig.num_generations: expected an int >= 2"),
    ("reward_clip_range", (1.0, 0.0), ValueError, "RLOOConfig.reward_clip_range: expected min <= max"),
    ("epsilon", -0.5, ValueError, "RLOOConfig.epsilon: expected a number >= 0"),
    ("normalize_advantages", "yes", TypeError, "RLOOConfig.normalize_advantages: expected bool"),
])
def test_config_errors(field, value, error, match):
    with pytest.raises(error, match=match):
        RLOOConfig(**{field: value})


def test_the_example_parses_and_runs(tmp_path, capsys):
    spec = yaml.safe_load(example_config("rloo"))
    config = trainer_config(RLOOConfig, spec["config"], "rloo.yaml")
    assert config.num_generations >= 2 and spec["reward"] == "counting"
    assert command("rloo", "--example") == 0
    assert yaml.safe_load(capsys.readouterr().out) == spec
    assert command("rloo", "--config", write_config(tmp_path, "rloo", model="tiny", tokenizer="counting")) == 0
    records = read_jsonl(tmp_path / "rloo" / "metrics.jsonl")
    assert [r["step"] for r in records if "reward" in r] == [1, 2, 3]
