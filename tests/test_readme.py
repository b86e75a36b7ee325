"""Every code block of README.md and docs/*.md runs as written, read from the files (so the tests follow the docs):
python blocks are executed in order, one namespace per file, in one fresh process; bash blocks are run; a block
that cannot run here says why on the line above it, ``<!-- not run: reason -->``, and any other block fails the
test. The README is at most 300 lines and every relative link resolves. The packed-batch snippet gives the padded
batch's losses on the default attention (sdpa) and on eager."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastalign import fused_linear_dpo_loss, fused_linear_grpo_loss, hf
from fastalign.trainers.data import collate_pairs, tokenize_pair
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import tiny_llama, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TASK = CountingTask()
FENCE = re.compile(r"^(?:<!-- not run: (?P<reason>.*?) -->\n)?```(?P<lang>[\w-]*)\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
RUN = ("python", "bash")


def blocks(page: Path) -> list[tuple[int, str, str | None, str]]:
    """``(line, language, reason not run or None, code)`` of every fenced block of ``page``."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start("code")), m["lang"], m["reason"], m["code"]) for m in FENCE.finditer(text)]


def test_every_block_runs_or_says_why_not():
    assert sum(len(blocks(page)) for page in PAGES) > 20  # the pattern finds the blocks
    for page in PAGES:
        fences = page.read_text().count("\n```")
        assert fences == 2 * len(blocks(page)), f"{page.name}: a fence the pattern does not read"
        for line, lang, reason, _ in blocks(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            if reason is not None:
                assert len(reason.split()) >= 3, f"{where}: say why the block is not run, got {reason!r}"
            else:
                assert lang in RUN, (f"{where}: a ```{lang} block is neither run (python, bash) nor marked "
                                     f"<!-- not run: reason -->")


RUNNER = """
import re, sys, traceback
pattern = re.compile(sys.argv[1], re.S | re.M)
failed = 0
for path in sys.argv[2:]:
    text, scope = open(path).read(), {"__name__": "__docs__"}
    for m in pattern.finditer(text):
        if m["reason"] is None and m["lang"] == "python":
            try:
                exec(compile(m["code"], f"{path}:{text.count(chr(10), 0, m.start('code'))}", "exec"), scope)
            except Exception:
                failed += 1
                traceback.print_exc()
                break
sys.exit(failed)
"""


def test_python_blocks_run_as_written(tmp_path):
    """Each page's python blocks in order, in one namespace per page, all pages in one fresh process (the
    registries a page extends do not leak into the suite's)."""
    done = subprocess.run([sys.executable, "-c", RUNNER, FENCE.pattern, *map(str, PAGES)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def test_bash_blocks_run_as_written(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = [(page, line, code) for page in PAGES for line, lang, reason, code in blocks(page)
                if reason is None and lang == "bash"]
    assert commands
    for page, line, code in commands:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert done.returncode == 0, f"{page.name}:{line}: {done.stderr[-2000:]}"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of ``page``'s headings: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_readme_is_short_and_every_relative_link_resolves():
    assert len(README.read_text().splitlines()) <= 300
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            linked = page.parent / target if target else page
            assert linked.is_file(), f"{page.name}: link to {target} does not resolve"
            assert not anchor or anchor in anchors(linked), f"{page.name}: no heading #{anchor} in {linked.name}"


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in docs/packing.md, the snippet itself (after its set-up)."""
    text = (ROOT / "docs" / "packing.md").read_text()
    assert heading in text, heading
    return re.findall(r"```python\n(.*?)```", text[text.index(heading):], re.S)[1]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_packed_snippet_gives_the_padded_batchs_losses(attention):
    tokenizer = word_tokenizer(TASK.words)
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64, attn_implementation=attention)
    pairs = [tokenize_pair(tokenizer, r, 32, 16) for r in TASK.preference_data(3, seed=1)]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)  # [6, T]: chosen 1..3, rejected 1..3, right-padded
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1
    inputs = dict(model=model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"], advantages=torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0, 0.5]),
                  ref_chosen=torch.tensor([-9.0, -12.0, -7.5]), ref_rejected=torch.tensor([-11.0, -8.0, -10.0]),
                  fused_linear_grpo_loss=fused_linear_grpo_loss, fused_linear_dpo_loss=fused_linear_dpo_loss)
    namespace = dict(inputs)
    exec(readme_block("# Packed (padding-free) batches"), namespace)
    padded = hf.causal_lm_parts(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    grpo = fused_linear_grpo_loss(padded.hidden, padded.weight, padded.targets, inputs["advantages"],
                                  loss_type="grpo")
    dpo = fused_linear_dpo_loss(padded.hidden, padded.weight, padded.targets, ref_chosen_logps=inputs["ref_chosen"],
                                ref_rejected_logps=inputs["ref_rejected"])
    torch.testing.assert_close(namespace["grpo"].loss, grpo.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(namespace["dpo"].loss, dpo.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(namespace["dpo"].chosen_logps, dpo.chosen_logps, rtol=1e-5, atol=1e-5)
