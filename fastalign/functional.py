"""The public fused ops: functions of hidden states and the lm_head weight that never materialize the logits."""
from __future__ import annotations

from torch import Tensor

from .ops.logprobs import linear_logprobs, prepare_linear


def fused_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                          temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                          backend: str = "auto", chunk_size: int | None = None, check_finite: bool = True):
    """Per-token log-probs ``log softmax((hidden @ weight.T + bias) / temperature)[targets]``, without the logits.

    Args:
        hidden: ``[..., H]`` last hidden states (fp32, fp16, bf16; float64 on the torch backend).
        weight: ``[V, H]`` lm_head weight, same dtype. A frozen weight (``requires_grad=False``) costs no
            ``d weight`` work.
        targets: ``[...]`` int64 token ids in ``[0, V)``, or ``ignore_index`` (log-prob 0, no gradient).
        bias: optional ``[V]`` lm_head bias.
        temperature: positive divisor of the logits.
        return_entropy: also return the entropy ``-sum_v p_v log p_v`` of the tempered distribution.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere; ``$FASTALIGN_BACKEND`` overrides), ``"triton"``,
            ``"torch"``.
        chunk_size: tokens per chunk on the torch backend; None sizes it from ``$FASTALIGN_CHUNK_BUDGET_MB``
            (default 64 MiB of ``[chunk, V]`` temporaries).
        check_finite: raise on NaN/inf in ``hidden``, ``weight`` or ``bias`` (one cheap pass over each).

    Returns:
        ``logprobs`` shaped like ``targets``, fp32 (float64 for float64 inputs); with ``return_entropy``,
        ``(logprobs, entropy)``. Both are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    inputs, opts = prepare_linear(hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index,
                                  backend=backend, chunk_size=chunk_size, check_finite=check_finite)
    logprobs, entropy = linear_logprobs(inputs, opts, return_entropy)
    logprobs = logprobs.view(inputs.lead_shape)
    return (logprobs, entropy.view(inputs.lead_shape)) if return_entropy else logprobs
