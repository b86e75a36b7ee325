"""Padding-free trainers (``padding_free=True``) on a tiny Llama: a packed forward gives each sequence the hidden
states of its own separate forward (no attention across a boundary: sdpa's per-sequence attention, the block-diagonal
mask of eager and of sdpa under gradient checkpointing), one packed training step equals the padded step (losses,
gradients and parameter updates) for DPO, KTO, GRPO, PPO and RLOO, the option is validated."""
import pytest
import torch

from fastalign import hf
from fastalign.trainers import (DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, PPOConfig,
                                PPOTrainer, RLOOConfig, RLOOTrainer)
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import tiny_llama, word_tokenizer
from helpers.noise import recorded_calls
from helpers.trainers import capture_gradients, unpaired, weights

TASK = CountingTask()
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(attn_implementation="sdpa"):
    tokenizer = word_tokenizer(TASK.words)
    torch.manual_seed(0)
    return tiny_llama(tokenizer, hidden_size=32, intermediate_size=64,
                      attn_implementation=attn_implementation), tokenizer


@pytest.mark.parametrize("attn_implementation, checkpointing, swapped", [
    ("sdpa", False, hf.SEGMENT_ATTENTION), ("sdpa", True, None), ("eager", False, None)])
def test_packed_forward_equals_separate_forwards(attn_implementation, checkpointing, swapped, monkeypatch):
    """Left padding, right padding, a length-1 sequence: each packed sequence's hidden states (and their
    gradients w.r.t. the weights, recomputed in the backward under gradient checkpointing) are those of the
    sequence alone."""
    model, _ = tiny(attn_implementation)
    hf.set_gradient_checkpointing(model, checkpointing)
    model.train(checkpointing)  # transformers checkpoints in training mode only
    seen = []
    monkeypatch.setattr(hf, "attention_implementation",
                        lambda model, implementation, wrapped=hf.attention_implementation: (
                            seen.append(implementation), wrapped(model, implementation))[1])
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, model.config.vocab_size, (4, 7), generator=g)
    attention_mask = torch.ones(4, 7, dtype=torch.long)
    attention_mask[0, 5:] = 0  # right padding
    attention_mask[1, :3] = 0  # left padding
    attention_mask[2, 1:] = 0  # one token
    hidden, packed = hf.packed_hidden_states(model, input_ids, attention_mask)
    assert seen == [swapped] and model.config._attn_implementation == attn_implementation
    assert packed.cu_seqlens.tolist() == [0, 5, 9, 10, 17]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5, 6]]
    alone = torch.cat([hf.hidden_states(model, ids[mask.bool()][None])[0]
                       for ids, mask in zip(input_ids, attention_mask)])
    torch.testing.assert_close(hidden[0], alone, rtol=1e-5, atol=1e-5)
    weight = torch.randn(hidden.shape, generator=g)
    grads = [torch.autograd.grad((h * weight[0]).sum(), list(model.parameters()), allow_unused=True)
             for h in (hidden[0], alone)]
    for a, b in zip(*grads):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.unpack(hidden, 0.0)[attention_mask.bool()], alone, rtol=1e-5, atol=1e-5)


def test_flash_attention_gets_the_varlen_arguments_and_other_implementations_are_refused():
    model, _ = tiny()
    packed = hf.PackedSequences.of(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    model.config._attn_implementation = "flash_attention_2"
    swapped, kwargs = hf.packed_attention(model, packed, torch.float32)
    assert swapped is None and kwargs["cu_seq_lens_q"].tolist() == [0, 2, 5]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 3 and "attention_mask" not in kwargs
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="model: padding-free batches take attn_implementation"):
        hf.packed_attention(model, packed, torch.float32)


def make(kind, tmp_path, padding_free, loss_backend="fused"):
    model, tok = tiny()
    common = dict(output_dir=str(tmp_path / f"{kind}-{padding_free}"), learning_rate=1e-2, max_steps=2,
                  disable_tqdm=True, adam_epsilon=1.0,  # a smooth update (~ lr * grad): no sign of a tiny gradient
                  padding_free=padding_free, loss_backend=loss_backend)
    if kind == "dpo":
        config = DPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_length=32,
                           max_prompt_length=16, rpo_alpha=0.5, **common)
        return DPOTrainer(model, tok, TASK.preference_data(32, seed=1), config)
    if kind == "kto":
        config = KTOConfig(per_device_train_batch_size=4, max_length=32, max_prompt_length=16, **common)
        return KTOTrainer(model, tok, unpaired(16, seed=1), config)
    if kind == "grpo":  # old and reference log-probs, a sequence-level ratio
        config = GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                            max_completion_length=6, num_iterations=2, beta=0.1, loss_type="grpo",
                            importance_sampling_level="sequence", **common)
        return GRPOTrainer(model, tok, TASK.prompts(16, seed=3), TASK.score, config)
    if kind == "rloo":  # old and reference log-probs, the ratio of whole sequences, the KL in the reward
        config = RLOOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                            max_completion_length=6, num_iterations=2, beta=0.1, **common)
        return RLOOTrainer(model, tok, TASK.prompts(16, seed=3), TASK.score, config)
    config = PPOConfig(per_device_train_batch_size=4, num_mini_batches=2, response_length=6, temperature=1.0,
                       num_ppo_epochs=2, **common)
    return PPOTrainer(model, tok, TASK.prompts(16, seed=3), TASK.score, config)


@pytest.mark.parametrize("loss_backend", ["fused", "reference"])
@pytest.mark.parametrize("kind", ["dpo", "kto", "grpo", "ppo", "rloo"])
def test_packed_steps_equal_padded_steps(tmp_path, kind, loss_backend):
    runs = []
    for padding_free in (False, True):
        trainer = make(kind, tmp_path, padding_free, loss_backend)
        grads = capture_gradients(trainer)
        with recorded_calls(f"fused_linear_{kind}_loss") as calls:
            history = trainer.train()
        runs.append((history, grads, weights(trainer.model)))
        packed_calls = [kwargs for _, kwargs, _ in calls if kwargs.get("cu_seqlens") is not None]
        assert len(packed_calls) == (len(calls) if padding_free else 0)  # the fused loss gets the packing
        assert bool(calls) == (loss_backend == "fused")
    (padded, padded_grads, padded_weights), (packed, packed_grads, packed_weights) = runs
    assert len(padded_grads) == len(packed_grads) >= 2
    for want, got in zip(padded, packed):
        assert set(want) == set(got)
        for name in want:
            if isinstance(want[name], float) and name not in ("train_runtime", "train_steps_per_second"):
                assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
    for want, got in zip(padded_grads, packed_grads):
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    initial = weights(tiny()[0])
    assert max(float((padded_weights[name] - value).abs().max()) for name, value in initial.items()) > 1e-4
    for name, value in padded_weights.items():
        torch.testing.assert_close(packed_weights[name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config_class", [DPOConfig, KTOConfig, GRPOConfig, PPOConfig, RLOOConfig])
def test_padding_free_is_validated(config_class):
    assert config_class().padding_free is False
    with pytest.raises(TypeError, match=f"{config_class.__name__}.padding_free: expected bool, got 'yes'"):
        config_class(padding_free="yes")
