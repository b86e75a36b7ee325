"""Data-parallel and sharded training with PyTorch's own engine: ``torch.distributed`` under ``torchrun``, DDP or
FSDP2 (``fully_shard``). Nothing here replaces them; this module joins the process group, wraps the policy, and
holds the few collectives the trainers need (global counts, metric averages, full state dicts).

The fused ops take the lm_head weight as a tensor and never call ``lm_head.forward``. So the policy is wrapped in
:class:`Policy`, whose ``forward(fn, *args)`` runs ``fn(model, *args)``: the hidden states *and* the fused loss are
computed inside the forward of the module that DDP wraps, or that is FSDP2's root. FSDP2 then unshards the root's
parameters (embeddings, final norm, lm_head, value head) before that forward, as for any forward, and its
post-backward reduce-scatters their gradients; DDP's hooks see every parameter the loss used.

With one process (no ``WORLD_SIZE`` > 1 in the environment and no process group) every function is the identity or
a local computation: the trainers run one code path.
"""
from __future__ import annotations

import contextlib
import gc
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import hf

PARALLELISM = ("ddp", "fsdp")


def init() -> None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment) unless one exists:
    nccl with device ``cuda:LOCAL_RANK`` when CUDA is available, gloo on the CPU otherwise."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def shutdown() -> None:
    """Leave the process group, if any. Garbage is collected first: a wrapped policy no longer referenced still holds
    handles of its last collectives, and freed at exit, after the group, they abort the process now and then (drop
    your trainer before calling this). Then all ranks wait for each other (gloo aborts otherwise)."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes logs and checkpoints (rank 0)."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- collectives --------------------------------------------------------------------------------------------------

def _all_reduce(values: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
    if dist.is_initialized():
        values = values.to(device())
        dist.all_reduce(values, op=op)
    return values


def all_reduce_sum(values: Tensor) -> Tensor:
    """``values`` summed over the ranks (a copy; as they are with one process)."""
    return _all_reduce(values.clone())


def global_count(count: Tensor | int) -> Tensor:
    """``count`` summed over ranks, at least 1 (a float32 scalar)."""
    return _all_reduce(torch.as_tensor(count, dtype=torch.float64).reshape(1)).clamp(min=1).reshape(()).float()


def global_normalizer(count: Tensor | int) -> Tensor:
    """The divisor that makes this rank's loss its share of the global mean, times the world size: the count summed
    over ranks (at least 1) divided by the world size, since DDP and FSDP average the ranks' gradients."""
    return global_count(count) / world_size()


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (the same answer everywhere, for decisions that involve collectives)."""
    return bool(_all_reduce(torch.tensor([float(flag)]), dist.ReduceOp.MIN))


def weighted_average(records: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    """Key-wise ``sum(w * r) / sum(w)`` over the records of every rank. All ranks pass the same keys."""
    keys = list(records[0]) if records else []
    sums = torch.tensor([[w * r[k] for k in keys] + [w] for r, w in zip(records, weights)], dtype=torch.float64)
    totals = _all_reduce(sums.sum(0)).cpu()
    return {k: float(totals[i] / totals[-1]) for i, k in enumerate(keys)}


def average(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics averaged over ranks (each rank's equally, as TRL's gathered means)."""
    return weighted_average([metrics], [1.0]) if dist.is_initialized() else metrics


def all_gather_rows(x: Tensor) -> Tensor:
    """Every rank's ``[B, T]`` rows, rank by rank: ``[world_size * B, max T]`` (shorter rows padded with zeros).
    Every rank has the same ``B``."""
    if not dist.is_initialized():
        return x
    width = int(_all_reduce(torch.tensor([x.shape[1]]), dist.ReduceOp.MAX))
    padded = torch.nn.functional.pad(x, (0, width - x.shape[1])).to(device())
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat(parts).to(x.device)


def gather_strided(part: Tensor) -> Tensor:
    """The ``[n]`` tensor of which rank ``r`` computed items ``r, r + world_size, ...`` (``part``, 1-D)."""
    if not dist.is_initialized():
        return part
    parts = [None] * world_size()
    dist.all_gather_object(parts, part.cpu())
    whole = torch.empty(sum(len(p) for p in parts), dtype=part.dtype)
    for r, p in enumerate(parts):
        whole[r::world_size()] = p
    return whole.to(part.device)


def gather_objects(obj) -> list:
    """``obj`` of every rank, by rank."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects


def broadcast_module(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (models built from an unseeded random init differ)."""
    if dist.is_initialized():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor.data, src=0)


# --- the wrapped policy ---------------------------------------------------------------------------------------

def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type in ``dtype`` (mixed precision), or no context for None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """The fp16 loss scaler: torch's ``GradScaler``, or with several processes its sharded variant, whose overflow
    check is all-reduced so that every rank skips the same steps and keeps the same scale (FSDP2 ranks hold
    different gradient shards)."""
    if dist.is_initialized():
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


class Policy(nn.Module):
    """The policy (a causal LM, with its value head for PPO) and whatever is computed from it, in one forward:
    ``Policy(model)(fn, *args)`` returns ``fn(model, *args)``. DDP wraps this module and FSDP2 shards it as the
    root, so that the lm_head weight, which the fused ops read without calling ``lm_head.forward``, is unsharded
    while ``fn`` runs and its gradient goes through the usual reduction. ``generate`` is a forward method too.
    ``autocast_dtype``: both run under ``torch.autocast`` in that dtype (mixed precision)."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.device = next(model.parameters()).device

    def forward(self, fn, *args, **kwargs):
        with autocast(self.device, self.autocast_dtype):
            return fn(self.model, *args, **kwargs)

    def generate(self, **kwargs) -> Tensor:
        with autocast(self.device, self.autocast_dtype):
            return self.model.generate(**kwargs)


def wrap(policy: Policy, parallelism: str) -> nn.Module:
    """``policy`` ready for this world: as is with one process; ``"ddp"``: in ``DistributedDataParallel``;
    ``"fsdp"``: FSDP2, each decoder layer (the model's ``_no_split_modules`` classes) its own ``fully_shard``
    group and ``policy`` the root (embeddings, final norm, lm_head, value head), ``generate`` registered as a
    forward method. Call it before building the optimizer (FSDP2 turns the parameters into DTensors)."""
    if parallelism not in PARALLELISM:
        raise ValueError(f"parallelism: expected one of {PARALLELISM}, got {parallelism!r}")
    if not dist.is_initialized():
        return policy
    here = device()
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are constant: not broadcasting them keeps forward passes free of collectives.
        return DistributedDataParallel(policy, device_ids=[here.index] if here.type == "cuda" else None,
                                       broadcast_buffers=False)
    return _fully_shard(policy)


def wrap_reference(reference: Policy, parallelism: str) -> nn.Module:
    """A frozen reference model (forward only) ready for this world: sharded as the policy with ``"fsdp"`` (so it
    does not cost a whole copy per rank), else as is (DDP has nothing to synchronize without gradients)."""
    if parallelism == "fsdp" and dist.is_initialized():
        return _fully_shard(reference)
    return reference


def reshard(engine: nn.Module) -> None:
    """Free the unsharded parameters of an FSDP2 root after a forward-only pass (FSDP2 keeps them for the backward
    that a frozen model never runs); nothing otherwise."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(engine, FSDPModule):
        engine.reshard()


def _fully_shard(policy: Policy) -> Policy:
    """FSDP2 over ``world_size()`` ranks: each decoder layer (the model's ``_no_split_modules`` classes) its own
    ``fully_shard`` group, ``policy`` the root, ``generate`` registered as a forward method."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device().type, (world_size(),))
    layer_classes = set(getattr(hf.unwrap_model(policy.model), "_no_split_modules", None) or ())
    for module in policy.model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    register_fsdp_forward_method(policy, "generate")
    return policy


def gradient_sync(engine: nn.Module, sync: bool):
    """A context for one micro-batch's forward and backward: DDP's ``no_sync`` unless ``sync`` (the last
    micro-batch of an optimizer step). FSDP2 reduce-scatters every micro-batch (keeping whole gradients unsharded
    in between would cost the memory sharding saves)."""
    from torch.nn.parallel import DistributedDataParallel

    if not sync and isinstance(engine, DistributedDataParallel):
        return engine.no_sync()
    return contextlib.nullcontext()


def is_synced_generation(engine: nn.Module) -> bool:
    """Whether ``generate`` must keep every rank stepping until all are done (FSDP2: each step all-gathers)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(engine, FSDPModule)


# --- full state dicts ----------------------------------------------------------------------------------------

_FULL = dict(full_state_dict=True, cpu_offload=True)


def model_state_dict(engine: nn.Module) -> dict[str, Tensor]:
    """The whole (unsharded) state dict of the policy's model, on the CPU, on rank 0 (empty elsewhere); every rank
    must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(engine, options=StateDictOptions(**_FULL))
    return {k.removeprefix("model."): v for k, v in state.items()}


def optimizer_state_dict(engine: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state keyed by parameter names (so it loads at any world size), on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(engine, optimizer, options=StateDictOptions(**_FULL))


def load_optimizer_state_dict(engine: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an :func:`optimizer_state_dict` (given on every rank) into ``optimizer``, sharding it as the model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(engine, optimizer, state, options=StateDictOptions(full_state_dict=True))
