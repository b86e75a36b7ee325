"""PPO, GRPO and RLOO compute the rollout's old log-probs as the first update's forward (the same micro-batches, in the same
order), so with ``deterministic=True`` (batch-invariant fused ops) the first update is exactly on-policy: the op's
log-probs equal the old ones bit for bit, ``policy/ratio_mean`` is exactly 1.0 and ``policy/clipfrac`` exactly 0
(#16). Later updates, after an optimizer step, differ: the spy sees the live log-probs."""
import pytest
import torch

from fastalign.trainers import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, RLOOConfig, RLOOTrainer, losses
from helpers.trainers import TASK, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = [{}, {"gradient_checkpointing": True, "bf16": True}]


def spy(monkeypatch, name):
    """Record ``(targets, old_logprobs, kwargs, output)`` of every call of ``losses.<name>`` (a fused op)."""
    calls, original = [], getattr(losses, name)

    def record(hidden, weight, targets, *args, **kwargs):
        out = original(hidden, weight, targets, *args, **kwargs)
        old = args[0] if name == "fused_linear_ppo_loss" else kwargs["old_logprobs"]
        calls.append((targets, old, kwargs, out))
        return out

    monkeypatch.setattr(losses, name, record)
    return calls


def assert_on_policy(call):
    targets, old, kwargs, out = call
    assert kwargs["deterministic"] is True
    assert (targets != -100).sum() > 0
    assert torch.equal(out.logprobs, old)


@pytest.mark.parametrize("options", OPTIONS, ids=["fp32", "ckpt-bf16"])
def test_ppo_first_mini_batch_is_exactly_on_policy(tmp_path, monkeypatch, options):
    calls = spy(monkeypatch, "fused_linear_ppo_loss")
    model, tok = tiny()
    config = PPOConfig(output_dir=str(tmp_path / "ppo"), learning_rate=1e-2, per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, num_mini_batches=2, num_ppo_epochs=2, max_steps=2,
                       response_length=6, temperature=1.0, deterministic=True, disable_tqdm=True, **options)
    PPOTrainer(model, tok, TASK.prompts(32, seed=3), TASK.score, config).train()
    per_step = 2 * 2 * 2  # epochs x mini-batches x micro-batches
    assert len(calls) == 2 * per_step
    for step in range(2):
        first = calls[step * per_step:step * per_step + 2]  # the first mini-batch: 2 micro-batches, one update
        for call in first:
            assert_on_policy(call)
            metrics = call[3].metrics
            assert float(metrics["policy/ratio_mean"]) == 1.0 and float(metrics["policy/clipfrac"]) == 0.0
        after_update = calls[step * per_step + 2]
        assert not torch.equal(after_update[3].logprobs, after_update[1])


@pytest.mark.parametrize("kind, options", [("grpo", OPTIONS[0]), ("grpo", OPTIONS[1]), ("rloo", OPTIONS[0])],
                         ids=["grpo-fp32", "grpo-ckpt-bf16", "rloo-fp32"])
def test_grpo_first_iteration_is_exactly_on_policy(tmp_path, monkeypatch, kind, options):
    """RLOO too: its sequence ratio (sums of the same log-probs) is exactly 1 in the first iteration."""
    calls = spy(monkeypatch, f"fused_linear_{kind}_loss")
    model, tok = tiny()
    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
    config = config_class(output_dir=str(tmp_path / kind), learning_rate=1e-2, per_device_train_batch_size=4,
                          gradient_accumulation_steps=2, num_generations=4, max_completion_length=6, max_steps=2,
                          num_iterations=2, deterministic=True, disable_tqdm=True, **options)
    trainer_class(model, tok, TASK.prompts(16, seed=3), lambda p, c: [len(x) / 10 for x in c], config).train()
    assert len(calls) == 2 * 2 * 2  # steps x iterations x micro-batches
    for step in range(2):
        for call in calls[step * 4:step * 4 + 2]:  # the first iteration: one update over 2 micro-batches
            assert_on_policy(call)
            metrics = call[3].metrics
            assert all(float(metrics[f"clip_ratio/{k}"]) == 0.0 for k in ("low_mean", "high_mean", "region_mean"))
        after_update = calls[step * 4 + 2]
        assert not torch.equal(after_update[3].logprobs, after_update[1])


def test_deterministic_must_be_a_bool_or_none():
    for config in (PPOConfig, GRPOConfig, RLOOConfig):
        with pytest.raises(TypeError, match=rf"{config.__name__}.deterministic: expected bool or None, got 'yes'"):
            config(deterministic="yes")
