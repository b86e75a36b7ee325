"""KTO trainer: unpaired examples (a prompt, a completion, a desirable/undesirable label) in, a policy trained with
the KTO loss out (TRL's ``KTOTrainer`` names, defaults and KL construction)."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from .. import hf
from ..objectives.kto import KTO_LOSS_TYPES, KTOOptions, kto_kl, kto_metric_means
from . import distributed, losses
from .common import (Trainer, TrainingConfig, as_floats, batch_indices, eval_batches, frozen_copy, mean_metrics,
                     require, steps_per_epoch)
from .data import (PairTokens, check_nonempty, check_preference_records, collate_pairs, encode_prompt,
                   encode_response, load_records, prompt_budget, record_name)

SUMMED_KEYS = tuple(f"{name}/{side}{suffix}" for side in ("chosen", "rejected")
                    for name, suffix in (("rewards", "_sum"), ("logps", "_sum"), ("count", "")))
"""TRL's per-batch sums and counts, added over micro-batches and ranks before ``kto_metric_means``."""


def unpair_preference_data(records: list[dict]) -> list[dict]:
    """TRL's ``unpair_preference_dataset``: each ``{"prompt", "chosen", "rejected"}`` record becomes
    ``{"prompt", "completion": chosen, "label": True}`` and ``{"prompt", "completion": rejected, "label": False}``
    (all chosen ones first, then the rejected ones)."""
    return ([{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in records]
            + [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in records])


def load_unpaired_data(data, name: str = "train_dataset") -> list[dict]:
    """Records ``{"prompt": str, "completion": str, "label": bool}`` (see ``load_records``); preference records
    ``{"prompt", "chosen", "rejected"}`` are unpaired first, as TRL's ``maybe_unpair_preference_dataset``."""
    records = load_records(data, name)
    if not records:
        raise ValueError(f"{name}: expected at least one record, got none")
    if all(isinstance(r, dict) and {"chosen", "rejected"} <= r.keys() for r in records):
        return unpair_preference_data(check_preference_records(records, data, name))
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)
                and isinstance(r.get("label"), bool)):
            raise ValueError(f"{record_name(data, name, i)}: expected string fields 'prompt' and 'completion' and "
                             f"a bool 'label', got {r!r:.200}")
        if r["label"]:
            check_nonempty(data, name, i, "completion", r["completion"])
    return records


@dataclass
class KTOConfig(TrainingConfig):
    """KTO options (TRL's ``KTOConfig`` names and defaults) on top of :class:`TrainingConfig`.

    ``loss_type``: ``kto`` or ``apo_zero_unpaired``. ``desirable_weight`` / ``undesirable_weight``: factors on the
    two kinds of examples' losses (KTO paper Eq. 8: keep ``desirable_weight * n_desirable / (undesirable_weight *
    n_undesirable)`` in ``[1, 4/3]``). ``max_length``: prompt + completion tokens; ``max_prompt_length``: prompt
    tokens (the prompt keeps its end, the completion its start). ``kto`` needs ``per_device_train_batch_size`` >= 2
    (its KL pairs come from the other examples of the batch).
    ``padding_free`` (TRL's name): each batch's sequences packed into one row without padding, the model given
    ``position_ids`` and the fused loss the packing (see ``fastalign.hf.packed_hidden_states``: flash-attention-2's
    varlen path, per-sequence ``sdpa``, or a block-diagonal causal mask on ``eager``).
    """

    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    padding_free: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "loss_type", self.loss_type in KTO_LOSS_TYPES, f"one of {KTO_LOSS_TYPES}")
        for name in ("max_length", "max_prompt_length"):
            require(self, name, getattr(self, name) is None or getattr(self, name) >= 1, "None or an int >= 1")
        require(self, "max_prompt_length", None in (self.max_length, self.max_prompt_length)
                or self.max_prompt_length < self.max_length, f"less than max_length={self.max_length}")
        require(self, "per_device_train_batch_size", self.loss_type != "kto" or self.per_device_train_batch_size > 1,
                "an int >= 2 for loss_type='kto' (with one example the KL term equals the implied reward)")
        try:
            self.options  # checks beta and the weights
        except (TypeError, ValueError) as error:
            raise type(error)(f"{type(self).__name__}.{error}") from None

    @property
    def options(self) -> KTOOptions:
        return KTOOptions(**{f.name: getattr(self, f.name) for f in fields(KTOOptions)})


class KTOTrainer(Trainer):
    """``KTOTrainer(model, tokenizer, train_dataset, config, ref_model=None, eval_dataset=None).train()``.

    Datasets: records ``{"prompt", "completion", "label"}`` (or preference pairs, unpaired) as a list, a JSONL path
    or a ``datasets.Dataset``. ``ref_model`` None: a frozen copy of ``model`` as it is now (forward only: whole on
    every rank under DDP, sharded as the policy under FSDP). Each micro-batch of ``b`` examples brings its KL pairs
    as TRL builds them: example ``k``'s prompt with example ``k - 1``'s completion (``k = 0`` takes the last one),
    within the batch as drawn; their policy (no gradient) and reference log-probs give the batch KL estimate
    ``kto_kl``, averaged over the ranks. The loss is the mean over the step's examples on all ranks.
    Metrics (TRL's): ``loss``, ``kl``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected``, ``count/chosen``, ``count/rejected`` (a side absent from a step is
    left out of that step's record).
    """

    name = "kto"
    progress_metrics = ("loss", "kl", "rewards/margins")
    summed_metrics = ("loss", *SUMMED_KEYS)

    def __init__(self, model: nn.Module, tokenizer, train_dataset, config: KTOConfig | None = None,
                 ref_model: nn.Module | None = None, eval_dataset=None):
        config = config or KTOConfig()
        super().__init__(model, tokenizer, config)
        self.train_examples = self.tokenize(train_dataset, "train_dataset")
        if eval_dataset is not None:
            self.eval_dataset = self.tokenize(eval_dataset, "eval_dataset")
        self.ref_model = ref_model.to(self.device).eval() if ref_model is not None else frozen_copy(model)
        distributed.broadcast_module(self.ref_model)
        self.ref_engine = self.reference_engine(self.ref_model)

    def tokenize(self, dataset, name: str) -> list[tuple[list[int], str, bool]]:
        """``(prompt ids, completion text, label)`` per example; the completion is tokenized against the prompt it
        is paired with (its own, or another's for a KL pair), cut to fit ``max_length``."""
        budget = prompt_budget(self.config.max_length, self.config.max_prompt_length)
        return [(encode_prompt(self.tokenizer, r["prompt"], budget), r["completion"], r["label"])
                for r in load_unpaired_data(dataset, name)]

    def batch(self, examples, indices: list[int]) -> dict:
        """Collated ``input_ids``, ``attention_mask``, ``labels`` ``[2b, T]``: the ``b`` examples, then their KL
        pairs (prompt ``k``, completion ``k - 1``); ``label`` ``[b]`` bool."""
        chosen = [examples[i] for i in indices]
        kl_completions = [chosen[-1][1]] + [text for _, text, _ in chosen[:-1]]  # TRL's _get_kl_dataset
        pairs = [PairTokens(prompt, *(encode_response(self.tokenizer, text, len(prompt), self.config.max_length)
                                      for text in (completion, kl_completion)))
                 for (prompt, completion, _), kl_completion in zip(chosen, kl_completions)]
        batch = {k: v.to(self.device) for k, v in collate_pairs(pairs, self.pad_token_id).items()}
        batch["label"] = torch.tensor([label for *_, label in chosen], dtype=torch.bool, device=self.device)
        return batch

    def sequence_logps(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Inside a forward (policy or reference): sequence log-prob sums ``[N]`` of the labelled tokens."""
        parts, packed = hf.lm_inputs(model, input_ids, attention_mask, labels, self.config.padding_free)
        return losses.token_logprobs(*parts.lm_problem, self.config.loss_backend, packed=packed,
                                     transform=parts.transform).sum(-1)  # 0 off the completion

    @torch.no_grad()
    def reference_and_kl(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        """Reference log-probs ``[b]`` of the examples, and the batch KL estimate (None for ``apo_zero_unpaired``,
        which has no KL term): policy (no gradient) and reference log-probs of the KL pairs."""
        b = batch["label"].shape[0]
        if not self.config.options.uses_kl:
            rows = [batch[k][:b] for k in ("input_ids", "attention_mask", "labels")]
            ref = self.ref_engine(self.sequence_logps, *rows)
            distributed.reshard(self.ref_engine)
            return ref, None
        ref = self.ref_engine(self.sequence_logps, batch["input_ids"], batch["attention_mask"], batch["labels"])
        distributed.reshard(self.ref_engine)
        policy_kl = self.engine(self.sequence_logps, *(batch[k][b:] for k in ("input_ids", "attention_mask",
                                                                              "labels")))
        return ref[:b], kto_kl(policy_kl, ref[b:])

    def compute_loss(self, batch: dict, num_examples: int | None = None) -> tuple[Tensor, dict[str, float]]:
        """KTO loss of one collated batch and its per-batch metrics (TRL's sums and counts, ``kl``, ``loss``; both
        sides' keys always present, 0 for an absent side). ``num_examples``: divisor of the losses' sum."""
        ref, kl = self.reference_and_kl(batch)
        loss, metrics = self.engine(self.policy_loss, batch, ref, kl, self.config.options, num_examples)
        return loss, {"loss": float(loss.detach()), **dict.fromkeys(SUMMED_KEYS, 0.0), **as_floats(metrics)}

    def policy_loss(self, model: nn.Module, batch: dict, ref: Tensor, kl: Tensor | None, options: KTOOptions,
                    num_examples):
        """Inside the policy's forward: hidden states of the examples and the KTO loss on them (``options`` built
        outside: a compiled forward cannot trace ``dataclasses.fields``)."""
        b = batch["label"].shape[0]
        parts, packed = hf.lm_inputs(model, *(batch[k][:b] for k in ("input_ids", "attention_mask", "labels")),
                                     self.config.padding_free)
        return losses.kto_loss(*parts.lm_problem, batch["label"], ref, kl, options, self.config.loss_backend,
                               num_examples=num_examples, packed=packed, transform=parts.transform)

    @staticmethod
    def step_metrics(metrics: dict[str, float]) -> dict[str, float]:
        """TRL's logged metrics from summed per-batch ones: sums and counts added over the ranks first."""
        return kto_metric_means(distributed.average(metrics))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics over the whole eval dataset (shared by the ranks), prefixed ``eval_``: ``loss`` and ``kl`` are
        means over examples, rewards and log-probs sums over counts."""
        self.model.eval()
        records, weights = [], []
        for indices, count in eval_batches(len(self.eval_dataset), self.config.per_device_eval_batch_size):
            records.append(self.compute_loss(self.batch(self.eval_dataset, indices))[1])
            weights.append(count)
        self.model.train()
        means = distributed.weighted_average([{k: r[k] for k in ("loss", "kl")} for r in records], weights)
        sums = distributed.weighted_average([{k: r[k] for k in SUMMED_KEYS} for r in records],
                                            [float(w > 0) for w in weights])
        return {f"eval_{k}": v for k, v in kto_metric_means({**means, **sums}).items()}

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run the training loop; returns the logged records (also in ``output_dir/metrics.jsonl``)."""
        c = self.config
        micro, accumulation, world = c.per_device_train_batch_size, c.gradient_accumulation_steps, \
            distributed.world_size()
        per_epoch = steps_per_epoch(len(self.train_examples), micro * accumulation * world, "train_dataset")
        total = c.total_steps(per_epoch)
        self.begin(total, total, micro * accumulation * world, resume_from_checkpoint)
        self.model.train()
        while self.step < total:
            indices = batch_indices(len(self.train_examples), micro * accumulation, self.step, c.seed,
                                    distributed.rank(), world)
            step_metrics, finite = [], True
            for k in range(accumulation):
                batch = self.batch(self.train_examples, indices[k * micro:(k + 1) * micro])
                with distributed.gradient_sync(self.engine, k == accumulation - 1):
                    loss, metrics = self.compute_loss(batch, micro * accumulation)
                    self.backward(loss)  # even if not finite: the ranks' gradient reductions must match
                finite &= bool(torch.isfinite(loss))
                step_metrics.append(metrics)
            metrics = {**self.step_metrics(mean_metrics(step_metrics, self.summed_metrics)),
                       **self.optimizer_step(finite), "epoch": (self.step + 1) / per_epoch}
            self.end_step(metrics)
        self.finish()
        return self.history
