"""``--op compile``: one DPO step of the tiny Llama under ``torch.compile`` vs eager."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..functional import fused_linear_dpo_loss
from .dpo import DPO_BETA
from .harness import REGISTRY, Mode, OpBench, Problem, Step, Target, VariantFactory


class CompileInputs(NamedTuple):
    model: Any  # the tiny Llama (fastalign.trainers.tiny.TINY_LLAMA shape, hidden H, vocabulary V)
    ids: Tensor  # [2B, T] token ids of B pairs (chosen rows first)
    labels: Tensor  # [2B, T] the first T/4 tokens ignored (the prompt)


COMPILE_PAIRS = 4


def make_compile_inputs(problem: Problem) -> CompileInputs:
    """The tiny Llama of ``fastalign.trainers.tiny`` with hidden size H and vocabulary V, and ``COMPILE_PAIRS`` random
    pairs of T = N / (2 * COMPILE_PAIRS) tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..trainers.tiny import TINY_LLAMA

    torch.manual_seed(problem.seed)
    heads = max(1, problem.hidden_size // 16)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "hidden_size": problem.hidden_size,
                                            "intermediate_size": 2 * problem.hidden_size,
                                            "num_attention_heads": heads, "num_key_value_heads": heads,
                                            "vocab_size": problem.vocab_size})).to(problem.device)
    length = max(problem.tokens // (2 * COMPILE_PAIRS), 4)
    ids = torch.randint(0, problem.vocab_size, (2 * COMPILE_PAIRS, length), device=problem.device)
    return CompileInputs(model, ids, ids.masked_fill(torch.arange(length, device=ids.device) < length // 4, -100))


def dpo_model_step(compiled: bool) -> VariantFactory:
    """One DPO step of the model without the optimizer: forward, fused DPO loss (precomputed reference log-probs),
    backward; ``compiled``: forward and loss through ``torch.compile(fullgraph=True)`` (inductor, which compiles their
    backward too; the warm-up call compiles)."""
    from ..hf import causal_lm_parts

    def factory(x: CompileInputs) -> Step:
        params = [p for p in x.model.parameters() if p.requires_grad]
        ref_logps = torch.full((2, COMPILE_PAIRS), -10.0, device=x.ids.device)

        def forward():
            parts = causal_lm_parts(x.model, x.ids, None, x.labels)
            return fused_linear_dpo_loss(parts.hidden, parts.weight, parts.targets, bias=parts.bias,
                                         ref_logps=ref_logps, beta=DPO_BETA).loss

        loss = torch.compile(forward, fullgraph=True) if compiled else forward
        return lambda: torch.autograd.grad(loss(), params)

    return factory


REGISTRY["compile"] = OpBench(make_compile_inputs, {
    "dpo-step": Mode("One DPO step (forward, fused loss, backward) of the tiny Llama, torch.compile vs eager",
                     {"compiled": dpo_model_step(True), "eager": dpo_model_step(False)},
                     floor=None, targets=(Target("time", "eager", 1.00),), candidate="compiled", baseline="eager"),
}, issue_problem=Problem(tokens=2048, hidden_size=64, vocab_size=4096))
