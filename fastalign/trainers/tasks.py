"""A built-in synthetic task whose preferences are learnable from the text alone (demo, tests, config files).

Counting: the prompt is a few numbers counting up or down by one modulo ``modulus``, then ``:`` (``"7 8 9 :"``,
``"2 1 0 19 :"``); the right answer continues the count for ``answer_length`` numbers and stops
(``"10 11 12 13"``). A rejected answer breaks the rule one of three ways: it turns around, gets one number wrong,
or does not stop. The rule-based reward scores a completion by the fraction of positions it gets right.
Prompts whose first number is a multiple of 5 form the held-out split: only a model that learned the rule, not the
prompts, does well there.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

REJECTION_KINDS = ("reverse", "corrupt", "overrun")
SEPARATOR = ":"


@dataclass(frozen=True)
class CountingTask:
    """Counting modulo ``modulus`` (the numbers are the words), prompts of ``min_prompt_length`` to
    ``max_prompt_length`` numbers, answers of ``answer_length`` numbers."""

    modulus: int = 20
    answer_length: int = 4
    min_prompt_length: int = 3
    max_prompt_length: int = 5

    @property
    def words(self) -> list[str]:
        """The vocabulary: the numbers as words, and the separator ``:``."""
        return [str(n) for n in range(self.modulus)] + [SEPARATOR]

    def _count(self, start: int, step: int, length: int) -> list[str]:
        return [str((start + step * i) % self.modulus) for i in range(length)]

    def _last_and_step(self, prompt: str) -> tuple[int, int]:
        *_, before, last, _separator = prompt.split()
        return int(last), 1 if (int(last) - int(before)) % self.modulus == 1 else -1

    def prompt(self, rng: random.Random, heldout: bool = False) -> str:
        """A random prompt of the training (or held-out) split."""
        start = rng.choice([n for n in range(self.modulus) if (n % 5 == 0) == heldout])
        length = rng.randint(self.min_prompt_length, self.max_prompt_length)
        return " ".join(self._count(start, rng.choice((1, -1)), length) + [SEPARATOR])

    def answer(self, prompt: str) -> list[str]:
        """The right continuation of a prompt of this task, as words."""
        last, step = self._last_and_step(prompt)
        return self._count(last + step, step, self.answer_length)

    def pair(self, rng: random.Random, heldout: bool = False) -> dict[str, str]:
        """One preference record ``{"prompt", "chosen", "rejected"}`` with a random kind of rejection."""
        prompt = self.prompt(rng, heldout)
        last, step = self._last_and_step(prompt)
        chosen = self._count(last + step, step, self.answer_length)
        kind = rng.choice(REJECTION_KINDS)
        if kind == "reverse":
            rejected = self._count(last - step, -step, self.answer_length)
        elif kind == "corrupt":
            rejected = list(chosen)
            i = rng.randrange(self.answer_length)
            rejected[i] = str((int(chosen[i]) + rng.randrange(1, self.modulus)) % self.modulus)
        else:
            rejected = self._count(last + step, step, self.answer_length + 2)
        return {"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected)}

    def preference_data(self, n: int, seed: int = 0, heldout: bool = False) -> list[dict[str, str]]:
        """``n`` preference records of the training (or held-out) split, from ``seed``."""
        rng = random.Random(seed)
        return [self.pair(rng, heldout) for _ in range(n)]

    def prompts(self, n: int, seed: int = 0, heldout: bool = False) -> list[str]:
        """``n`` prompts of the training (or held-out) split, from ``seed``."""
        rng = random.Random(seed)
        return [self.prompt(rng, heldout) for _ in range(n)]

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """Reward in ``[0, 1]``: the fraction of positions right, over ``max(len(completion), answer_length)``
        positions (extra words count as wrong). A ``reward_fn`` for :class:`~fastalign.trainers.PPOTrainer`."""
        scores = []
        for prompt, completion in zip(prompts, completions):
            words, expected = completion.split(), self.answer(prompt)
            right = sum(w == e for w, e in zip(words, expected))
            scores.append(right / max(len(words), self.answer_length))
        return scores
