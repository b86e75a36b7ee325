"""``nn.Module`` wrappers of the fused ops, holding their options."""
from __future__ import annotations

from torch import Tensor, nn

from .functional import fused_linear_logprobs


class FusedLinearLogProbs(nn.Module):
    """``forward(hidden [..., H], weight [V, H], targets [...], bias=None) -> logprobs [...]`` (and entropy).

    Options as in :func:`fastalign.fused_linear_logprobs` (with ``process_group``, ``weight`` is this rank's
    vocabulary shard ``[V_r, H]``).
    """

    def __init__(self, *, temperature: float = 1.0, logit_scale: float = 1.0, logit_softcap: float | None = None,
                 ignore_index: int = -100, return_entropy: bool = False,
                 backend: str = "auto", chunk_size: int | None = None,
                 deterministic: bool | None = None, check_finite: bool = True,
                 process_group=None, reduce_hidden_grad: bool = True):
        super().__init__()
        self.options = dict(temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap,
                            ignore_index=ignore_index, return_entropy=return_entropy,
                            backend=backend, chunk_size=chunk_size, deterministic=deterministic,
                            check_finite=check_finite,
                            process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None):
        return fused_linear_logprobs(hidden, weight, targets, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
