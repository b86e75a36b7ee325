"""What the fastalign.trl tests share: a tiny Llama saved to a directory, a DPO data set, tolerances and the untimed
metric names."""
from __future__ import annotations

import torch
from datasets import Dataset

from fastalign.trainers.tiny import tiny_llama, word_tokenizer

# Wall-clock numbers differ run to run; everything else logged must match
UNTIMED = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time", "total_flos"}
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
