"""Logit transforms and ``cast_lm_head_to_fp32`` through ``fastalign.trl``: on tiny random models of the families
that scale or soft-cap their logits (Gemma 2 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite
``logits_scaling``), one ``_compute_loss`` of TRL 1.16's trainer and of fastalign's subclass on a batch TRL collates:
the loss, every parameter's gradient and every metric TRL logs equal (relative 1e-5); GRPO's
``cast_lm_head_to_fp32`` under bf16 autocast likewise; and what stays refused."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402

import fastalign.trl as fatrl  # noqa: E402
from fastalign.trainers.tiny import word_tokenizer  # noqa: E402

WORDS = "the a cat dog sat ran on under mat rug big small red blue fast slow yes no".split()
RTOL, ATOL = 1e-5, 1e-6
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16)
# family: (config class, model class, the transform's field and a value that moves the tiny model's logits)
FAMILIES = {
    "gemma2_softcap": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=0.3)),
    "cohere_logit_scale": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=4.0)),
    "granite_logits_scaling": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=0.25)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(family: str, tokenizer, seed: int = 0):
    config_name, model_name, transform = FAMILIES[family]
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **SHAPE,
                                                **transform)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).train()


def _sentences(seed: int, n: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (2 + k % 3,), generator=g)) for k in range(n)]


def _same(ours, theirs, model_ours, model_theirs) -> None:
    """Equal losses, gradients of every trainable parameter and metrics of the two ``(loss, metrics)``."""
    (loss, metrics), (ref_loss, ref_metrics) = ours, theirs
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=RTOL, abs_tol=ATOL), (loss.item(), ref_loss.item())
    grads = torch.autograd.grad(loss, [p for p in model_ours.parameters() if p.requires_grad])
    ref_grads = torch.autograd.grad(ref_loss, [p for p in model_theirs.parameters() if p.requires_grad])
    assert max(float(g.abs().max()) for g in ref_grads) > 1e-6
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert (grad - ref).norm() <= RTOL * ref.norm() + 1e-9
    assert metrics.keys() == ref_metrics.keys() and len(metrics) >= 4
    for key, ref in ref_metrics.items():
        assert all(math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL) for a, b in zip(metrics[key], ref, strict=True)), (
            key, metrics[key], ref)


def _losses(trainers, batch_of, *extra):
    """Each trainer's ``(loss, metrics)`` of one ``_compute_loss`` on the batch ``batch_of(trainer)``."""
    results = []
    for trainer in trainers:
        trainer._metrics["train"].clear()
        loss = trainer._compute_loss(trainer.model, batch_of(trainer), *extra)
        results.append((loss, {k: list(v) for k, v in trainer._metrics["train"].items()}))
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_and_kto_with_logit_transforms_match_trl(family, tmp_path):
    """DPO (its ``logits/*``, ``entropy``, ``mean_token_accuracy``) and KTO (``logits/*`` as TRL's fused head:
    the mean transformed logit) on a model that scales or soft-caps its logits."""
    tokenizer = word_tokenizer(WORDS)
    common = dict(report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=4, beta=0.5)
    prompts, completions = _sentences(1, 4), [" " + s for s in _sentences(2, 4)]
    cases = [(trl.DPOTrainer, fatrl.DPOTrainer, trl.DPOConfig,
              dict(prompt=prompts, chosen=completions, rejected=[" " + s for s in _sentences(3, 4)])),
             (trl.KTOTrainer, fatrl.KTOTrainer, trl.KTOConfig,
              dict(prompt=prompts, completion=completions, label=[True, False, True, True]))]
    for theirs_cls, ours_cls, config_cls, data in cases:
        trainers = []
        for cls in (theirs_cls, ours_cls):
            args = config_cls(output_dir=str(tmp_path / cls.__module__), **common)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainers.append(cls(model=_model(family, tokenizer), ref_model=_model(family, tokenizer, 1),
                                    args=args, train_dataset=Dataset.from_dict(data), processing_class=tokenizer))

        def batch_of(trainer):
            return trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

        theirs, ours = _losses(trainers, batch_of, False)
        _same(ours, theirs, trainers[1].model, trainers[0].model)


def _grpo_inputs(vocab: int):
    g = torch.Generator().manual_seed(0)
    completion_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    near = lambda: -3.0 + 0.3 * torch.randn(4, 5, generator=g)  # noqa: E731
    return {"prompt_ids": torch.randint(3, vocab, (4, 3), generator=g), "prompt_mask": torch.ones(4, 3).long(),
            "completion_ids": torch.randint(3, vocab, (4, 5), generator=g), "completion_mask": completion_mask,
            "advantages": torch.randn(4, generator=g), "old_per_token_logps": near(), "ref_per_token_logps": near(),
            "num_items_in_batch": completion_mask.sum().float(), "old_logps": near().sum(1) * 0.2}


@pytest.mark.parametrize("trainer", ["grpo_cast_lm_head_to_fp32", "rloo"])
def test_grpo_cast_lm_head_to_fp32_and_rloo_with_softcap_match_trl(trainer, tmp_path):
    """On a soft-capped Gemma 2: GRPO under ``bf16=True`` (autocast on CPU) with ``cast_lm_head_to_fp32`` (TRL casts
    the lm_head to fp32; the head then runs in fp32 outside autocast, the backbone in bf16), and RLOO in fp32."""
    tokenizer = word_tokenizer(WORDS)
    reward = lambda completions, **kw: [0.0] * len(completions)  # noqa: E731
    data = Dataset.from_dict({"prompt": _sentences(4, 4)})
    common = dict(report_to="none", use_cpu=True, per_device_train_batch_size=4, num_generations=2, beta=0.0,
                  temperature=0.9)
    if trainer == "rloo":
        classes, args = (trl.RLOOTrainer, fatrl.RLOOTrainer), trl.RLOOConfig(output_dir=str(tmp_path), bf16=False,
                                                                             **common)
    else:
        classes = (trl.GRPOTrainer, fatrl.GRPOTrainer)
        args = trl.GRPOConfig(output_dir=str(tmp_path), bf16=True, cast_lm_head_to_fp32=True, **common)
    trainers = [cls(model=_model("gemma2_softcap", tokenizer).to(torch.bfloat16 if args.bf16 else torch.float32),
                    reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer)
                for cls in classes]
    for each in trainers:
        each.current_gradient_accumulation_steps = 1
    assert trainers[0].model.lm_head.weight.dtype == torch.float32
    inputs = _grpo_inputs(len(tokenizer))
    theirs, ours = _losses(trainers, lambda _: inputs)
    _same(ours, theirs, trainers[1].model, trainers[0].model)


def test_cpo_with_a_logit_transform_is_refused(tmp_path):
    """CPO / ORPO log TRL's ``logits/*`` over the model's own logits at every position: not reproduced under a
    transform, so refused at construction."""
    from trl.experimental.cpo import CPOConfig

    tokenizer = word_tokenizer(WORDS)
    args = CPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    data = Dataset.from_dict(dict(prompt=["a"], chosen=[" b"], rejected=[" c"]))
    with pytest.raises(ValueError, match="CPOTrainer: the model transforms its logits"):
        fatrl.CPOTrainer(model=_model("cohere_logit_scale", tokenizer), args=args, train_dataset=data,
                         processing_class=tokenizer)


@pytest.mark.parametrize("family", ["gemma2_softcap", "cohere_logit_scale"])
def test_sft_with_logit_transforms_matches_trl(family, tmp_path):
    """SFT (nll with label smoothing: the smoothing term reads every transformed logit) on a model that scales or
    soft-caps its logits: the loss, every gradient and TRL's ``entropy`` / ``mean_token_accuracy``."""
    tokenizer = word_tokenizer(WORDS)
    data = Dataset.from_dict({"text": _sentences(5, 4)})
    trainers = []
    for cls in (trl.SFTTrainer, fatrl.SFTTrainer):
        args = trl.SFTConfig(output_dir=str(tmp_path / cls.__module__), report_to="none", use_cpu=True, bf16=False,
                             label_smoothing_factor=0.1)
        trainers.append(cls(model=_model(family, tokenizer), args=args, train_dataset=data,
                            processing_class=tokenizer))
    results = []
    for trainer in trainers:
        trainer._metrics["train"].clear()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        loss = trainer.compute_loss(trainer.model, batch)
        results.append((loss, {k: list(v) for k, v in trainer._metrics["train"].items()}))
    (ref_loss, ref_metrics), (loss, metrics) = results
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=RTOL), (loss.item(), ref_loss.item())
    grads = torch.autograd.grad(loss, [p for p in trainers[1].model.parameters() if p.requires_grad])
    ref_grads = torch.autograd.grad(ref_loss, [p for p in trainers[0].model.parameters() if p.requires_grad])
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert (grad - ref).norm() <= RTOL * ref.norm() + 1e-9
    for key in ("entropy", "mean_token_accuracy"):
        assert math.isclose(metrics[key][0], ref_metrics[key][0], rel_tol=RTOL, abs_tol=ATOL), key
