"""A part's time budget: the check stops a part cleanly between two items once its budget is spent, and says so."""
from __future__ import annotations

import time


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = self.now() + seconds

    @staticmethod
    def now() -> float:
        """``time.monotonic()``: the same clock in every process of the machine (the vocab-parallel ranks)."""
        return time.monotonic()

    def expired(self) -> bool:
        return self.now() > self.deadline

    def stop_note(self, done: int, total: int) -> str:
        return f"stopped at its {self.seconds:.0f} s budget after {done} of {total} items"
