"""DPO trainer: preference pairs in, a policy trained with the fused DPO loss out (TRL's names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import hf
from ..objectives.dpo import DPOOptions, sequence_logps
from . import distributed, losses
from .common import Trainer, TrainingConfig, as_floats, micro_batch_indices, require
from .data import IGNORE_INDEX, collate_ranked, load_preference_data, load_ranked_data, tokenize_ranking


@dataclass
class DPOConfig(TrainingConfig):
    """DPO options (TRL's ``DPOConfig`` names) on top of :class:`TrainingConfig`.

    ``loss_type``: a name or a list of names of ``fastalign.objectives.dpo.DPO_LOSS_TYPES``, with ``loss_weights``;
    ``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau``, ``ld_alpha``, ``label_smoothing``,
    ``rpo_alpha``, ``reference_free``: as TRL (formulas: ``fastalign.objectives.dpo``). ``use_weighting``: WPO.
    ``num_responses > 2``: ranked records ``{"prompt", "completions":
    [best, ..., worst]}`` and the Plackett-Luce loss. ``max_length``: prompt + response tokens;
    ``max_prompt_length``: prompt tokens (the prompt keeps its end, the responses their start). Reference log-probs
    (sums over the completion, as TRL precomputes them) are computed when ``train()`` starts, for the batches of
    the steps it will run only (and of the eval dataset when the trainer is built).
    ``padding_free`` (TRL's name): each batch's sequences packed into one row without padding, the model given
    ``position_ids`` and the fused loss the packing (see ``fastalign.hf.packed_hidden_states``: flash-attention-2's
    varlen path, per-sequence ``sdpa``, or a block-diagonal causal mask on ``eager``).
    """

    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: str | list = "sigmoid"  # a name or a list of names
    loss_weights: list | None = None  # one float per loss type
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    ld_alpha: float | None = None
    use_weighting: bool = False
    num_responses: int = 2
    rpo_alpha: float | None = None
    reference_free: bool = False
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    padding_free: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_length", "max_prompt_length"):
            require(self, name, getattr(self, name) is None or getattr(self, name) >= 1, "None or an int >= 1")
        require(self, "max_prompt_length", None in (self.max_length, self.max_prompt_length)
                or self.max_prompt_length < self.max_length, f"less than max_length={self.max_length}")
        try:
            self.options  # checks the loss options
        except (TypeError, ValueError) as error:
            raise type(error)(f"{type(self).__name__}.{error}") from None

    @property
    def options(self) -> DPOOptions:
        return DPOOptions(**{f.name: getattr(self, f.name) for f in fields(DPOOptions)})


class DPOTrainer(Trainer):
    """``DPOTrainer(model, tokenizer, train_dataset, config, ref_model=None, eval_dataset=None).train()``.

    Datasets: records ``{"prompt", "chosen", "rejected"}`` (``num_responses > 2``: ``{"prompt", "completions":
    [best, ..., worst]}``) as a list, a JSONL path or a ``datasets.Dataset``.
    ``ref_model`` None: the reference is ``model`` before training (its log-probs are computed before the first
    step, or the checkpoint's weights are loaded, for the micro-batches the run will use: a ``max_steps=10`` run
    does 10 steps' reference forwards, not the whole dataset's). One step = ``gradient_accumulation_steps``
    micro-batches of ``per_device_train_batch_size``
    pairs on each rank; the loss is the mean over the step's pairs on all ranks (the RPO term over their chosen
    tokens), so N ranks x b pairs give the gradient of one process x N*b pairs. Logged: TRL's reward and log-prob
    metrics; not yet its metrics over the vocabulary (token means, which need token-weighted averaging over
    micro-batches and ranks).
    """

    name = "dpo"
    progress_metrics = ("loss", "rewards/accuracies", "rewards/margins")
    summed_metrics = ("loss", "nll_loss")

    def __init__(self, model: nn.Module, tokenizer, train_dataset, config: DPOConfig | None = None,
                 ref_model: nn.Module | None = None, eval_dataset=None):
        config = config or DPOConfig()
        super().__init__(model, tokenizer, config)
        self.train_pairs = self.tokenize(train_dataset, "train_dataset")
        if eval_dataset is not None:
            self.eval_dataset = self.tokenize(eval_dataset, "eval_dataset")
        self.reference = None if config.reference_free else (ref_model or model)
        self.eval_ref = None if self.eval_dataset is None else self.eval_reference_logps()

    def tokenize(self, dataset, name: str):
        """Each record's prompt and ranked responses (``RankedTokens``; pairs: chosen, rejected)."""
        c = self.config
        if c.num_responses == 2:
            texts = [(r["prompt"], [r["chosen"], r["rejected"]]) for r in load_preference_data(dataset, name)]
        else:
            texts = [(r["prompt"], r["completions"]) for r in load_ranked_data(dataset, c.num_responses, name)]
        return [tokenize_ranking(self.tokenizer, prompt, completions, c.max_length, c.max_prompt_length)
                for prompt, completions in texts]

    def batch(self, pairs, indices: list[int], ref: torch.Tensor | None) -> dict:
        """Collated groups (``input_ids``, ``attention_mask``, ``labels`` ``[K*B, T]``, best responses first) and
        their reference log-probs ``ref_logps [K, B]`` (None without a reference)."""
        batch = {k: v.to(self.device) for k, v in collate_ranked([pairs[i] for i in indices],
                                                                 self.pad_token_id).items()}
        batch["ref_logps"] = ref
        return batch

    @torch.no_grad()
    def reference_logps(self, pairs, batches: list[list[int]], what: str = "reference log-probs") -> \
            torch.Tensor | None:
        """Sequence log-probs ``[K, sum of the batch sizes]`` (best first; sums, LD-DPO weighted) of the reference
        model on ``pairs``, one forward per batch of ``batches`` (indices, in order), with a progress bar on rank 0;
        None without a reference."""
        reference = self.reference
        if reference is None:
            return None
        was_training = reference.training
        reference.eval()
        device = hf.get_lm_head(reference).weight.device
        logps = [torch.zeros(self.config.num_responses, 0, device=device)]
        for indices in tqdm(batches, desc=f"{self.name}: {what}", dynamic_ncols=True,
                            disable=self.config.disable_tqdm or not distributed.is_main()):
            batch = collate_ranked([pairs[i] for i in indices], self.pad_token_id)
            with self.autocast():
                parts, packed = hf.lm_inputs(reference, *(batch[k].to(device) for k in ("input_ids",
                                                                                         "attention_mask", "labels")),
                                             self.config.padding_free)
                tokens = losses.token_logprobs(*parts.lm_problem, self.config.loss_backend, packed=packed,
                                               transform=parts.transform)
            targets = parts.targets if packed is None else packed.unpack(parts.targets, IGNORE_INDEX)
            logps.append(sequence_logps(tokens, targets != IGNORE_INDEX, self.config.options))
        reference.train(was_training)
        return torch.cat(logps, -1).to(self.device)

    def eval_reference_logps(self) -> torch.Tensor | None:
        """``[K, len(eval_dataset)]``: rank ``r`` computes pairs ``r, r + world_size, ...``, then the ranks
        exchange them."""
        n, size, world = len(self.eval_dataset), self.config.per_device_eval_batch_size, distributed.world_size()
        mine = list(range(distributed.rank(), n, world))
        ref = self.reference_logps(self.eval_dataset, [mine[i:i + size] for i in range(0, len(mine), size)],
                                   "eval reference log-probs")
        return None if ref is None else torch.stack([distributed.gather_strided(r) for r in ref])

    def step_indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (pair indices) of ``step``."""
        c = self.config
        return micro_batch_indices(len(self.train_pairs), c.per_device_train_batch_size,
                                   c.gradient_accumulation_steps, step, c.seed)

    def compute_loss(self, batch: dict, num_pairs: int | None = None,
                     num_chosen_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """DPO loss of one collated batch and its metrics (TRL names, plus ``loss``), computed as the policy's
        forward. ``num_pairs``, ``num_chosen_tokens``: the normalizers (default: this batch's, the mean)."""
        loss, metrics = self.engine(self.policy_loss, batch, self.config.options, num_pairs, num_chosen_tokens)
        return loss, {"loss": float(loss.detach()), **as_floats(metrics)}

    def policy_loss(self, model: nn.Module, batch: dict, options: DPOOptions, num_pairs, num_chosen_tokens):
        """Inside the policy's forward: hidden states of ``batch`` and the DPO loss on them (``options`` built
        outside: a compiled forward cannot trace ``dataclasses.fields``)."""
        parts, packed = hf.lm_inputs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     self.config.padding_free)
        return losses.dpo_loss(*parts.lm_problem, batch["ref_logps"], options, self.config.loss_backend,
                               num_pairs=num_pairs, num_chosen_tokens=num_chosen_tokens, packed=packed,
                               transform=parts.transform)

    def evaluate(self) -> dict[str, float]:
        """Metrics over the whole eval dataset (shared by the ranks), prefixed ``eval_`` (means over pairs)."""
        return self.evaluate_batches(lambda indices: self.compute_loss(self.batch(
            self.eval_dataset, indices, None if self.eval_ref is None else self.eval_ref[:, indices]))[1])

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run the training loop; returns the logged records (also in ``output_dir/metrics.jsonl``)."""
        c = self.config
        micro, accumulation = c.per_device_train_batch_size, c.gradient_accumulation_steps
        global_batch, per_epoch, total = self.pair_schedule(len(self.train_pairs))
        # The reference's log-probs of the micro-batches of the steps to run, before any weight changes (the
        # reference may be the policy): each one computed as it will be used, so a resumed run gets the same
        # numbers as an uninterrupted one.
        start = self.checkpoint_step(resume_from_checkpoint, global_batch)
        used = [b for step in range(start, total) for b in self.step_indices(step)]
        ref = self.reference_logps(self.train_pairs, used)
        self.begin(total, total, global_batch, resume_from_checkpoint)
        self.model.train()
        while self.step < total:
            first = (self.step - start) * accumulation * micro  # this step's columns of ref
            batches = [self.batch(self.train_pairs, indices, None if ref is None else
                                  ref[:, first + k * micro:first + (k + 1) * micro])
                       for k, indices in enumerate(self.step_indices(self.step))]
            # Normalizers of the whole step (all micro-batches, all ranks), over the world size (see
            # distributed.global_normalizer): each micro-batch's loss is its share of the step's mean loss.
            chosen_tokens = distributed.global_normalizer(
                sum((b["labels"][:micro, 1:] != IGNORE_INDEX).sum() for b in batches))
            metrics = self.update(batches, lambda b: self.compute_loss(b, micro * accumulation, chosen_tokens))
            self.end_step({**metrics, "epoch": (self.step + 1) / per_epoch})
        self.finish()
        return self.history
