"""A tiny Gemma-2-style model (final logit soft-capping on) trained by fastalign's DPO and GRPO trainers: the fused
losses, which apply the soft-cap inside the op, equal the losses computed from the model's own ``.logits``."""
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from fastalign import hf
from fastalign.objectives.dpo import dpo_sequence_loss
from fastalign.objectives.grpo import grpo_loss
from fastalign.trainers import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import word_tokenizer

TASK = CountingTask()
SOFTCAP = 0.7  # small enough that the cap bends the random model's logits (|z| up to ~2)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gemma2():
    tokenizer = word_tokenizer(TASK.words)
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          final_logit_softcapping=SOFTCAP, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=None, attn_implementation="eager")
    return Gemma2ForCausalLM(config), tokenizer


def own_logprobs(model, input_ids, attention_mask, targets, width=None, temperature=1.0):
    """Log-probs of ``targets`` (-100: 0) from the model's own ``.logits`` (soft-capped by the model), the positions
    before the last ``width`` tokens (all shifted ones by default); and the entropy."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=hf.position_ids_from_mask(attention_mask)).logits
    logits = (logits[:, :-1] if width is None else logits[:, -width - 1:-1]).float() / temperature
    assert logits.abs().max() < SOFTCAP / temperature  # capped: the model's own transform is in these logits
    logp = logits.log_softmax(-1)
    valid = targets != -100
    lp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0].masked_fill(~valid, 0.0)
    return lp, (-(logp.exp() * logp).sum(-1)).masked_fill(~valid, 0.0), valid


def test_dpo_trainer_on_a_softcapped_model(tmp_path):
    model, tok = tiny_gemma2()
    config = DPOConfig(output_dir=str(tmp_path / "dpo"), learning_rate=3e-3, per_device_train_batch_size=8,
                       max_steps=3, disable_tqdm=True, max_length=32, max_prompt_length=16)
    trainer = DPOTrainer(model, tok, TASK.preference_data(24, seed=1), config)
    history = trainer.train()
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3]
    batch = trainer.batch(trainer.train_pairs, list(range(8)),
                          trainer.reference_logps(trainer.train_pairs, [list(range(8))]))
    loss, _ = trainer.compute_loss(batch)
    with torch.no_grad():
        lp, _, valid = own_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                    hf.shifted_labels(batch["input_ids"], batch["attention_mask"], batch["labels"]))
        want, _ = dpo_sequence_loss(lp, valid, batch["ref_logps"], config.options)
    torch.testing.assert_close(loss.detach(), want.loss, rtol=1e-5, atol=1e-6)


def test_grpo_trainer_on_a_softcapped_model(tmp_path):
    model, tok = tiny_gemma2()
    config = GRPOConfig(output_dir=str(tmp_path / "grpo"), learning_rate=1e-3, per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=6, max_steps=2, disable_tqdm=True,
                        temperature=0.9, beta=0.05)
    trainer = GRPOTrainer(model, tok, TASK.prompts(16, seed=3), TASK.score, config)
    history = trainer.train()
    assert [r["step"] for r in history if "loss" in r] == [1, 2]
    batch = trainer.rollout([i for i in range(2) for _ in range(4)])
    rows = torch.arange(8)
    loss, _ = trainer.compute_loss(batch, rows)
    with torch.no_grad():
        width = batch.targets.shape[1]
        lp, entropy, valid = own_logprobs(model, batch.input_ids, batch.attention_mask, batch.targets, width,
                                          config.temperature)
        want = grpo_loss(lp, batch.advantages, valid, config.loss_config, old_logprobs=batch.old_logprobs,
                         ref_logprobs=batch.ref_logprobs, entropy=entropy,
                         num_items_in_batch=batch.num_items_in_batch)
    torch.testing.assert_close(loss.detach(), want.loss, rtol=1e-5, atol=1e-6)
