"""``--op packed``: one DPO training step of the tiny Llama, packed (padding-free) vs padded."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .harness import REGISTRY, Mode, OpBench, Problem, Step, Target, VariantFactory


PACKED_PAIRS = 16


class PackedStepInputs(NamedTuple):
    model: Any  # the tiny Llama (each variant trains its own copy)
    batch: dict  # 16 pairs collated [2B, T] (chosen first), right padding, constant reference log-probs


def packed_lengths(problem: Problem) -> list[int]:
    """``2 x PACKED_PAIRS`` sequence lengths drawn log-uniformly in ``[N/64, N]`` (``[64, 4096]`` at the issue's
    N=4096) from the problem's seed."""
    g = torch.Generator().manual_seed(problem.seed)
    low, high = math.log(max(problem.tokens // 64, 2)), math.log(problem.tokens)
    return torch.exp(low + (high - low) * torch.rand(2 * PACKED_PAIRS, generator=g)).round().long().tolist()


def make_packed_inputs(problem: Problem) -> PackedStepInputs:
    """The tiny Llama (``fastalign.trainers.tiny``: 2 layers, hidden H, MLP 2H, 4 heads, vocabulary V, sdpa) and
    :func:`packed_batch`."""
    from ..trainers.tiny import tiny_llama, word_tokenizer

    torch.manual_seed(problem.seed)
    h, v = problem.hidden_size, problem.vocab_size
    model = tiny_llama(word_tokenizer([]), vocab_size=v, hidden_size=h, intermediate_size=2 * h,
                       max_position_embeddings=problem.tokens, pad_token_id=0).to(problem.device)
    return PackedStepInputs(model, {k: t.to(problem.device) for k, t in packed_batch(problem).items()})


def packed_batch(problem: Problem) -> dict:
    """A DPO batch (CPU, right padding with token 0) of ``PACKED_PAIRS`` pairs of random tokens in ``[1, V)`` with
    :func:`packed_lengths` (each pair's prompt: the first quarter of its shorter sequence, shared): ``input_ids``,
    ``attention_mask``, ``labels [2B, T]`` (chosen rows first) and constant ``ref_logps [2, B]``."""
    v = problem.vocab_size
    lengths = packed_lengths(problem)
    ids = torch.randint(1, v, (2 * PACKED_PAIRS, max(lengths)))
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        pair = i % PACKED_PAIRS
        prompt = max(min(lengths[pair], lengths[pair + PACKED_PAIRS]) // 4, 1)
        ids[i, :prompt] = ids[pair, :prompt]
        mask[i, :length] = 1
        labels[i, prompt:length] = ids[i, prompt:length]
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels,
            "ref_logps": -torch.tensor(lengths, dtype=torch.float32).view(2, PACKED_PAIRS)}


def packed_step(padding_free: bool) -> VariantFactory:
    """One DPO training step (forward, backward, AdamW step) of a copy of the tiny Llama, the batch packed into one
    row (``padding_free=True``: per-sequence sdpa, ``fastalign.hf.segment_attention``) or padded; returns the loss.
    AdamW's state is allocated at set-up, by a step on the batch's first two columns."""
    import copy

    from ..trainers import DPOConfig, DPOTrainer
    from ..trainers.tiny import word_tokenizer

    def factory(x: PackedStepInputs) -> Step:
        config = DPOConfig(output_dir="unused", per_device_train_batch_size=PACKED_PAIRS, disable_tqdm=True,
                           max_length=None, max_prompt_length=None, padding_free=padding_free)
        trainer = DPOTrainer(copy.deepcopy(x.model), word_tokenizer([]), [{"prompt": "", "chosen": "unused",
                                                                           "rejected": ""}], config)
        trainer.setup_optimizer(2)

        def step(batch: dict = x.batch):
            loss, _ = trainer.compute_loss(batch)
            trainer.backward(loss)
            trainer.optimizer_step(True)
            return loss.detach()

        step({k: t if k == "ref_logps" else t[:, :2] for k, t in x.batch.items()})  # AdamW's state, 2 tokens a row
        return step

    return factory


REGISTRY["packed"] = OpBench(make_packed_inputs, {
    "step": Mode(f"DPO training step of the tiny Llama, {PACKED_PAIRS} pairs of log-uniform lengths in [N/64, N]",
                 {"padded": packed_step(False), "packed": packed_step(True)}, floor=None,
                 targets=(Target("time", "padded", 0.5), Target("memory", "padded", 0.5)), candidate="packed",
                 baseline="padded"),
}, issue_problem=Problem(tokens=4096, hidden_size=64, vocab_size=128))
