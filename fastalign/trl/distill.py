"""``DistillationTrainer``: TRL 1.16's (stable, ``trl.DistillationTrainer``), with the loss through
:func:`fastalign.fused_linear_distill_loss` inside the student's forward."""
from __future__ import annotations

import torch
import trl
from torch.distributed.tensor import DTensor

from ..functional import fused_linear_distill_loss
from ..hf import get_lm_head, logit_transform
from .head import FusedLoss, gathered_mean


class DistillationTrainer(FusedLoss, trl.DistillationTrainer):
    """TRL 1.16's ``DistillationTrainer`` (same constructor, ``trl.DistillationConfig``) whose loss is fastalign's
    fused generalized JSD between the student and the frozen teacher.

    On-policy as TRL: the student samples the completions (HF ``generate`` or vLLM, TRL's own), the teacher (a model
    object or ``teacher_model_name_or_path``, in eval, without gradients) scores the same tokens through TRL's own
    ``_get_last_hidden_state``, and the student's forward returns the divergence (``beta`` 0 forward KL, 1 reverse
    KL, in between the generalized JSD; ``temperature`` on both models' logits, after each model's logit scale and
    soft-cap) and its entropy from both models' last hidden states and lm_heads, chunk by chunk, without the
    logits of either (the hidden sizes may differ). The tool mask, TRL's normalizer (the generated completion tokens
    over the accumulation steps and processes), callbacks and checkpoints are TRL's. Metrics under TRL's names with
    TRL's aggregation: ``entropy`` (sums and counts across processes) and TRL's generation metrics.

    Args:
        fastalign_options: the fused op's own options (``backend``, ``chunk_size``, ``deterministic``,
            ``check_finite``; see ``fastalign.trl.head.FASTALIGN_OPTIONS``), default None.
        *args, **kwargs: ``trl.DistillationTrainer``'s.

    Each model's logit scale and soft-cap are honored. Refused at construction (``ValueError``): no
    ``teacher_model`` (TRL's server-teacher subclasses), vision-language models, a peft adapter on the teacher's
    lm_head.
    """

    def __init__(self, *args, fastalign_options: dict | None = None, **kwargs):
        super().__init__(*args, fastalign_options=fastalign_options, **kwargs)
        if self.teacher_model is None:
            raise ValueError("DistillationTrainer: expected a teacher_model (a model or its name or path), got None; "
                             "a teacher served elsewhere is not supported by fastalign.trl")
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        get_lm_head(teacher)  # refuses an adapted lm_head
        self._teacher_transform = logit_transform(teacher)

    def _teacher_hidden_and_head(self, input_ids, attention_mask, length: int):
        """TRL's teacher pass: its last hidden states ``[B, length, H_t]`` at the completion positions, without
        gradients, through its wrapper (FSDP / DeepSpeed gather its shards), and its lm_head weight and bias."""
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            hidden = self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state, teacher,
                                               input_ids, attention_mask, length)
        head = teacher.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):
            weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
        return hidden, weight, bias

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's normalizer: the generated completion tokens of the step, per process (DDP averages the gradients)
        if self.model.training and inputs.get("num_items_in_batch") is not None:
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        mode = "train" if self.model.training else "eval"
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # multi-turn: the tool responses are not trained on
            mask = mask * inputs["tool_mask"]
        length = inputs["completion_ids"].size(1)
        teacher_hidden, teacher_weight, teacher_bias = self._teacher_hidden_and_head(input_ids, attention_mask, length)
        teacher_transform = self._teacher_transform

        def distill_loss(hidden, targets, weight, bias, logit_scale, logit_softcap):
            # The teacher in the student's compute dtype (the autocast dtype under mixed precision, as TRL), but a
            # 16-bit teacher is not widened: no fp32 copy of its lm_head (the op widens chunk by chunk, as TRL's)
            device, dtype = hidden.device, hidden.dtype
            if teacher_weight.dtype.itemsize < dtype.itemsize:
                dtype = teacher_weight.dtype
            return fused_linear_distill_loss(
                hidden[:, -length:], weight, teacher_hidden.to(device, dtype), teacher_weight.to(device, dtype),
                mask.to(device), beta=self.beta, temperature=self.temperature, student_bias=bias,
                teacher_bias=None if teacher_bias is None else teacher_bias.to(device, dtype),
                student_logit_scale=logit_scale, student_logit_softcap=logit_softcap,
                **{f"teacher_{k}": v for k, v in teacher_transform._asdict().items()},
                num_items_in_batch=num_items_in_batch, **self._fastalign_options)

        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, fastalign_loss=distill_loss)
        self._metrics[mode]["entropy"].append(gathered_mean(self.accelerator, out.metrics["entropy"], mask.sum()))
        return (out.loss, None) if return_outputs else out.loss
