"""End-to-end runs of the DPO and PPO trainers on a tiny model: learning, metrics, backends, gradient accumulation,
no lm_head forward, LoRA, reward model, exact resume, non-finite steps skipped."""
import math
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from fastalign import hf
from fastalign.objectives.dpo import DPO_LOSS_TYPES
from fastalign.objectives.ppo import clipped_policy_loss
from fastalign.trainers import DPOTrainer, GRPOConfig, GRPOTrainer, PPOTrainer
from helpers.noise import SEPARATED, assert_share_close, near, recorded_calls
from helpers.trainers import (TASK, capture_gradients, dpo_config, ppo_config, read_jsonl, tiny, train_until_killed,
                              weights)

DPO_METRICS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "grad_norm", "learning_rate", "epoch"}
PPO_METRICS = {"objective/kl", "objective/entropy", "objective/scores", "objective/non_score_reward",
               "objective/rlhf_reward", "policy/clipfrac", "policy/approxkl", "loss/policy", "loss/value",
               "val/vpred", "val/clipfrac", "val/num_eos_tokens", "grad_norm", "learning_rate", "episode"}


pytestmark = pytest.mark.usefixtures("one_thread")


def fail_on_lm_head(model):
    def fail(*_):
        if not getattr(model, "generating", False):
            raise AssertionError("lm_head forward called outside generation")

    return hf.unwrap_model(model).get_output_embeddings().register_forward_hook(fail)


# --- DPO -------------------------------------------------------------------------------------------------------

def test_dpo_learns_the_preference_and_logs_trl_metrics(tmp_path):
    model, tok = tiny()
    config = dpo_config(tmp_path, max_steps=60, per_device_train_batch_size=16, rpo_alpha=1.0, eval_steps=30,
                        warmup_ratio=0.1, save_steps=30, learning_rate=1e-2)
    trainer = DPOTrainer(model, tok, TASK.preference_data(960, seed=1), config,
                         eval_dataset=TASK.preference_data(64, seed=2))
    handle = fail_on_lm_head(model)
    history = trainer.train()
    handle.remove()
    assert read_jsonl(os.path.join(config.output_dir, "metrics.jsonl")) == history
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 61)) and [r["step"] for r in evals] == [30, 60]
    assert DPO_METRICS | {"nll_loss"} <= set(train[-1])
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] > 0
    assert train[-1]["loss"] < train[0]["loss"] / 2
    assert os.path.isfile(os.path.join(config.output_dir, "checkpoint-30", "trainer_state.pt"))
    reloaded = hf.load_pretrained(config.output_dir)
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_fused_and_reference_backends_agree(tmp_path, loss_type):
    model, tok = tiny()
    data = TASK.preference_data(8, seed=1)
    smoothing = {"sigmoid": 0.1, "robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0)
    trainers = {backend: DPOTrainer(model, tok, data, dpo_config(tmp_path, loss_backend=backend, loss_type=loss_type,
                                                                 label_smoothing=smoothing, rpo_alpha=0.5))
                for backend in ("fused", "reference")}
    refs = {backend: t.reference_logps(t.train_pairs, [list(range(8))]) for backend, t in trainers.items()}
    with torch.no_grad():  # move the policy away from the reference, so that rewards are not all 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    results = {}
    with recorded_calls("fused_linear_dpo_loss") as calls:  # the fused backend's call
        for backend, trainer in trainers.items():
            loss, metrics = trainer.compute_loss(trainer.batch(trainer.train_pairs, list(range(8)), refs[backend]))
            loss.backward()
            results[backend] = loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
    (loss_f, metrics_f, grads_f), (loss_r, metrics_r, grads_r) = results.values()
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-6)
    assert metrics_f.keys() == metrics_r.keys() and "nll_loss" in metrics_f
    for key in metrics_f.keys() - {"rewards/accuracies"}:
        assert metrics_f[key] == pytest.approx(metrics_r[key], rel=1e-4, abs=1e-5), key
    (_, _, out), = calls  # accuracies: the share of positive margins, up to the margins within noise of 0
    margins = out.chosen_rewards - out.rejected_rewards
    assert_share_close(metrics_r["rewards/accuracies"], margins > 0, near(margins, [0.0], SEPARATED), "accuracies")
    assert metrics_f["rewards/accuracies"] == pytest.approx(float((margins > 0).double().mean()))
    assert any(g.abs().sum() > 0 for g in grads_f)
    for g_f, g_r in zip(grads_f, grads_r):
        torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-5)


def test_dpo_gradient_accumulation_matches_one_big_batch(tmp_path):
    grads = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model, tok = tiny()
        config = dpo_config(tmp_path / str(accumulation), per_device_train_batch_size=batch_size,
                            gradient_accumulation_steps=accumulation, max_steps=2)
        trainer = DPOTrainer(model, tok, TASK.preference_data(32, seed=1), config)
        grads.append(capture_gradients(trainer))
        trainer.train()
    for big, accumulated in zip(*grads):
        for a, b in zip(big, accumulated):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dpo_with_lora_trains_only_the_adapters_and_never_calls_the_lm_head(tmp_path):
    peft = pytest.importorskip("peft")
    base, tok = tiny()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = weights(model)
    handle = fail_on_lm_head(model)
    DPOTrainer(model, tok, TASK.preference_data(32, seed=1), dpo_config(tmp_path, max_steps=3)).train()
    handle.remove()
    changed = {k for k, v in weights(model).items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert os.path.isfile(os.path.join(tmp_path, "dpo", "adapter_model.safetensors"))


# --- PPO -------------------------------------------------------------------------------------------------------

def test_ppo_runs_logs_trl_metrics_and_never_calls_the_lm_head_outside_generation(tmp_path):
    model, tok = tiny()
    generate = model.generate

    def generate_allowed(*args, **kwargs):
        model.generating = True
        try:
            return generate(*args, **kwargs)
        finally:
            model.generating = False

    model.generate = generate_allowed
    handle = fail_on_lm_head(model)
    config = ppo_config(tmp_path, missing_eos_penalty=1.0, num_mini_batches=2, gradient_accumulation_steps=2,
                        per_device_train_batch_size=4, eval_steps=2, per_device_eval_batch_size=16)
    trainer = PPOTrainer(model, tok, TASK.prompts(64, seed=3), TASK.score, config,
                         eval_dataset=TASK.prompts(16, seed=4, heldout=True))
    history = trainer.train()
    handle.remove()
    train = [r for r in history if "objective/scores" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and PPO_METRICS <= set(train[-1])
    assert [r["step"] for r in history if "eval_objective/scores" in r] == [2, 3]
    assert train[-1]["episode"] == 3 * 16
    assert hf.get_value_head(model) is trainer.value_head
    assert os.path.isfile(os.path.join(config.output_dir, hf.VALUE_HEAD_FILE))
    assert read_jsonl(os.path.join(config.output_dir, "metrics.jsonl")) == history


def test_ppo_with_lora_trains_the_adapters_and_the_value_head(tmp_path):
    peft = pytest.importorskip("peft")
    base, tok = tiny()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    hf.attach_value_head(model)
    before = weights(model)
    trainer = PPOTrainer(model, tok, TASK.prompts(32, seed=3), TASK.score, ppo_config(tmp_path, max_steps=2))
    trainer.train()
    after = weights(model)
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert any("lora_" in k for k in changed) and any("value_head" in k for k in changed)
    assert all("lora_" in k or "value_head" in k for k in changed)
    assert os.path.isfile(os.path.join(tmp_path, "ppo", hf.VALUE_HEAD_FILE))


def test_dpo_reference_logps_only_for_the_steps_run(tmp_path):
    """Reference forwards only for the pairs of the steps a run does (a resumed run: those after its checkpoint),
    and the same numbers as a reference pass over the whole dataset before training."""
    model, tok = tiny()
    config = dpo_config(tmp_path, max_steps=3, save_steps=2, per_device_train_batch_size=4,
                        gradient_accumulation_steps=2)  # 8 of 64 pairs per step
    trainer = DPOTrainer(model, tok, TASK.preference_data(64, seed=1), config)
    eager = trainer.reference_logps(trainer.train_pairs, [list(range(i, i + 8)) for i in range(0, 64, 8)])

    def run(trainer, steps, **resume):
        with recorded_calls("token_logprobs") as forwards, recorded_calls("fused_linear_dpo_loss") as calls:
            trainer.train(**resume)
        assert sum(args[3].shape[0] for args, _, _ in forwards) == 2 * 8 * len(steps)  # chosen + rejected rows
        used = [i for step in steps for batch in trainer.step_indices(step) for i in batch]
        got = torch.cat([kw["ref_logps"] for _, kw, _ in calls], 1)
        torch.testing.assert_close(got, eager[:, used], rtol=1e-5, atol=1e-5)

    run(trainer, [0, 1, 2])
    resumed = DPOTrainer(tiny()[0], tok, TASK.preference_data(64, seed=1), config)
    run(resumed, [2], resume_from_checkpoint=os.path.join(config.output_dir, "checkpoint-2"))

def test_ppo_fused_and_reference_backends_agree(tmp_path):
    model, tok = tiny()
    trainers = {backend: PPOTrainer(model, tok, TASK.prompts(16, seed=3), TASK.score,
                                    ppo_config(tmp_path, loss_backend=backend, per_device_train_batch_size=16))
                for backend in ("fused", "reference")}
    rollout = trainers["fused"].rollout(list(range(16)))
    with torch.no_grad():  # ratios away from 1 (some clipped), values away from the old ones
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    results = []
    with recorded_calls("fused_linear_ppo_loss") as calls:  # the fused backend's call
        for trainer in trainers.values():
            loss, metrics = trainer.compute_loss(rollout, torch.arange(16))
            loss.backward()
            results.append((loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]))
            model.zero_grad()
    (loss_f, metrics_f, grads_f), (loss_r, metrics_r, grads_r) = results
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-6)
    assert metrics_f["policy/clipfrac"] > 0 and metrics_f["val/clipfrac"] > 0
    for key in metrics_f.keys() - {"policy/clipfrac", "val/clipfrac"}:
        assert metrics_f[key] == pytest.approx(metrics_r[key], rel=1e-4, abs=1e-5), key
    # clip fractions: the fused op's decisions, up to the tokens whose ratio (value) is within noise of a clip edge
    ((_, _, targets, old, adv), options, out), = calls
    mask, c, cv = targets != -100, options["cliprange"], options["cliprange_value"]
    policy = clipped_policy_loss(out.logprobs, old, adv, cliprange=c)
    edge = near(policy.ratio, [1 - c, 1 + c], 1e-4)
    v, shift, ret = out.values, out.values - options["old_values"], options["returns"]
    gap = (v - shift + shift.clamp(-cv, cv) - ret) ** 2 - (v - ret) ** 2  # clipped value loss > unclipped one
    value_edge = near(shift.abs(), [cv], 1e-4) | near(gap, [0.0], 1e-4) & (shift.abs() > cv)
    for key, flags, ambiguous in (("policy/clipfrac", policy.clipped, edge), ("val/clipfrac", gap > 0, value_edge)):
        assert metrics_f[key] == pytest.approx(float(flags[mask].double().mean()), abs=1e-6), key
        assert_share_close(metrics_r[key], flags[mask], ambiguous[mask], key)
    for g_f, g_r in zip(grads_f, grads_r):
        torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-5)


def test_ppo_raises_a_simple_reward(tmp_path):
    model, tok = tiny()

    def sevens(prompts, completions):  # the share of "7" among the words of each completion
        return [c.split().count("7") / max(len(c.split()), 1) for c in completions]

    config = ppo_config(tmp_path, max_steps=30, per_device_train_batch_size=32, learning_rate=3e-3,
                        lr_scheduler_type="constant", kl_coef=0.01)
    history = PPOTrainer(model, tok, TASK.prompts(256, seed=3), sevens, config).train()
    scores = [r["objective/scores"] for r in history]
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 0.3


def test_ppo_with_a_reward_model(tmp_path):
    model, tok = tiny()
    reward_model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)).eval()
    history = PPOTrainer(model, tok, TASK.prompts(32, seed=3), reward_model, ppo_config(tmp_path)).train()
    assert all(math.isfinite(r["objective/scores"]) for r in history)
    trainer = PPOTrainer(model, tok, TASK.prompts(32, seed=3), reward_model, ppo_config(tmp_path))
    assert trainer.rollout(list(range(8))).metrics["objective/scores"] != 0


# --- resume and non-finite steps -----------------------------------------------------------------------------------

def make_trainer(kind, tmp_path, **overrides):
    model, tok = tiny()
    if kind == "dpo":
        fields = dict(max_steps=6, save_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2)
        return DPOTrainer(model, tok, TASK.preference_data(40, seed=1), dpo_config(tmp_path, **fields | overrides))
    if kind == "grpo":  # 2 iterations per generation batch, old and reference log-probs, 2 micro-batches per step
        config = GRPOConfig(output_dir=str(tmp_path / "grpo"), learning_rate=1e-3, per_device_train_batch_size=4,
                            gradient_accumulation_steps=2, num_generations=4, max_completion_length=6, max_steps=4,
                            save_steps=2, num_iterations=2, beta=0.1, disable_tqdm=True, **overrides)
        return GRPOTrainer(model, tok, TASK.prompts(40, seed=3), lambda p, c: [len(x) / 10 for x in c], config)
    fields = dict(max_steps=4, save_steps=2, per_device_train_batch_size=4, num_mini_batches=2,
                  gradient_accumulation_steps=2)
    return PPOTrainer(model, tok, TASK.prompts(40, seed=3), TASK.score, ppo_config(tmp_path, **fields | overrides))


LONG = {"gradient_checkpointing": True, "bf16": True}


@pytest.mark.parametrize("kind, options", [(kind, options) for kind in ("dpo", "ppo", "grpo") for options in ({}, LONG)]
                         + [(kind, {**LONG, "deterministic": True}) for kind in ("ppo", "grpo")],
                         ids=lambda x: x if isinstance(x, str) else "-".join(x) or "fp32")
def test_resume_continues_exactly(tmp_path, kind, options):
    full = make_trainer(kind, tmp_path / "full", **options)
    full.train()
    # The same run, killed during the step after its mid-run checkpoint, then resumed in a new trainer.
    crashed = make_trainer(kind, tmp_path / "resumed", **options)
    train_until_killed(crashed, "compute_loss" if kind == "dpo" else "rollout", crashed.config.save_steps)
    resumed = make_trainer(kind, tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=True)
    for (key, a), b in zip(weights(full.model).items(), weights(resumed.model).values()):
        assert torch.equal(a, b), key
    assert read_jsonl(os.path.join(resumed.config.output_dir, "metrics.jsonl")) == full.history
    # and the run really moved: the final weights differ from the checkpoint's
    assert not torch.equal(full.model.lm_head.weight, make_trainer(kind, tmp_path / "x").model.lm_head.weight)


def test_resume_from_a_missing_checkpoint_says_so(tmp_path):
    trainer = make_trainer("dpo", tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def snapshots_after_each_step(trainer):
    snapshots, step = [], trainer.optimizer_step

    def record(finite):
        out = step(finite)
        snapshots.append(weights(trainer.model))
        return out

    trainer.optimizer_step = record
    return snapshots


def test_dpo_skips_a_non_finite_step(tmp_path):
    trainer = make_trainer("dpo", tmp_path, gradient_accumulation_steps=1, max_steps=4)
    model = trainer.model

    def poison(module, args, output):  # NaN hidden states during step 3 only
        if trainer.step == 2:
            return (output[0] * math.nan, *output[1:]) if isinstance(output, tuple) else output * math.nan

    handle = model.model.layers[0].register_forward_hook(poison)
    snapshots = snapshots_after_each_step(trainer)
    with pytest.warns(RuntimeWarning, match="dpo step 3: non-finite loss; update skipped"):
        history = trainer.train()
    handle.remove()
    assert [r["skipped"] for r in history] == [0, 0, 1, 0]
    assert all(torch.isfinite(v).all() for v in snapshots[-1].values())
    assert all(torch.equal(snapshots[2][k], snapshots[1][k]) for k in snapshots[1])  # step 3 changed nothing
    assert not torch.equal(snapshots[3]["lm_head.weight"], snapshots[2]["lm_head.weight"])  # step 4 trained


def test_ppo_skips_updates_with_a_non_finite_reward(tmp_path):
    calls = []

    def reward(prompts, completions):
        calls.append(1)
        return [math.nan if len(calls) == 2 else 1.0 for _ in prompts]

    model, tok = tiny()
    trainer = PPOTrainer(model, tok, TASK.prompts(40, seed=3), reward, ppo_config(tmp_path, max_steps=3))
    snapshots = snapshots_after_each_step(trainer)
    with pytest.warns(RuntimeWarning, match="ppo step 2: non-finite loss"):
        history = trainer.train()
    assert [r["skipped"] for r in history] == [0, 1, 0]
    assert all(torch.isfinite(v).all() for v in snapshots[-1].values())
    epochs = trainer.config.num_ppo_epochs  # one optimizer step per PPO epoch here
    assert all(torch.equal(snapshots[2 * epochs - 1][k], snapshots[epochs - 1][k]) for k in snapshots[0])
