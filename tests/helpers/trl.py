"""What the fastalign.trl tests share: a tiny Llama saved to a directory, a DPO data set, tolerances and the untimed
metric names."""
from __future__ import annotations

import math

import torch
from datasets import Dataset

from fastalign.trainers.tiny import tiny_llama, word_tokenizer

# Wall-clock numbers differ run to run; everything else logged must match
UNTIMED = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
           "eval_samples_per_second", "eval_steps_per_second", "step_time", "total_flos"}
RTOL, ATOL = 1e-5, 1e-6
WORDS = "the a cat dog sat ran on under mat rug big small red blue fast slow yes no".split()


def _saved_tiny_llama(directory, seed: int) -> str:
    tokenizer = word_tokenizer(WORDS)
    torch.manual_seed(seed)
    tiny_llama(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _dpo_dataset(n: int = 8) -> Dataset:
    space = lambda texts: [" " + text for text in texts]  # noqa: E731 (the word tokenizer splits on spaces)
    return Dataset.from_dict({"prompt": _sentences(1, n, 2, 5), "chosen": space(_sentences(2, n, 1, 6)),
                              "rejected": space(_sentences(3, n, 1, 6))})


def _sentences(seed: int, n: int, low: int, high: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(low, high, (1,),
                                                                                            generator=g)),),
                                                          generator=g)) for _ in range(n)]


def assert_same_training_run(ours, theirs, *, rtol: float = 1e-5, atol: float = 1e-6, min_logs: int = 3) -> None:
    """Two Hugging Face trainers after ``train()``: every logged number but the timings equal (``rtol``; ``atol``
    for numbers that are zero up to rounding), the same keys at every log, and the final weights equal in norm
    (``|w_ours - w_theirs| <= rtol |w_theirs|`` per parameter), with some trainable."""
    def logs(trainer):
        return [{k: v for k, v in log.items() if k not in UNTIMED} for log in trainer.state.log_history]

    got, want = logs(ours), logs(theirs)
    assert [sorted(log) for log in got] == [sorted(log) for log in want]
    assert len(want) >= min_logs
    for step, (log, ref) in enumerate(zip(got, want)):
        for key, value in ref.items():
            assert math.isclose(log[key], value, rel_tol=rtol, abs_tol=atol) or (
                math.isnan(value) and math.isnan(log[key])), f"log {step} {key}: {log[key]} vs {value}"
    ours_params, their_params = dict(ours.model.named_parameters()), dict(theirs.model.named_parameters())
    assert ours_params.keys() == their_params.keys()
    for name, param in their_params.items():
        diff = (ours_params[name].detach() - param.detach()).norm()
        assert diff <= rtol * param.detach().norm() + 1e-12, f"{name}: |diff| {diff} vs |w| {param.norm()}"
    assert any(p.requires_grad for p in ours.model.parameters())
