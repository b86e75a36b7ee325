"""``--op ce``: the fused SFT cross-entropy against ``F.cross_entropy`` on materialized logits and Cut
Cross-Entropy when installed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import fused_linear_cross_entropy
from .harness import REGISTRY, Mode, OpBench, Step, Target
from .logprobs import LogprobInputs, make_logprob_inputs
from .variants import fused_loss, installed, matmul_floor


def naive_ce(x: LogprobInputs) -> Step:
    """The plain way (transformers' ``ForCausalLMLoss``): materialized logits, ``F.cross_entropy``; fwd + bwd."""
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(F.cross_entropy((hidden @ weight.T).float(), x.targets), [hidden, weight])


def cce_ce(x: LogprobInputs) -> Step:
    """Apple's Cut Cross-Entropy (``linear_cross_entropy``): its Triton kernels on CUDA, its ``torch_compile``
    implementation elsewhere; fwd + bwd."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if x.hidden.is_cuda else "torch_compile"
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(linear_cross_entropy(hidden, weight, x.targets, impl=impl), [hidden, weight])


# Liger's fused linear cross-entropy is Triton only (CUDA): not a variant on this CPU-only harness's default device.
_CE_PEERS = {"cut cross-entropy": cce_ce} if installed("cut_cross_entropy") else {}
REGISTRY["ce"] = OpBench(make_logprob_inputs, {"fwd+bwd": Mode(
    "SFT cross-entropy (mean over the tokens), fwd+bwd",
    {"fused": fused_loss(lambda x, hidden, weight: fused_linear_cross_entropy(hidden, weight, x.targets,
                                                                              backend=x.backend)),
     "naive": naive_ce, **_CE_PEERS, "3 matmuls": matmul_floor(3)},
    floor="3 matmuls", targets=(Target("time", "3 matmuls", 1.10), Target("memory", "naive", 0.10),
                                *(Target("time", name, 1.0) for name in _CE_PEERS)))})
