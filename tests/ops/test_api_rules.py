"""Rules every public op follows (docs/changelog.md): ``bias`` (and every optional tensor) keyword-only after the
required tensors, but in the two ops whose signature is ``(hidden, weight, targets, bias=None)``; metrics fp32, float64 for float64 inputs; GRPO's entropy optional when the loss does not use it."""
import inspect

import pytest
import torch

import fastalign
from fastalign import functional
from helpers.cross_entropy import problem

OPS = [getattr(functional, name) for name in fastalign.__all__ if name.startswith("fused_linear_")]


# F.linear's order, and the cross-entropy signature fixed by its issue (#26): bias also the fourth positional argument
POSITIONAL_BIAS = {"fused_linear_logprobs", "fused_linear_cross_entropy"}


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
def test_bias_is_keyword_only(op):
    params = inspect.signature(op).parameters
    biases = [name for name in params if name == "bias" or name.endswith("_bias")]
    assert biases, op.__name__
    if op.__name__ in POSITIONAL_BIAS:
        assert list(params)[:4] == ["hidden", "weight", "targets", "bias"], op.__name__
        assert params["bias"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and params["bias"].default is None
        biases.remove("bias")
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in biases), op.__name__


def _problem(dtype):
    """The cross-entropy tests' problem (``[3, 5]`` tokens, some ignored) with advantages ``[3, 5]``."""
    hidden, weight, _, targets = problem(dtype=dtype)
    return hidden.requires_grad_(), weight.requires_grad_(), targets, torch.linspace(-1, 1, 15, dtype=dtype).view(3, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ppo_metrics_take_the_dtype_of_every_op(dtype):
    hidden, weight, targets, advantages = _problem(dtype)
    old = -torch.rand(3, 5, dtype=dtype) - 2
    want = torch.float64 if dtype == torch.float64 else torch.float32
    ppo = fastalign.fused_linear_ppo_loss(hidden, weight, targets, old, advantages, backend="torch").metrics
    grpo = fastalign.fused_linear_grpo_loss(hidden, weight, targets, advantages[:, 0], backend="torch").metrics
    assert {v.dtype for v in ppo.values()} == {v.dtype for v in grpo.values()} == {want}


def test_grpo_entropy_is_optional(backend):
    hidden, weight, targets, advantages = _problem(torch.float32 if backend == "triton" else torch.float64)
    outs = [fastalign.fused_linear_grpo_loss(hidden, weight, targets, advantages[:, 0], backend=backend,
                                             compute_entropy=entropy) for entropy in (True, False)]
    assert outs[1].entropy is None and set(outs[0].metrics) - set(outs[1].metrics) == {"entropy"}
    torch.testing.assert_close(outs[1].loss, outs[0].loss)
    for key, value in outs[1].metrics.items():
        torch.testing.assert_close(value, outs[0].metrics[key])
    for got, want in zip(*(torch.autograd.grad(out.loss, (hidden, weight)) for out in reversed(outs))):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="compute_entropy: expected True when entropy_coef != 0"):
        fastalign.fused_linear_grpo_loss(hidden, weight, targets, advantages[:, 0], backend=backend,
                                         compute_entropy=False, entropy_coef=0.01)
