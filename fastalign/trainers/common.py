"""What every trainer shares: the common config fields, batch order (split across ranks), gradient checkpointing,
mixed precision, optimizer and schedule, the optimizer step that skips non-finite updates, checkpoints with exact
resume, JSONL metrics and the progress bar (rank 0 writes; metrics are averaged over ranks first).

A checkpoint is written into ``checkpoint-<step>.tmp`` and renamed to ``checkpoint-<step>`` once complete, its
manifest (``checkpoint_manifest.json``: every file and its size) written last: a run killed during a save leaves
the previous checkpoints intact, and resuming takes the newest checkpoint whose manifest matches its files."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import types
import typing
import warnings
from dataclasses import dataclass, fields
from itertools import islice

import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .. import hf
from . import distributed

LOSS_BACKENDS = ("fused", "reference")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "checkpoint_manifest.json"
CONFIG_FILE = "training_config.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)(\.tmp)?")  # complete, or (.tmp) being written
RESUMABLE_CHANGES = frozenset({
    "output_dir", "overwrite_output_dir", "logging_steps", "save_steps", "eval_steps", "per_device_eval_batch_size",
    "disable_tqdm", "per_device_train_batch_size", "gradient_accumulation_steps", "parallelism",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "torch_compile", "torch_compile_backend"})
"""Config fields a resumed run may change: where and how often it writes, and how a step's global batch (checked
on its own) is split and computed. Any other field changes the run, so it must match the checkpoint's."""


def _type_ok(value, hint) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_field_types(config) -> None:
    """Raise ``TypeError`` naming the first field whose value does not match its annotation."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        hint, value = hints[f.name], getattr(config, f.name)
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if not any(value is None if t is type(None) else _type_ok(value, t) for t in allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise TypeError(f"{type(config).__name__}.{f.name}: expected {names}, got {value!r}")


def require(config, name: str, ok: bool, expected: str) -> None:
    """Raise ``ValueError`` ``"<Config>.<name>: expected <expected>, got <value>"`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name}: expected {expected}, got {getattr(config, name)!r}")


@dataclass
class TrainingConfig:
    """Fields both trainers share, with the names and meaning of ``transformers.TrainingArguments``.

    ``max_steps > 0`` overrides ``num_train_epochs``. ``warmup_steps > 0`` overrides ``warmup_ratio``.
    ``save_steps``/``eval_steps``/``logging_steps``: every that many steps (0: never; the final model is always
    saved to ``output_dir``). ``loss_backend``: ``"fused"`` (fastalign's ops, no logits) or ``"reference"``
    (materialized logits, the same math, for comparison). ``disable_dropout``: set every dropout to 0 (as TRL).
    ``parallelism``: under ``torchrun`` with several processes, ``"ddp"`` (a replica per rank) or ``"fsdp"``
    (FSDP2: parameters, gradients and optimizer state sharded); ignored with one process. The ``per_device_*``
    sizes are per process: a step's global batch is ``world_size`` times larger.

    ``gradient_checkpointing``: recompute each decoder layer's activations in the backward instead of keeping them
    (``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint``; default ``{"use_reentrant": False}``);
    the loss reads the last hidden states, outside the checkpointed layers. ``bf16`` / ``fp16``: mixed precision,
    the forward passes under ``torch.autocast`` in that dtype with fp32 master weights (the fused ops take the
    hidden states and lm_head weight in that dtype and accumulate in fp32); ``fp16`` adds a dynamic loss scaler
    (``torch.amp.GradScaler``) and needs CUDA; ``bf16`` also runs on the CPU (CPU autocast).

    ``overwrite_output_dir``: a fresh run (no ``resume_from_checkpoint``) in an ``output_dir`` that holds
    checkpoints or metrics of an earlier run is an error unless this is True; then the old checkpoints are deleted
    (the name of the ``TrainingArguments`` field of transformers 4; transformers 5.25 and TRL 1.16 no longer have
    it).

    ``torch_compile``: compile the policy's forward with ``torch.compile`` (the model and the fused loss in one
    graph, the fused ops as registered operators: two passes over the vocabulary, see ``fastalign.ops.registered``;
    no packed batches), with ``torch_compile_backend`` (default inductor).
    """

    output_dir: str = "fastalign-output"
    overwrite_output_dir: bool = False
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    save_steps: int = 0
    eval_steps: int = 0
    seed: int = 42
    loss_backend: str = "fused"
    disable_dropout: bool = True
    disable_tqdm: bool = False
    parallelism: str = "ddp"
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict | None = None
    bf16: bool = False
    fp16: bool = False
    torch_compile: bool = False
    torch_compile_backend: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            require(self, name, getattr(self, name) >= 1, "an int >= 1")
        for name in ("warmup_steps", "save_steps", "eval_steps", "weight_decay", "max_grad_norm"):
            require(self, name, getattr(self, name) >= 0, "a number >= 0")
        require(self, "learning_rate", self.learning_rate > 0, "a number > 0")
        require(self, "num_train_epochs", self.num_train_epochs > 0 or self.max_steps > 0,
                "a number > 0 (or max_steps > 0)")
        require(self, "warmup_ratio", 0 <= self.warmup_ratio < 1, "a number in [0, 1)")
        require(self, "lr_scheduler_type", self.lr_scheduler_type in LR_SCHEDULERS, f"one of {LR_SCHEDULERS}")
        require(self, "loss_backend", self.loss_backend in LOSS_BACKENDS, f"one of {LOSS_BACKENDS}")
        require(self, "parallelism", self.parallelism in distributed.PARALLELISM,
                f"one of {distributed.PARALLELISM}")
        require(self, "fp16", not (self.fp16 and self.bf16), "False when bf16=True (pick one precision)")
        require(self, "output_dir", not os.path.isfile(self.output_dir), "a directory (or a path to create), not a "
                "file")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The forward passes' autocast dtype (None: full precision)."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else None

    def total_steps(self, steps_per_epoch: int) -> int:
        """``max_steps`` if set, else ``num_train_epochs`` epochs of ``steps_per_epoch`` (at least 1)."""
        return self.max_steps if self.max_steps > 0 else max(1, math.ceil(self.num_train_epochs * steps_per_epoch))


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's ``batch_size`` indices of the batch of ``step``. Epoch ``e`` walks a permutation of ``range(n)``
    drawn from ``seed + e`` in global batches of ``batch_size x world_size`` (the last incomplete one dropped), and
    rank ``r`` takes items ``r, r + world_size, ...`` of each (torch's ``DistributedSampler``): together the ranks'
    batches are the one-process batch of ``batch_size x world_size``. A function of ``step``: resuming is exact."""
    epoch, k = divmod(step, n // (batch_size * world_size))
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    return list(islice(sampler, k * batch_size, (k + 1) * batch_size))


def micro_batch_indices(n: int, micro: int, accumulation: int, step: int, seed: int) -> list[list[int]]:
    """This rank's ``accumulation`` micro-batches of ``micro`` indices of ``step`` (see :func:`batch_indices`)."""
    indices = batch_indices(n, micro * accumulation, step, seed, distributed.rank(), distributed.world_size())
    return [indices[k * micro:(k + 1) * micro] for k in range(accumulation)]


def steps_per_epoch(n: int, batch_size: int, what: str) -> int:
    """``n // batch_size`` (``batch_size``: the global batch), or a ``ValueError`` when one batch needs more than
    ``n`` items."""
    if n < batch_size:
        processes = distributed.world_size()
        raise ValueError(f"{what}: {n} item(s) is less than one batch of {batch_size}"
                         f"{f' over {processes} processes' if processes > 1 else ''}; add data or reduce "
                         f"per_device_train_batch_size / gradient_accumulation_steps")
    return n // batch_size


def eval_batches(n: int, batch_size: int) -> list[tuple[list[int], int]]:
    """This rank's share of ``range(n)`` for evaluation (items ``rank, rank + world_size, ...``) in batches of at
    most ``batch_size``, each with its number of real items. Every rank gets as many batches as the others (forward
    passes can be collectives, under FSDP): a rank out of items gets a batch of item 0 that counts 0 times."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = list(range(rank, n, world))
    count = math.ceil(math.ceil(n / world) / batch_size)
    batches = (mine[i * batch_size:(i + 1) * batch_size] for i in range(count))
    return [(b, len(b)) if b else ([0], 0) for b in batches]


def write_manifest(directory: str) -> None:
    """Write ``directory/checkpoint_manifest.json``, ``{"files": {relative path: size in bytes}}`` of every file
    under ``directory``: the last file of a checkpoint."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, directory)] = os.path.getsize(path)
    with open(os.path.join(directory, MANIFEST_FILE), "w") as out:
        json.dump({"files": dict(sorted(files.items()))}, out, indent=1)


def checkpoint_problem(directory: str) -> str | None:
    """None if ``directory`` is a complete checkpoint (its manifest lists ``trainer_state.pt`` and every listed
    file has its listed size), else what is wrong, naming the file."""
    manifest = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(manifest):
        return f"no {manifest} (the save did not complete)"
    try:
        with open(manifest) as stored:
            files = json.load(stored)["files"]
        sizes = {str(name): int(size) for name, size in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest} is not a manifest"
    for name in (STATE_FILE, CONFIG_FILE):
        if name not in sizes:
            return f"{manifest} does not list {name}"
    for name, size in sizes.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path)} bytes, the manifest says {size}"
    return None


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no parameter requiring grad: the reference model."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def mean_metrics(records: list[dict[str, float]], summed: tuple[str, ...] = ()) -> dict[str, float]:
    """Key-wise mean of metric dicts (a key missing from some records averages over the others); the ``summed``
    keys are summed instead (micro-batch shares of a loss normalized over the whole step)."""
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: sum(r[k] for r in records if k in r) / (1 if k in summed else sum(k in r for r in records))
            for k in keys}


def as_floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


class Trainer:
    """The state and steps every trainer shares. A subclass sets ``name``, ``progress_metrics``, ``summed_metrics``
    and ``eval_dataset`` (None: no evaluation), writes ``evaluate()`` and the loop, calling ``begin``,
    ``backward`` (for each loss), ``optimizer_step``, ``end_step`` and ``finish``; it wraps a reference model with
    ``reference_engine`` and runs any other forward under ``autocast()``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the trainer joins the process group, every rank starts from rank 0's
    weights, and ``train()`` wraps the policy (``config.parallelism``); ``self.engine`` is what to call for any
    forward of the policy (``self.engine(fn, *args)`` runs ``fn(model, *args)``, see
    :class:`~fastalign.trainers.distributed.Policy`), ``self.model`` stays the ``transformers`` model.
    """

    name = "train"
    progress_metrics: tuple[str, ...] = ()
    summed_metrics: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, tokenizer, config: TrainingConfig):
        distributed.init()
        if distributed.world_size() > 1:
            model.to(distributed.device())
            distributed.broadcast_module(model)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = hf.model_device(model)
        require(config, "fp16", not config.fp16 or self.device.type == "cuda",
                f"False for a model on {self.device.type} (fp16 mixed precision needs CUDA; use bf16=True)")
        if config.gradient_checkpointing:
            hf.enable_gradient_checkpointing(model, config.gradient_checkpointing_kwargs)
        self.policy = self.engine = distributed.Policy(model, config.autocast_dtype)
        if config.torch_compile:  # the forward (model and fused loss) only: generation and evaluation stay eager
            self.policy.compile(backend=config.torch_compile_backend or "inductor")
        self.scaler = distributed.grad_scaler(self.device) if config.fp16 else None
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer: needs a pad_token or an eos_token")
        if config.disable_dropout:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.step = 0
        self.history: list[dict] = []
        self.eval_dataset = None

    def autocast(self):
        """The mixed-precision context of the config (``bf16``/``fp16``) for a forward pass outside ``engine``."""
        return distributed.autocast(self.device, self.config.autocast_dtype)

    def reference_engine(self, ref_model: nn.Module) -> nn.Module:
        """A frozen reference model, its forwards under the policy's autocast, ready for this world (see
        :func:`~fastalign.trainers.distributed.wrap_reference`): call it as ``engine(fn, *args)``."""
        return distributed.wrap_reference(distributed.Policy(ref_model, self.config.autocast_dtype),
                                          self.config.parallelism)

    # --- optimization ---------------------------------------------------------------------------------------

    def setup_optimizer(self, optimizer_steps: int) -> None:
        """AdamW over the trainable parameters and the warmup + decay schedule over ``optimizer_steps``."""
        from transformers import get_scheduler

        c = self.config
        self.params = [p for p in self.engine.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                           eps=c.adam_epsilon, weight_decay=c.weight_decay)
        warmup = c.warmup_steps or math.ceil(c.warmup_ratio * optimizer_steps)
        self.scheduler = get_scheduler(c.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=optimizer_steps)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, the loss scaled by the fp16 loss scaler if there is one."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def optimizer_step(self, loss_finite: bool) -> dict[str, float]:
        """Clip the gradients and step, unless the loss (on any rank) or the gradient norm is not finite: then
        warn, drop the gradients and leave weights and optimizer state untouched. The schedule advances either
        way. With fp16 the gradients are unscaled first and the loss scaler updated (an overflow lowers the scale
        and skips the step, without a warning: the scaler expects a few)."""
        loss_finite = distributed.all_true(loss_finite)
        max_norm = self.config.max_grad_norm or math.inf
        grad_norm = math.nan
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # records overflows (on every rank under FSDP) for update()
        if loss_finite:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
        skipped = not math.isfinite(grad_norm)
        if skipped and self.scaler is None:
            what = "gradient norm" if loss_finite else "loss"
            warnings.warn(f"{self.name} step {self.step + 1}: non-finite {what}; update skipped", RuntimeWarning)
        elif not skipped:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return {"grad_norm": grad_norm, "learning_rate": learning_rate, "skipped": float(skipped)}

    def update(self, parts: list, compute) -> dict[str, float]:
        """One optimizer step over micro-batches: ``loss, metrics = compute(part)`` and its backward for each part
        (DDP's gradients synchronized on the last only), then :meth:`optimizer_step`. Returns the micro-batches'
        metrics (means; ``summed_metrics`` summed) and the step's."""
        finite, records = True, []
        for k, part in enumerate(parts):
            with distributed.gradient_sync(self.engine, k == len(parts) - 1):
                loss, metrics = compute(part)
                self.backward(loss)  # even if not finite: the ranks' gradient reductions must match
            finite &= bool(torch.isfinite(loss))
            records.append(metrics)
        return {**mean_metrics(records, self.summed_metrics), **self.optimizer_step(finite)}

    # --- loop bookkeeping -----------------------------------------------------------------------------------

    def begin(self, total_steps: int, optimizer_steps: int, global_batch: int,
              resume_from_checkpoint: str | bool | None) -> None:
        """Load the checkpoint's weights if resuming, wrap the policy for this world, build the optimizer and
        schedule, restore their state, open the metrics file and the progress bar. ``global_batch``: the samples
        of one step over all ranks, which a checkpoint must share to resume."""
        c = self.config
        self.total_steps, self.global_batch = total_steps, global_batch
        self.metrics_path = os.path.join(c.output_dir, METRICS_FILE)
        if not resume_from_checkpoint:
            self.check_fresh_start()
        state = self.load_checkpoint(resume_from_checkpoint) if resume_from_checkpoint else None
        self.engine = distributed.wrap(self.policy, c.parallelism)
        self.setup_optimizer(optimizer_steps)
        if state is not None:
            self.restore(state)
        else:
            if distributed.is_main():
                for name in self.earlier_run_files():  # only with overwrite_output_dir (check_fresh_start)
                    path = os.path.join(c.output_dir, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
                os.makedirs(c.output_dir, exist_ok=True)
                open(self.metrics_path, "w").close()
            if distributed.world_size() > 1:  # each rank its own random stream (sampling)
                torch.manual_seed(c.seed + distributed.rank())
        self._window: list[dict[str, float]] = []
        self.progress = tqdm(total=total_steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                             disable=c.disable_tqdm or not distributed.is_main())

    def pair_schedule(self, n: int) -> tuple[int, int, int]:
        """``(global batch, steps per epoch, total steps)`` of a run over ``n`` training pairs, each step
        ``per_device_train_batch_size x gradient_accumulation_steps`` pairs per rank."""
        c = self.config
        batch = c.per_device_train_batch_size * c.gradient_accumulation_steps * distributed.world_size()
        per_epoch = steps_per_epoch(n, batch, "train_dataset")
        return batch, per_epoch, c.total_steps(per_epoch)

    def evaluate(self) -> dict[str, float]:
        """Metrics on ``eval_dataset``, named ``eval_<metric>`` (each trainer defines it)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate_batches(self, batch_metrics) -> dict[str, float]:
        """``batch_metrics(indices) -> metrics`` over the whole eval dataset in eval mode (the ranks share it), the
        means over items, prefixed ``eval_``."""
        self.model.eval()
        records, weights = [], []
        for indices, count in eval_batches(len(self.eval_dataset), self.config.per_device_eval_batch_size):
            records.append(batch_metrics(indices))
            weights.append(count)
        self.model.train()
        return {f"eval_{k}": v for k, v in distributed.weighted_average(records, weights).items()}

    def eval_due(self) -> bool:
        return self.eval_dataset is not None and self.config.eval_steps > 0 and self.step % self.config.eval_steps == 0

    def end_step(self, metrics: dict[str, float]) -> None:
        """Count the step, log its metrics (averaged over ranks, then over ``logging_steps``), save a checkpoint
        and evaluate when due."""
        self.step += 1
        self._window.append(distributed.average(metrics))
        if self.step % self.config.logging_steps == 0 or self.step == self.total_steps:
            self.write_record(mean_metrics(self._window))
            self._window = []
        self.progress.update(1)
        if self.config.save_steps and self.step % self.config.save_steps == 0:
            self.save_checkpoint()
        if self.eval_due():
            self.write_record(self.evaluate())

    def write_record(self, metrics: dict[str, float]) -> None:
        """Append ``{"step", **metrics}`` to ``history`` and (rank 0) to ``metrics.jsonl``; show the key ones on the
        bar."""
        record = {"step": self.step, **metrics}
        self.history.append(record)
        if distributed.is_main():
            with open(self.metrics_path, "a") as out:
                out.write(json.dumps(record) + "\n")
        shown = {k.split("/")[-1]: f"{metrics[k]:.3g}" for k in self.progress_metrics if k in metrics}
        self.progress.set_postfix(shown, refresh=False)

    def finish(self) -> None:
        """Evaluate unless just done, close the progress bar, save the final model (and tokenizer, value head) to
        ``output_dir``."""
        if self.eval_dataset is not None and not self.eval_due():
            self.write_record(self.evaluate())
        self.progress.close()
        self.save_model(self.config.output_dir)

    # --- checkpoints ----------------------------------------------------------------------------------------

    def save_model(self, directory: str) -> None:
        """The whole model (gathered from the ranks), tokenizer and value head, written by rank 0."""
        state = distributed.model_state_dict(self.engine)
        if distributed.is_main():
            hf.save_pretrained(self.model, directory, self.tokenizer, state_dict=state)

    def save_checkpoint(self) -> str:
        """``output_dir/checkpoint-<step>``: the model (``hf.save_pretrained``), the tokenizer, in
        ``trainer_state.pt`` the step, the global batch, the optimizer state (whole, by parameter name), the
        schedule, the fp16 loss scaler and every rank's random number generator states, the config in
        ``training_config.json``, and last the manifest. Rank 0 writes, into ``checkpoint-<step>.tmp``, renamed
        into place when complete."""
        directory = os.path.join(self.config.output_dir, f"checkpoint-{self.step}")
        partial = directory + ".tmp"
        if distributed.is_main() and os.path.exists(partial):  # left by a run killed while saving
            shutil.rmtree(partial)
        self.save_model(partial)
        optimizer = distributed.optimizer_state_dict(self.engine, self.optimizer)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rng = distributed.gather_objects(rng)
        if distributed.is_main():
            state = {"step": self.step, "global_batch": self.global_batch, "optimizer": optimizer,
                     "scheduler": self.scheduler.state_dict(), "rng": rng}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, os.path.join(partial, STATE_FILE))
            with open(os.path.join(partial, CONFIG_FILE), "w") as out:
                json.dump(dataclasses.asdict(self.config), out, indent=1)
            write_manifest(partial)
            if os.path.exists(directory):  # a checkpoint of this step from before a resume
                shutil.rmtree(directory)
            os.rename(partial, directory)
        return directory

    def earlier_run_files(self) -> list[str]:
        """The names in ``output_dir`` that an earlier run left: checkpoints (complete or not) and a non-empty
        ``metrics.jsonl``."""
        out = self.config.output_dir
        if not os.path.isdir(out):
            return []
        names = sorted(n for n in os.listdir(out) if CHECKPOINT_NAME.fullmatch(n))
        metrics = os.path.join(out, METRICS_FILE)
        return names + [METRICS_FILE] * (os.path.isfile(metrics) and os.path.getsize(metrics) > 0)

    def check_fresh_start(self) -> None:
        """Refuse a fresh run in an ``output_dir`` holding an earlier run's files, unless ``overwrite_output_dir``."""
        old = self.earlier_run_files()
        if old and not self.config.overwrite_output_dir:
            shown = ", ".join(old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
            raise ValueError(f"{type(self.config).__name__}.output_dir: expected a directory without an earlier "
                             f"run, got {self.config.output_dir!r} holding {shown}; set overwrite_output_dir: true "
                             f"to start afresh (deleting them) or resume_from_checkpoint to continue that run")

    def latest_checkpoint(self) -> str:
        """The newest complete checkpoint in ``output_dir`` (see :func:`checkpoint_problem`); the newer ones skipped,
        with the reason, go to ``self.skipped_checkpoints``."""
        out = self.config.output_dir
        names = os.listdir(out) if os.path.isdir(out) else []
        found = sorted(((int(m.group(1)), not m.group(2), n) for n in names
                        if (m := CHECKPOINT_NAME.fullmatch(n))), reverse=True)
        self.skipped_checkpoints = []
        for _, final, name in found:
            directory = os.path.join(out, name)
            problem = checkpoint_problem(directory) if final else "a save cut off before it completed"
            if problem is None:
                return directory
            self.skipped_checkpoints.append(f"{directory} ({problem})")
        raise FileNotFoundError(f"resume_from_checkpoint: no {'complete ' if found else ''}checkpoint-*/ in {out}"
                                + "".join(f"; skipped {s}" for s in self.skipped_checkpoints))

    def checkpoint_state(self, checkpoint: str | bool, global_batch: int, mmap: bool = False) -> tuple[str, dict]:
        """The directory of a complete :meth:`save_checkpoint` checkpoint (``True``: the newest in ``output_dir``;
        every rank must see it) and its state, checked to have this run's ``global_batch`` and config (but for
        ``RESUMABLE_CHANGES``)."""
        self.skipped_checkpoints = []
        directory = self.latest_checkpoint() if checkpoint is True else str(checkpoint)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"resume_from_checkpoint: no such directory: {directory}")
        problem = checkpoint_problem(directory)
        if problem is not None:
            raise ValueError(f"resume_from_checkpoint: {directory} is not a complete checkpoint: {problem}")
        path = os.path.join(directory, STATE_FILE)
        try:
            state = torch.load(path, weights_only=True, mmap=mmap)
            with open(os.path.join(directory, CONFIG_FILE)) as stored:
                config = json.load(stored)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            raise ValueError(f"resume_from_checkpoint: cannot read {path}: {str(error).splitlines()[0]}") from None
        if state["global_batch"] != global_batch:
            raise ValueError(
                f"resume_from_checkpoint: {directory} was trained with a global batch of {state['global_batch']} "
                f"samples per step, this run has {global_batch} ({distributed.world_size()} process(es)); the "
                f"batch order, step count and schedule depend on it: set per_device_train_batch_size x "
                f"gradient_accumulation_steps x processes to {state['global_batch']} to resume")
        current = json.loads(json.dumps(dataclasses.asdict(self.config)))
        differ = [k for k in dict.fromkeys([*config, *current])
                  if k not in RESUMABLE_CHANGES and config.get(k, "(none)") != current.get(k, "(none)")]
        if differ:
            raise ValueError(f"resume_from_checkpoint: {directory} was trained with another config: "
                             + ", ".join(f"{k}={config.get(k, '(none)')!r} (this run: {current.get(k, '(none)')!r})"
                                         for k in differ)
                             + "; resume with the checkpoint's values, or start a fresh run")
        return directory, state

    def checkpoint_step(self, checkpoint: str | bool | None, global_batch: int) -> int:
        """The step ``train(resume_from_checkpoint=checkpoint)`` starts from (0 without a checkpoint, after
        :meth:`check_fresh_start`), known before :meth:`begin` loads the checkpoint's weights."""
        if not checkpoint:
            self.check_fresh_start()
            return 0
        return int(self.checkpoint_state(checkpoint, global_batch, mmap=True)[1]["step"])

    def load_checkpoint(self, checkpoint: str | bool) -> dict:
        """Read a checkpoint (:meth:`checkpoint_state`), load its weights into the model; return its state."""
        directory, state = self.checkpoint_state(checkpoint, self.global_batch)
        if distributed.is_main():
            for skipped in self.skipped_checkpoints:
                warnings.warn(f"resume_from_checkpoint: skipped {skipped}", RuntimeWarning)
            print(f"{self.name}: resuming from {directory} (step {state['step']})", file=sys.stderr, flush=True)
        hf.load_weights(self.model, directory)
        return state

    def restore(self, state: dict) -> None:
        """Restore the optimizer, schedule, loss scaler, step and random streams of a checkpoint, and drop the
        records after its step from ``metrics.jsonl``. With another world size the random streams restart from
        ``seed``, ``step`` and the rank (they cannot continue exactly)."""
        distributed.load_optimizer_state_dict(self.engine, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        if len(state["rng"]) == distributed.world_size():
            rng = state["rng"][distributed.rank()]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng:
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            torch.manual_seed(self.config.seed + distributed.world_size() * self.step + distributed.rank())
        kept = []
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path) as lines:
                kept = [line for line in lines if json.loads(line)["step"] <= self.step]
        distributed.barrier()  # every rank has read the records before rank 0 rewrites them
        if distributed.is_main():
            with open(self.metrics_path, "w") as out:
                out.writelines(kept)
        self.history = [json.loads(line) for line in kept]
