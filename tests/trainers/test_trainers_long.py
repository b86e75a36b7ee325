"""Long-sequence options of every trainer (``TrainingConfig``): gradient checkpointing gives the gradients of a run
without it and really recomputes the layers; bf16 mixed precision on the CPU learns the counting task as fp32 does;
the fp16 loss scaler's plumbing (scaled backward, unscale, overflow skip, state in checkpoints); config errors."""
import math

import pytest
import torch

from fastalign.trainers import DPOTrainer, PPOTrainer
from helpers.trainers import TASK, dpo_config, ppo_config, tiny, train_until_killed, weights

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_calls(model) -> list[int]:
    """A counter of decoder-layer forward calls (recomputations included), updated in place: calls of each layer's
    MLP, inside the checkpointed region whichever way ``transformers`` wraps the layer."""
    calls = [0]
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def one_step_gradients(kind: str, tmp_path, lora: bool, **options) -> tuple[dict, int]:
    """Gradients of the trainable parameters after one DPO (8 pairs) or PPO (8 sampled responses) loss's backward,
    and how many decoder-layer forwards the forward and backward ran."""
    model, tok = tiny()
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    if kind == "dpo":
        trainer = DPOTrainer(model, tok, TASK.preference_data(8, seed=1), dpo_config(tmp_path, **options))
        indices = list(range(8))
        inputs = (trainer.batch(trainer.train_pairs, indices, trainer.reference_logps(trainer.train_pairs,
                                                                                      [indices])),)
    else:
        trainer = PPOTrainer(model, tok, TASK.prompts(8, seed=3), TASK.score, ppo_config(tmp_path, **options))
        rollout = trainer.rollout(list(range(8)))  # the same samples in both runs: same seed, same weights
        inputs = (rollout, torch.arange(8), None)
    calls = layer_calls(trainer.model.get_base_model() if lora else trainer.model)
    trainer.model.train()
    loss, _ = trainer.compute_loss(*inputs)
    trainer.backward(loss)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return grads, calls[0]


@pytest.mark.parametrize("kind, lora", [("dpo", False), ("ppo", False), ("dpo", True)])
def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes_the_layers(tmp_path, kind, lora):
    plain, plain_calls = one_step_gradients(kind, tmp_path / "plain", lora)
    checkpointed, calls = one_step_gradients(kind, tmp_path / "ckpt", lora, gradient_checkpointing=True)
    layers = 2  # tiny()'s decoder layers
    assert plain_calls == layers and calls == 2 * layers  # each layer's forward ran again in the backward
    assert plain.keys() == checkpointed.keys()
    if lora:
        assert all("lora_" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_reentrant_checkpointing_with_lora_still_reaches_the_adapters(tmp_path):
    """``use_reentrant=True`` recomputes only for inputs that require grad: the frozen embeddings' output must be
    made to (``enable_input_require_grads``), or the adapters inside the layers would get no gradient."""
    plain, _ = one_step_gradients("dpo", tmp_path / "plain", True)
    reentrant, _ = one_step_gradients("dpo", tmp_path / "ckpt", True, gradient_checkpointing=True,
                                      gradient_checkpointing_kwargs={"use_reentrant": True})
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(reentrant[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def heldout_reward_accuracy(tmp_path, **options) -> float:
    """DPO (+RPO) on the counting task, 50 steps of 16 pairs; reward accuracy on 128 held-out pairs."""
    model, tok = tiny()
    config = dpo_config(tmp_path, max_steps=50, per_device_train_batch_size=16, per_device_eval_batch_size=64,
                        rpo_alpha=1.0, warmup_ratio=0.1, learning_rate=1e-2, **options)
    trainer = DPOTrainer(model, tok, TASK.preference_data(800, seed=1), config,
                         eval_dataset=TASK.preference_data(128, seed=2, heldout=True))
    history = trainer.train()
    assert all(math.isfinite(r["loss"]) for r in history if "loss" in r)
    return history[-1]["eval_rewards/accuracies"]


@pytest.mark.slow
def test_bf16_on_the_cpu_learns_the_counting_task_as_fp32_does(tmp_path):
    """bf16 autocast on the CPU (the forward in bf16, fp32 master weights, the fused ops in fp32 on bf16 inputs)
    reaches the held-out accuracy threshold fp32 reaches. The threshold (0.8) is far below both runs' accuracy
    (0.98 for both here), so rounding differences between CPUs cannot decide it."""
    fp32 = heldout_reward_accuracy(tmp_path / "fp32")
    bf16 = heldout_reward_accuracy(tmp_path / "bf16", bf16=True)
    assert fp32 >= 0.8 and bf16 >= 0.8, (fp32, bf16)


def test_bf16_forward_runs_in_bf16_and_the_loss_gets_bf16_hidden_states(tmp_path, monkeypatch):
    """Under ``bf16=True`` the backbone's matmuls run in bf16 and the fused DPO op receives bf16 hidden states and
    lm_head weight (fp32 master weights keep fp32 gradients)."""
    from fastalign.trainers import losses

    seen = {}
    fused = losses.fused_linear_dpo_loss

    def spy(hidden, weight, *args, **kwargs):
        seen["dtypes"] = hidden.dtype, weight.dtype, torch.is_autocast_enabled("cpu")
        return fused(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(losses, "fused_linear_dpo_loss", spy)
    model, tok = tiny()
    trainer = DPOTrainer(model, tok, TASK.preference_data(8, seed=1),
                         dpo_config(tmp_path, bf16=True, reference_free=True))
    outputs = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: outputs.append(o.dtype))
    batch = trainer.batch(trainer.train_pairs, list(range(8)), None)
    loss, _ = trainer.compute_loss(batch)
    trainer.backward(loss)
    assert seen["dtypes"] == (torch.bfloat16, torch.bfloat16, False)
    assert outputs == [torch.bfloat16] and loss.dtype == torch.float32
    assert model.lm_head.weight.dtype == model.lm_head.weight.grad.dtype == torch.float32


def scaled_trainer(tmp_path, init_scale: float = 2.0 ** 16):
    """A DPO trainer (fp32) with a CPU ``GradScaler``: the fp16 path's scaling without fp16 (CUDA-only here)."""
    model, tok = tiny()
    fields = dict(max_steps=6, save_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer = DPOTrainer(model, tok, TASK.preference_data(40, seed=1), dpo_config(tmp_path, **fields))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    return trainer


def test_loss_scaling_is_exact_in_fp32_and_its_state_resumes(tmp_path):
    """Power-of-two loss scales, unscaled before clipping: the same weights as without a scaler. A run killed after
    its mid-run checkpoint and resumed ends with the same weights and scaler state (which grew on the way)."""
    model, tok = tiny()
    fields = dict(max_steps=6, save_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    plain = DPOTrainer(model, tok, TASK.preference_data(40, seed=1), dpo_config(tmp_path / "plain", **fields))
    plain.train()
    full = scaled_trainer(tmp_path / "full")
    full.train()
    for (key, a), b in zip(weights(plain.model).items(), weights(full.model).values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8, msg=lambda m: f"{key}: {m}")
    assert full.scaler.get_scale() == 2.0 ** 19  # grown x2 every 2 steps without overflow

    train_until_killed(scaled_trainer(tmp_path / "resumed"), "compute_loss", 3)
    resumed = scaled_trainer(tmp_path / "resumed", init_scale=1.0)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    for (key, a), b in zip(weights(full.model).items(), weights(resumed.model).values()):
        assert torch.equal(a, b), key


def test_an_overflowing_scaled_step_is_skipped_and_lowers_the_scale(tmp_path):
    trainer = scaled_trainer(tmp_path)
    trainer.config.max_steps = 1
    trainer.model.lm_head.weight.register_hook(lambda grad: grad * math.inf)  # an overflow in the scaled backward
    before = weights(trainer.model)
    history = trainer.train()
    assert history[0]["skipped"] == 1.0 and not math.isfinite(history[0]["grad_norm"])
    assert trainer.scaler.get_scale() == 2.0 ** 15  # halved
    for key, value in weights(trainer.model).items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("fields, error, match", [
    (dict(bf16=True, fp16=True), ValueError, r"DPOConfig.fp16: expected False when bf16=True"),
    (dict(bf16=1), TypeError, r"DPOConfig.bf16: expected bool"),
    (dict(gradient_checkpointing="yes"), TypeError, r"DPOConfig.gradient_checkpointing: expected bool"),
    (dict(gradient_checkpointing_kwargs=["use_reentrant"]), TypeError,
     r"DPOConfig.gradient_checkpointing_kwargs: expected dict or None"),
])
def test_config_errors_name_the_field(tmp_path, fields, error, match):
    with pytest.raises(error, match=match):
        dpo_config(tmp_path, **fields)


def test_fp16_on_the_cpu_is_a_clear_error(tmp_path):
    model, tok = tiny()
    with pytest.raises(ValueError, match=r"DPOConfig.fp16: expected False for a model on cpu .*use bf16=True"):
        DPOTrainer(model, tok, TASK.preference_data(8, seed=1), dpo_config(tmp_path, fp16=True))
