"""The on-policy distillation trainer on tiny models: the student's loss on its own samples against TRL's generalized
JSD of the two models' full logits, fused vs reference backends, a narrower student getting closer to the teacher,
the teacher frozen, the config's checks."""
import json
import math

import pytest
import torch

from fastalign import hf
from fastalign.trainers import DistillationConfig, DistillationTrainer
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import tiny_llama, word_tokenizer

TASK = CountingTask()
pytestmark = pytest.mark.usefixtures("one_thread")


def models(seed=0):
    tokenizer = word_tokenizer(TASK.words)
    torch.manual_seed(seed)
    teacher = tiny_llama(tokenizer, hidden_size=48, intermediate_size=96)
    student = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    return student, teacher, tokenizer


def config(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path / "distill"), learning_rate=3e-3, per_device_train_batch_size=8,
                  max_steps=3, disable_tqdm=True, max_completion_length=6, beta=0.5, temperature=0.9)
    return DistillationConfig(**{**fields, **overrides})


def reference_jsd(student, teacher, batch, beta, temperature):
    """TRL's generalized JSD over the completion tokens, from both models' full logits (float64)."""
    width = batch.mask.shape[1]
    zs = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -width - 1:-1].double()
    with torch.no_grad():
        zt = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -width - 1:-1].double()
    log_ps, log_pt = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
    log_m = torch.logsumexp(torch.stack([log_ps + math.log(1 - beta), log_pt + math.log(beta)]), 0)
    per_token = (beta * log_pt.exp() * (log_pt - log_m) + (1 - beta) * log_ps.exp() * (log_ps - log_m)).sum(-1)
    mask = batch.mask.double()
    return (per_token * mask).sum() / mask.sum()


def test_distill_loss_on_sampled_completions_matches_trl_generalized_jsd(tmp_path):
    student, teacher, tokenizer = models()
    trainer = DistillationTrainer(student, tokenizer, TASK.prompts(16), teacher, config(tmp_path))
    batch = trainer.rollout(list(range(8)))
    assert batch.teacher_hidden.shape[-1] == 48 and bool(batch.mask.any())
    loss, metrics = trainer.compute_loss(batch, torch.arange(8))
    want = reference_jsd(student, teacher, batch, 0.5, 0.9)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert metrics["divergence"] == pytest.approx(float(want.detach()), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert hf.get_lm_head(student).weight.grad is not None


def test_distill_fused_and_reference_backends_agree_and_the_student_gets_closer(tmp_path):
    histories = []
    for backend in ("fused", "reference"):
        student, teacher, tokenizer = models()
        c = config(tmp_path, loss_backend=backend, max_steps=8, output_dir=str(tmp_path / backend), beta=0.0)
        histories.append(DistillationTrainer(student, tokenizer, TASK.prompts(64), teacher, c,
                                             eval_dataset=TASK.prompts(8, 2, True), reward_fn=TASK.score).train())
    fused, reference = histories
    for f, r in zip(fused[:2], reference[:2]):
        assert f["loss"] == pytest.approx(r["loss"], rel=1e-4)
    assert {"loss", "entropy", "divergence", "completions/mean_length", "grad_norm"} <= fused[0].keys()
    assert "eval_reward" in fused[-1]
    assert sum(r["loss"] for r in fused[-3:-1]) < sum(r["loss"] for r in fused[:2])


def test_distill_config_and_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="DistillationConfig.beta: expected a number in"):
        DistillationConfig(beta=2.0)
    with pytest.raises(ValueError, match="DistillationConfig.temperature: expected a number > 0"):
        DistillationConfig(temperature=0.0)
    student, teacher, tokenizer = models()
    with pytest.raises(ValueError, match="teacher_model: expected a model, or"):
        DistillationTrainer(student, tokenizer, TASK.prompts(8), None, config(tmp_path))
    with pytest.raises(ValueError, match="eval_dataset: needs reward_fn"):
        DistillationTrainer(student, tokenizer, TASK.prompts(8), teacher, config(tmp_path),
                            eval_dataset=TASK.prompts(4))
    other = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64, vocab_size=len(tokenizer) + 3)
    with pytest.raises(ValueError, match="teacher_model: expected the student's vocabulary"):
        DistillationTrainer(student, tokenizer, TASK.prompts(8), other, config(tmp_path))


def test_the_sft_then_distill_examples_run(tmp_path, capsys):
    """``fastalign sft`` with its example config, then ``fastalign distill`` of its output into the narrower tiny
    student (short runs, no evaluation)."""
    from helpers.trainers import command, write_config

    sft = write_config(tmp_path, "sft", eval_file=None)
    assert command("sft", "--config", sft) == 0
    assert "3 steps done" in capsys.readouterr().out
    distill = write_config(tmp_path, "distill", config={"teacher_model_name_or_path": str(tmp_path / "sft")},
                           eval_file=None, reward=None)
    assert command("distill", "--config", distill) == 0
    assert "3 steps done" in capsys.readouterr().out
    records = [json.loads(line) for line in open(tmp_path / "distill" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
