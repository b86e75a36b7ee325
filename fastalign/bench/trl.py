"""``--op trl``: TRL 1.16's DPO, GRPO, SFT and distillation trainer steps against fastalign.trl's subclasses, and
fastalign.trl's DPO padded vs padding-free (needs fastalign[trl])."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import torch

from .harness import REGISTRY, Mode, OpBench, Problem, Step, Target, VariantFactory
from .packed import PACKED_PAIRS, packed_batch


TRL_DPO_PAIRS, TRL_GRPO_COMPLETIONS, TRL_GRPO_PROMPT, TRL_SFT_ROWS = 2, 8, 64, 4


class TRLInputs(NamedTuple):
    """A 2-layer Llama's config and word-level tokenizer (``problem``'s H and V) and one batch per trainer, laid out
    as TRL's collators / generation give them: DPO ``input_ids [2B, T]`` (B = ``TRL_DPO_PAIRS``, chosen rows first,
    T = N / 2B, the second half of each row the completion); GRPO ``TRL_GRPO_COMPLETIONS`` completions of
    N / ``TRL_GRPO_COMPLETIONS`` tokens after ``TRL_GRPO_PROMPT`` prompt tokens, random advantages (the distillation
    batch too); SFT ``TRL_SFT_ROWS`` rows of N / ``TRL_SFT_ROWS`` tokens, the first quarter of each a prompt (label
    -100); ``teacher_config``: the distillation teacher, twice as wide; and a DPO batch of
    ``PACKED_PAIRS`` pairs on ``bench --op packed``'s length mix (:func:`packed_lengths` at N/2: ``[64, 4096]`` at
    the issue's N=8192), right-padded as TRL's collator pads, each pair's prompt shared (``dpo_mix_batch``)."""

    problem: Problem
    tokenizer: Any
    config: Any
    dpo_batch: dict
    grpo_batch: dict
    sft_batch: dict
    teacher_config: Any
    dpo_mix_batch: dict


def make_trl_inputs(problem: Problem) -> TRLInputs:
    from ..trainers.tiny import tiny_config, word_tokenizer

    tokenizer = word_tokenizer([f"w{i}" for i in range(problem.vocab_size - 3)])
    heads = max(1, problem.hidden_size // 64)

    def llama(width: int):
        return tiny_config(tokenizer, hidden_size=width * problem.hidden_size,
                           intermediate_size=2 * width * problem.hidden_size, num_attention_heads=width * heads,
                           num_key_value_heads=width * heads, max_position_embeddings=max(4096, problem.tokens))
    g = torch.Generator().manual_seed(problem.seed)
    place = lambda t: t.to(problem.device)  # noqa: E731
    length = max(2, problem.tokens // (2 * TRL_DPO_PAIRS))
    ids = torch.randint(3, problem.vocab_size, (2 * TRL_DPO_PAIRS, length), generator=g)
    completion = (torch.arange(length) >= length // 2).long().expand_as(ids)
    dpo = {"input_ids": place(ids), "attention_mask": place(torch.ones_like(ids)), "completion_mask": place(completion)}
    rows, length = TRL_GRPO_COMPLETIONS, max(1, problem.tokens // TRL_GRPO_COMPLETIONS)
    prompt = torch.randint(3, problem.vocab_size, (rows, TRL_GRPO_PROMPT), generator=g)
    completion = torch.randint(3, problem.vocab_size, (rows, length), generator=g)
    grpo = {"prompt_ids": place(prompt), "prompt_mask": place(torch.ones_like(prompt)),
            "completion_ids": place(completion), "completion_mask": place(torch.ones_like(completion)),
            "advantages": place(torch.randn(rows, generator=g)),
            "num_items_in_batch": place(torch.tensor(float(completion.numel())))}
    ids = torch.randint(3, problem.vocab_size, (TRL_SFT_ROWS, max(2, problem.tokens // TRL_SFT_ROWS)), generator=g)
    labels = ids.clone()
    labels[:, :ids.size(1) // 4] = -100
    sft = {"input_ids": place(ids), "attention_mask": place(torch.ones_like(ids)), "labels": place(labels)}
    torch.manual_seed(problem.seed)
    mix = packed_batch(replace(problem, tokens=max(problem.tokens // 2, 2)))
    completion = (mix["labels"] != -100).long()
    dpo_mix = {"input_ids": place(mix["input_ids"]), "attention_mask": place(mix["attention_mask"]),
               "completion_mask": place(completion)}
    return TRLInputs(problem, tokenizer, llama(1), dpo, grpo, sft, llama(2), dpo_mix)


def trl_step(kind: str, fused: bool, padding_free: bool = False) -> VariantFactory:
    """One training step (the trainer's ``compute_loss`` on the batch, then the gradients of the weights, returned) of
    TRL 1.16's ``DPOTrainer`` (a reference model; ``kind="dpo-mix"``: on ``dpo_mix_batch``, with ``padding_free``),
    ``GRPOTrainer`` (dapo, on-policy), ``SFTTrainer`` (nll) or ``DistillationTrainer`` (JSD, beta 0.5, a twice wider
    teacher), or of fastalign.trl's subclass; the same random Llama for both (seeded)."""

    def factory(x: TRLInputs) -> Step:
        import tempfile

        import trl
        from datasets import Dataset
        from transformers import LlamaForCausalLM

        import fastalign.trl as fatrl

        torch.manual_seed(x.problem.seed)
        model = LlamaForCausalLM(x.config).to(x.problem.device, x.problem.torch_dtype)
        common = dict(output_dir=tempfile.mkdtemp(prefix="fastalign-bench-trl-"), report_to="none",
                      use_cpu=x.problem.device == "cpu", bf16=False, disable_tqdm=True)
        extra = {"fastalign_options": {"backend": x.problem.backend}} if fused else {}
        module = fatrl if fused else trl
        if kind in ("dpo", "dpo-mix"):
            ref = LlamaForCausalLM(x.config).to(x.problem.device, x.problem.torch_dtype)
            trainer = module.DPOTrainer(model=model, ref_model=ref,
                                        args=trl.DPOConfig(**common, padding_free=padding_free),
                                        train_dataset=Dataset.from_dict({"prompt": ["w1"], "chosen": [" w2"],
                                                                         "rejected": [" w3"]}),
                                        processing_class=x.tokenizer, **extra)
            batch = x.dpo_batch if kind == "dpo" else x.dpo_mix_batch
        elif kind == "grpo":
            trainer = module.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                                         args=trl.GRPOConfig(**common, per_device_train_batch_size=8,
                                                             num_generations=8, loss_type="dapo"),
                                         train_dataset=Dataset.from_dict({"prompt": ["w1"]}),
                                         processing_class=x.tokenizer, **extra)
            trainer.current_gradient_accumulation_steps = 1
            batch = x.grpo_batch
        elif kind == "sft":
            trainer = module.SFTTrainer(model=model, args=trl.SFTConfig(**common),
                                        train_dataset=Dataset.from_dict({"text": ["w1 w2"]}),
                                        processing_class=x.tokenizer, **extra)
            batch = x.sft_batch
        else:
            teacher = LlamaForCausalLM(x.teacher_config).to(x.problem.device, x.problem.torch_dtype)
            trainer = module.DistillationTrainer(model=model, teacher_model=teacher,
                                                 args=trl.DistillationConfig(**common, beta=0.5),
                                                 train_dataset=Dataset.from_dict({"prompt": ["w1"]}),
                                                 processing_class=x.tokenizer, **extra)
            batch = x.grpo_batch
        trainer.model.train()
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        return lambda: torch.autograd.grad(trainer.compute_loss(trainer.model, dict(batch)), params)

    return factory


def _trl_mode(kind: str, title: str) -> Mode:
    return Mode(title, {"fastalign.trl": trl_step(kind, True), "trl": trl_step(kind, False)}, floor=None,
                targets=(Target("time", "trl", 0.90), Target("memory", "trl", 1.0)), candidate="fastalign.trl",
                baseline="trl")


REGISTRY["trl"] = OpBench(make_trl_inputs, {
    "dpo": _trl_mode("dpo", f"TRL 1.16 DPOTrainer step ({TRL_DPO_PAIRS} pairs of 2 x N/{2 * TRL_DPO_PAIRS} tokens, "
                            f"reference model) vs fastalign.trl's, 2-layer Llama"),
    "grpo": _trl_mode("grpo", f"TRL 1.16 GRPOTrainer loss step ({TRL_GRPO_COMPLETIONS} completions of "
                              f"N/{TRL_GRPO_COMPLETIONS} tokens, dapo) vs fastalign.trl's, 2-layer Llama"),
    "sft": _trl_mode("sft", f"TRL 1.16 SFTTrainer step ({TRL_SFT_ROWS} rows of N/{TRL_SFT_ROWS} tokens, nll) vs "
                            f"fastalign.trl's, 2-layer Llama"),
    "distill": _trl_mode("distill", f"TRL 1.16 DistillationTrainer loss step ({TRL_GRPO_COMPLETIONS} completions of "
                                    f"N/{TRL_GRPO_COMPLETIONS} tokens, beta 0.5, teacher 2H wide) vs fastalign.trl's, "
                                    f"2-layer Llama"),
    "dpo-padding-free": Mode(f"fastalign.trl DPOTrainer step, {PACKED_PAIRS} pairs on bench --op packed's length mix "
                             f"(log-uniform in [N/128, N/2]): padding_free=True vs padded",
                             {"padding_free": trl_step("dpo-mix", True, True),
                              "padded": trl_step("dpo-mix", True, False)}, floor=None,
                             targets=(Target("time", "padded", 1.0), Target("memory", "padded", 1.0)),
                             candidate="padding_free", baseline="padded"),
}, issue_problem=Problem(tokens=8192, hidden_size=512, vocab_size=32768))
