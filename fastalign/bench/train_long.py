"""``--op train-long``: one DPO training step of a Llama-style model on one long pair, reference loss vs fused."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import torch

from .harness import ISSUE_PROBLEM, REGISTRY, Mode, OpBench, Problem, Step, Target, VariantFactory


TRAIN_LONG_LAYERS = 4


class TrainLongInputs(NamedTuple):
    trainer: Any  # a DPOTrainer of a Llama-style model built in code
    batch: dict  # one pair of 2 x N/2 tokens, collated, with (constant) reference log-probs


def make_train_long_inputs(problem: Problem) -> TrainLongInputs:
    """A Llama-style model built in code (``TRAIN_LONG_LAYERS`` layers, hidden H, MLP 4H, H/64 heads, vocabulary V,
    random init) in a DPO trainer, and one pair of random token sequences of N/2 tokens each (the first N/32 the
    prompt). The reference log-probs are constants: their values change neither time nor memory. One warm-up step
    on the first 64 tokens allocates AdamW's state, so it is not counted as the step's extra memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..trainers import DPOConfig, DPOTrainer
    from ..trainers.tiny import word_tokenizer

    torch.manual_seed(0)
    length, h, v = max(problem.tokens // 2, 2), problem.hidden_size, problem.vocab_size
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=v, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=TRAIN_LONG_LAYERS,
        num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 64), max_position_embeddings=length,
        tie_word_embeddings=False, pad_token_id=0)).to(problem.device)
    config = DPOConfig(output_dir="unused", per_device_train_batch_size=1, disable_tqdm=True, max_length=None,
                       max_prompt_length=None)
    trainer = DPOTrainer(model, word_tokenizer([]), [{"prompt": "", "chosen": "unused", "rejected": ""}], config)
    trainer.setup_optimizer(2)
    ids = torch.randint(1, v, (2, length), device=problem.device)
    labels = ids.clone()
    labels[:, :max(length // 16, 1)] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "ref_logps": torch.full((2, 1), -float(length), device=problem.device)}
    train_long_step("fused", False, False)(TrainLongInputs(trainer, {
        k: v[:, :64] if k != "ref_logps" else v for k, v in batch.items()}))()
    return TrainLongInputs(trainer, batch)


def train_long_step(loss_backend: str, checkpointing: bool, bf16: bool) -> VariantFactory:
    """One training step (forward, backward, AdamW step) with this loss backend, gradient checkpointing on or off,
    bf16 autocast or fp32, set on the shared trainer before each call."""
    from .. import hf

    def factory(x: TrainLongInputs) -> Step:
        def step():
            trainer = x.trainer
            trainer.config.loss_backend = loss_backend
            hf.set_gradient_checkpointing(trainer.model, checkpointing)
            trainer.policy.autocast_dtype = torch.bfloat16 if bf16 else None
            loss, _ = trainer.compute_loss(x.batch)
            trainer.backward(loss)
            trainer.optimizer_step(True)

        return step

    return factory


REGISTRY["train-long"] = OpBench(make_train_long_inputs, {
    "step": Mode("DPO training step of a 4-layer Llama, one long pair",
                 {"reference loss": train_long_step("reference", False, False),
                  "fused": train_long_step("fused", False, False),
                  "fused + checkpointing": train_long_step("fused", True, False),
                  "fused + checkpointing + bf16": train_long_step("fused", True, True)},
                 floor=None, targets=(Target("memory", "reference loss", 0.15),), candidate="fused + checkpointing",
                 baseline="reference loss", also_memory=("fused", "fused + checkpointing + bf16")),
}, issue_problem=replace(ISSUE_PROBLEM, tokens=32768))
