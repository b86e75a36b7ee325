"""One error style in `fastalign/` and `kernels/`: the house style "name: expected X, got Y", never the older
"X must be ..." (a `raise` whose message says "must be", "must have" or "must not" fails here)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_STYLE = re.compile(r"\bmust (be|have|not)\b")


def raise_messages(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal inside a `raise` statement (f-strings by their literal parts)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            text = "".join(c.value for c in ast.walk(node.exc)
                           if isinstance(c, ast.Constant) and isinstance(c.value, str))
            found.append((node.lineno, text))
    return found


def test_no_error_message_in_the_old_style():
    old = [f"{path.relative_to(ROOT)}:{line}: {text}" for top in ("fastalign", "kernels")
           for path in sorted((ROOT / top).rglob("*.py"))
           for line, text in raise_messages(path.read_text()) if OLD_STYLE.search(text)]
    assert old == [], "rewrite as 'name: expected X, got Y':\n" + "\n".join(old)


def test_the_check_finds_the_old_style():
    source = 'def f(x):\n    if x < 0:\n        raise ValueError(f"cliprange must be >= 0, got {x}")\n'
    assert [OLD_STYLE.search(text) is not None for _, text in raise_messages(source)] == [True]
    assert raise_messages('raise ValueError(f"cliprange: expected a number >= 0, got {x}")') == [
        (1, "cliprange: expected a number >= 0, got ")]
