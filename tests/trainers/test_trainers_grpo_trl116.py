"""TRL 1.16's GRPOTrainer features in fastalign's GRPOTrainer: ``multi_objective_aggregation`` (GDPO) and the
unscorable completions in ``group_advantages`` against a float64 transcription of TRL 1.16's
``_generate_and_score_completions``; ``use_adaptive_entropy``'s gate and update rule per optimizer step, and its
state through a checkpoint."""
import math
import shutil

import pytest
import torch

from fastalign.trainers.rollout import group_advantages
from helpers.trainers import length, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def trl_nanstd(x, dim=None, keepdim=False):  # trl/trainer/utils.py, TRL 1.16
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(count / 1.0, float("nan")))
    std = torch.sqrt(variance * correction)
    if keepdim:
        return std
    return std.squeeze(dim) if dim is not None else std.squeeze()


def trl_advantages(rewards_per_func, reward_weights, num_generations, scale_rewards, aggregation):
    """TRL 1.16's GRPOTrainer._generate_and_score_completions, from rewards_per_func to the advantages and the
    reward metrics (one process)."""
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if scale_rewards in ["group", "none"]:
            std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = trl_nanstd(rewards).expand_as(rewards)
        advantages = rewards - mean_grouped_rewards
        if scale_rewards != "none":
            advantages = advantages / (std_rewards + 1e-4)
    else:
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = trl_nanstd(grouped, dim=1, keepdim=True)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.shape[1])
        rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = trl_nanstd(rewards).expand_as(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    advantages = torch.nan_to_num(advantages, nan=0.0)
    logged = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    logged[unscorable_mask] = torch.nan
    return advantages, {"reward": torch.nanmean(logged), "reward_std": trl_nanstd(logged),
                        "frac_reward_zero_std": is_std_zero.float().mean()}


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl(aggregation, scale_rewards):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, 3, generator=g, dtype=torch.float64)
    rewards[1, 0] = rewards[7, 2] = float("nan")  # a function that does not apply
    rewards[5] = float("nan")  # unscorable: every function skipped it
    rewards[8:12, 1] = 0.25  # a constant function in the last group (zero std)
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    got, metrics = group_advantages(rewards, weights, 4, scale_rewards, aggregation)
    want, want_metrics = trl_advantages(rewards, weights, 4, scale_rewards, aggregation)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[5] == 0 and float(want.abs().max()) > 0.5
    for key, value in want_metrics.items():
        torch.testing.assert_close(metrics[key].double(), value.double(), rtol=1e-12, atol=1e-12, msg=key)


def test_gdpo_differs_from_summing_first():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(8, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0], dtype=torch.float64)
    weights = torch.ones(2, dtype=torch.float64)
    summed, _ = group_advantages(rewards, weights, 4, "group", "sum_then_normalize")
    gdpo, _ = group_advantages(rewards, weights, 4, "group", "normalize_then_sum")
    assert float((summed - gdpo).abs().max()) > 0.1
    with pytest.raises(ValueError, match="multi_objective_aggregation: expected one of"):
        group_advantages(rewards, weights, 4, "group", "sum")


def test_adaptive_entropy_gate_and_update_rule(tmp_path):
    """The bonus applies the last step's coefficient only while that step's entropy is at most entropy_target;
    after each optimizer step the coefficient moves by delta towards more bonus below the target, less above it,
    within [min, max] (TRL 1.16's rule)."""
    trainer = make_trainer(tmp_path, length, loss_type="grpo", entropy_coef=0.3, use_adaptive_entropy=True,
                           entropy_coef_delta=0.1, entropy_coef_max=0.45, entropy_target=100.0, max_steps=3,
                           num_iterations=2)
    trainer.begin(3, 6, 8, None)
    batch = trainer.rollout(list(range(2)) * 4)
    rows = batch.micro_batches[0]
    off, _ = trainer.compute_loss(batch, rows)  # first step: no entropy measured yet, no bonus
    total, count = trainer.entropy_window.tolist()
    trainer.last_world_entropy = 0.5
    on, metrics = trainer.compute_loss(batch, rows)
    assert "policy_loss" in metrics and metrics["policy_loss"] == pytest.approx(off.item(), rel=1e-5)
    torch.testing.assert_close(off - on, torch.tensor(0.3 * total / count), rtol=1e-5, atol=1e-7)
    trainer.entropy_window.zero_()

    trainer.config.entropy_coef_delta, trainer.last_world_entropy = 0.1, math.inf
    coefs = []
    for _ in range(3):  # entropy (a few nats) <= 100: up by 0.1, capped at 0.45
        trainer.compute_loss(batch, rows)
        coefs.append(trainer.update_entropy_coef()["entropy_coef"])
    assert coefs == pytest.approx([0.4, 0.45, 0.45])
    assert 0 < trainer.last_world_entropy < 100
    trainer.config.entropy_target = 0.0  # entropy > 0: down by 0.1 to the floor 0
    for want in (0.35, 0.25, 0.15, 0.05, 0.0):
        trainer.compute_loss(batch, rows)
        assert trainer.update_entropy_coef()["entropy_coef"] == pytest.approx(want)


def test_adaptive_entropy_trains_logs_and_resumes(tmp_path):
    kw = dict(loss_type="dapo", entropy_coef=0.0, use_adaptive_entropy=True, entropy_coef_delta=0.01,
              entropy_target=100.0, save_steps=2, max_steps=3)
    trainer = make_trainer(tmp_path, length, **kw)
    records = trainer.train()
    assert [r["entropy_coef"] for r in records if "entropy_coef" in r] == pytest.approx([0.01, 0.02, 0.03])
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "grpo" / "checkpoint-2", resumed_dir / "checkpoint-2")  # as if stopped after step 2
    resumed = make_trainer(tmp_path, length, **{**kw, "output_dir": str(resumed_dir)})
    more = resumed.train(resume_from_checkpoint=True)
    assert more[-1]["entropy_coef"] == pytest.approx(0.03)  # continued from the checkpoint's 0.02


def test_completions_end_at_any_of_the_models_eos_ids(tmp_path):
    """TRL 1.16 stops a completion at the tokenizer's EOS or any id of the model's ``generation_config``."""
    trainer = make_trainer(tmp_path, length)
    eos, word = trainer.tokenizer.eos_token_id, trainer.tokenizer.convert_tokens_to_ids("7")
    trainer.model.generation_config.eos_token_id = [word]
    trainer = type(trainer)(trainer.model, trainer.tokenizer, trainer.prompts, length, trainer.config)
    assert trainer.eos_token_ids == [eos, word] and trainer.generation_config.eos_token_id == [eos, word]
    samples = trainer.sample(trainer.queries[:16])
    ends = []
    for response, mask in zip(samples.response, samples.mask):
        kept = response[mask].tolist()
        assert all(t not in (eos, word) for t in kept[:-1])  # nothing after the first of them
        ends.append(kept[-1])
    assert word in ends and samples.has_eos[torch.tensor(ends) == word].all()


@pytest.mark.parametrize("field, value, match", [
    ("multi_objective_aggregation", "mean", "GRPOConfig.multi_objective_aggregation: expected one of"),
    ("entropy_coef_max", -1.0, "GRPOConfig.entropy_coef_max: expected a number >= entropy_coef_min"),
    ("entropy_coef_delta", -0.1, "GRPOConfig.entropy_coef_delta: expected a number >= 0"),
    ("entropy_target", float("nan"), "GRPOConfig.entropy_target: expected a finite number"),
])
def test_config_errors(field, value, match):
    from fastalign.trainers import GRPOConfig
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**{field: value})
