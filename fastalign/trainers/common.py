"""What both trainers share: the common config fields, batch order, optimizer and schedule, the optimizer step that
skips non-finite updates, checkpoints with exact resume, JSONL metrics and the progress bar."""
from __future__ import annotations

import copy
import glob
import json
import math
import os
import random
import re
import types
import typing
import warnings
from dataclasses import dataclass, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import hf

LOSS_BACKENDS = ("fused", "reference")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.pt"


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
    """

    output_dir: str = "fastalign-output"
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

    def total_steps(self, steps_per_epoch: int) -> int:
        """``max_steps`` if set, else ``num_train_epochs`` epochs of ``steps_per_epoch`` (at least 1)."""
        return self.max_steps if self.max_steps > 0 else max(1, math.ceil(self.num_train_epochs * steps_per_epoch))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the batch of ``step``: epoch ``e`` walks a permutation of ``range(n)`` drawn from ``seed + e``
    (the last incomplete batch of an epoch is dropped). A function of ``step``, so that resuming is exact."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[k * batch_size:(k + 1) * batch_size].tolist()


def steps_per_epoch(n: int, batch_size: int, what: str) -> int:
    """``n // batch_size``, or a ``ValueError`` when one batch needs more than ``n`` items."""
    if n < batch_size:
        raise ValueError(f"{what}: {n} item(s) is less than one batch of {batch_size}; add data or reduce "
                         f"per_device_train_batch_size / gradient_accumulation_steps")
    return n // batch_size


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no parameter requiring grad: the reference model."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def mean_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of metric dicts (a key missing from some records averages over the others)."""
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in keys}


def as_floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


class Trainer:
    """The state and steps both trainers share. A subclass sets ``name``, ``progress_metrics`` and ``eval_dataset``
    (None: no evaluation), writes ``evaluate()`` and the loop, calling ``begin``, ``optimizer_step``,
    ``end_step`` and ``finish``."""

    name = "train"
    progress_metrics: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, tokenizer, config: TrainingConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
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

    # --- optimization ---------------------------------------------------------------------------------------

    def setup_optimizer(self, optimizer_steps: int) -> None:
        """AdamW over the trainable parameters and the warmup + decay schedule over ``optimizer_steps``."""
        from transformers import get_scheduler

        c = self.config
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                           eps=c.adam_epsilon, weight_decay=c.weight_decay)
        warmup = c.warmup_steps or math.ceil(c.warmup_ratio * optimizer_steps)
        self.scheduler = get_scheduler(c.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=optimizer_steps)

    def optimizer_step(self, loss_finite: bool) -> dict[str, float]:
        """Clip the gradients and step, unless the loss or the gradient norm is not finite: then warn, drop the
        gradients and leave weights and optimizer state untouched. The schedule advances either way."""
        max_norm = self.config.max_grad_norm or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm)) if loss_finite else math.nan
        skipped = not math.isfinite(grad_norm)
        if skipped:
            what = "gradient norm" if loss_finite else "loss"
            warnings.warn(f"{self.name} step {self.step + 1}: non-finite {what}; update skipped", RuntimeWarning)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return {"grad_norm": grad_norm, "learning_rate": learning_rate, "skipped": float(skipped)}

    # --- loop bookkeeping -----------------------------------------------------------------------------------

    def begin(self, total_steps: int, resume_from_checkpoint: str | bool | None) -> None:
        """Resume if asked, open the metrics file and the progress bar."""
        os.makedirs(self.config.output_dir, exist_ok=True)
        self.total_steps = total_steps
        self.metrics_path = os.path.join(self.config.output_dir, METRICS_FILE)
        if resume_from_checkpoint:
            self.resume(resume_from_checkpoint)
        else:
            open(self.metrics_path, "w").close()
        self._window: list[dict[str, float]] = []
        self.progress = tqdm(total=total_steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                             disable=self.config.disable_tqdm)

    def evaluate(self) -> dict[str, float]:
        """Metrics on ``eval_dataset``, named ``eval_<metric>`` (each trainer defines it)."""
        raise NotImplementedError

    def eval_due(self) -> bool:
        return self.eval_dataset is not None and self.config.eval_steps > 0 and self.step % self.config.eval_steps == 0

    def end_step(self, metrics: dict[str, float]) -> None:
        """Count the step, log its metrics (averaged over ``logging_steps``), save a checkpoint and evaluate when
        due."""
        self.step += 1
        self._window.append(metrics)
        if self.step % self.config.logging_steps == 0 or self.step == self.total_steps:
            self.write_record(mean_metrics(self._window))
            self._window = []
        self.progress.update(1)
        if self.config.save_steps and self.step % self.config.save_steps == 0:
            self.save_checkpoint()
        if self.eval_due():
            self.write_record(self.evaluate())

    def write_record(self, metrics: dict[str, float]) -> None:
        """Append ``{"step", **metrics}`` to ``metrics.jsonl`` and ``history``; show the key ones on the bar."""
        record = {"step": self.step, **metrics}
        self.history.append(record)
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
        hf.save_pretrained(self.model, self.config.output_dir, self.tokenizer)

    # --- checkpoints ----------------------------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        """``output_dir/checkpoint-<step>``: the model (``hf.save_pretrained``), the tokenizer, and in
        ``trainer_state.pt`` the step, optimizer, schedule and random number generator states."""
        directory = os.path.join(self.config.output_dir, f"checkpoint-{self.step}")
        hf.save_pretrained(self.model, directory, self.tokenizer)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "rng": rng}, os.path.join(directory, STATE_FILE))
        return directory

    def latest_checkpoint(self) -> str:
        found = glob.glob(os.path.join(self.config.output_dir, "checkpoint-*", STATE_FILE))
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint-*/ in {self.config.output_dir}")
        return os.path.dirname(max(found, key=lambda p: int(re.search(r"checkpoint-(\d+)", p).group(1))))

    def resume(self, checkpoint: str | bool) -> None:
        """Restore a :meth:`save_checkpoint` directory (``True``: the latest in ``output_dir``) into this trainer,
        and drop the records after its step from ``metrics.jsonl``."""
        directory = self.latest_checkpoint() if checkpoint is True else checkpoint
        path = os.path.join(directory, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume_from_checkpoint: no {STATE_FILE} in {directory}")
        state = torch.load(path, weights_only=True)
        hf.load_weights(self.model, directory)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = state["step"]
        kept = []
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path) as lines:
                kept = [line for line in lines if json.loads(line)["step"] <= self.step]
        with open(self.metrics_path, "w") as out:
            out.writelines(kept)
        self.history = [json.loads(line) for line in kept]
