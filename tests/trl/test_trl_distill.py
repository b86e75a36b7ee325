"""fastalign.trl.DistillationTrainer against TRL 1.16's DistillationTrainer: the same seed, prompts, tiny random Llama
student (word-level tokenizer built in code) and a wider teacher passed as a model object, 3 optimizer steps of
on-policy distillation, every logged number and the final weights equal (1e-5 relative); and one ``compute_loss`` of
each trainer on one batch over a grid of ``beta`` and ``temperature`` (a teacher that soft-caps its logits, a tool
mask, evaluation): the loss, every parameter's gradient and the metrics."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402

import fastalign.trl as fatrl  # noqa: E402
from fastalign.trainers.tiny import tiny_llama, word_tokenizer  # noqa: E402
from helpers.trl import assert_same_training_run  # noqa: E402

WORDS = "the a cat dog sat ran on under mat rug big small red blue fast slow yes no".split()
RTOL = 1e-5
LOSS_ATOL = 2e-7
pytestmark = pytest.mark.usefixtures("one_thread")
STUDENT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
TEACHER = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """The tiny random student and its word-level tokenizer saved where TRL loads them from."""
    directory = tmp_path_factory.mktemp("student")
    tokenizer = word_tokenizer(WORDS)
    torch.manual_seed(0)
    tiny_llama(tokenizer, **STUDENT).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _teacher(**overrides):
    """A wider, deeper random teacher over the same vocabulary (the same weights on every call)."""
    torch.manual_seed(1)
    return tiny_llama(word_tokenizer(WORDS), **TEACHER, **overrides)


def _prompts(n: int) -> Dataset:
    g = torch.Generator().manual_seed(4)
    return Dataset.from_dict({"prompt": [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(k),),
                                                                                         generator=g))
                                         for k in torch.randint(2, 5, (n,), generator=g)]})


def _args(where, **config):
    return trl.DistillationConfig(output_dir=str(where), max_steps=3, logging_steps=1, learning_rate=1e-3,
                                  report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
                                  per_device_train_batch_size=2, max_completion_length=5, **config)


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora_checkpointing"])
def test_distillation_trainer_matches_trl(student_dir, tmp_path, peft):
    """On-policy: the student samples, the teacher (an object, wider) scores; JSD(beta=0.25) at temperature 0.7 with
    gradient accumulation; and LoRA (frozen lm_head) with gradient checkpointing, reverse KL."""
    config = dict(beta=0.25, temperature=0.7, gradient_accumulation_steps=2)
    extra = {}
    if peft:
        config = dict(beta=1.0, gradient_checkpointing=True)
        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False)
    dataset = _prompts(12)

    def run(cls, where):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(model=student_dir, teacher_model=_teacher(), args=_args(where, **config),
                          train_dataset=dataset, **extra)
            trainer.train()
        return trainer

    theirs, ours = run(trl.DistillationTrainer, tmp_path / "trl"), run(fatrl.DistillationTrainer, tmp_path / "fa")
    assert all(not p.requires_grad or p.grad is None for p in ours.teacher_model.parameters())
    assert_same_training_run(ours, theirs, rtol=RTOL)


# --- one compute_loss, a grid of options -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def distill_pair(student_dir, tmp_path_factory):
    """TRL's DistillationTrainer and fastalign's on the same student and teacher (which soft-caps its logits), and a
    batch as TRL's generation step leaves it (left-padded prompts, completions padded after their end)."""
    teacher = _teacher(final_logit_softcapping=3.0)
    trainers = [cls(model=student_dir, teacher_model=teacher, args=_args(tmp_path_factory.mktemp("distill")),
                    train_dataset=_prompts(4)) for cls in (trl.DistillationTrainer, fatrl.DistillationTrainer)]
    g = torch.Generator().manual_seed(0)
    vocab = len(WORDS) + 3
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]])
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    batch = {"prompt_ids": torch.randint(3, vocab, (4, 3), generator=g).masked_fill(prompt_mask == 0, 0),
             "prompt_mask": prompt_mask,
             "completion_ids": torch.randint(3, vocab, (4, 5), generator=g).masked_fill(completion_mask == 0, 0),
             "completion_mask": completion_mask, "num_items_in_batch": torch.tensor(30.0)}
    return trainers, batch


@pytest.mark.parametrize("beta, temperature, mode, tool_mask", [
    (0.0, 1.0, "train", False), (0.5, 1.0, "train", False), (1.0, 1.0, "train", False),
    (0.5, 2.0, "train", True), (1.0, 0.6, "eval", False), (0.0, 1.7, "eval", True)])
def test_distill_loss_gradients_and_metrics_match_trl(distill_pair, beta, temperature, mode, tool_mask):
    """beta 0 (forward KL), 0.5 (JSD), 1 (reverse KL); train mode divides by ``num_items_in_batch``, eval by the
    batch's tokens."""
    trainers, batch = distill_pair
    inputs = dict(batch)
    if tool_mask:
        inputs["tool_mask"] = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for trainer in trainers:
        trainer.beta, trainer.temperature = beta, temperature
    _assert_same_step(trainers, inputs, mode)


def test_distill_with_a_bf16_teacher_matches_trl(distill_pair, student_dir, tmp_path):
    """A bf16 teacher (``teacher_model_init_kwargs={"dtype": "bfloat16"}``) for an fp32 student: its lm_head is not
    widened; TRL projects it chunk by chunk in fp32 on CPU."""
    _, batch = distill_pair
    teacher = _teacher().to(torch.bfloat16)
    trainers = [cls(model=student_dir, teacher_model=teacher, args=_args(tmp_path / cls.__module__, beta=0.5),
                    train_dataset=_prompts(4)) for cls in (trl.DistillationTrainer, fatrl.DistillationTrainer)]
    _assert_same_step(trainers, batch, "train")


def _assert_same_step(trainers, inputs, mode):
    """One ``compute_loss`` of TRL's trainer and of fastalign's: the loss, the student's gradients and the metrics
    equal."""
    results = []
    for trainer in trainers:
        trainer.model.train(mode == "train")
        trainer._metrics[mode].clear()
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        loss = trainer.compute_loss(trainer.model, inputs)
        results.append((loss.item(), torch.autograd.grad(loss, params), dict(trainer._metrics[mode])))
    (ref_loss, ref_grads, ref_metrics), (loss, grads, metrics) = results
    # A forward KL near 0 (a few 1e-3) sums terms whose log-probs carry fp32 rounding of their log-sum-exp (~1e-7
    # each, whatever the summation order): an absolute floor at that level, still 1e4 below a sign or temperature error
    assert math.isclose(loss, ref_loss, rel_tol=RTOL, abs_tol=LOSS_ATOL), (loss, ref_loss)
    assert max(float(g.abs().max()) for g in ref_grads) > 1e-6  # not vacuous
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert (grad - ref).norm() <= RTOL * ref.norm() + 1e-9
    assert metrics.keys() == ref_metrics.keys() == {"entropy"}
    assert math.isclose(metrics["entropy"][0], ref_metrics["entropy"][0], rel_tol=RTOL)


def test_distillation_without_teacher_is_refused(student_dir, tmp_path):
    with pytest.raises(ValueError, match="teacher_model"):
        fatrl.DistillationTrainer(model=student_dir, args=_args(tmp_path), train_dataset=_prompts(2))
