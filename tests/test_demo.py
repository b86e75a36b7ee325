"""`fastalign demo` in quick mode: the same DPO, reward-model, PPO and GRPO training as the full demo (its learning targets are
asserted here), a smaller memory comparison."""
import json
import os
import sys

import pytest

from fastalign.demo import FULL, QUICK, run_demo, run_with_heartbeat


@pytest.mark.slow
def test_quick_demo_learns_and_measures_memory(tmp_path, capsys):
    json_out = tmp_path / "demo.json"
    results = run_demo(json_out=str(json_out), out_dir=str(tmp_path / "demo"), quick=True)
    assert json.loads(json_out.read_text()) == results
    dpo, ppo, grpo, memory = results["dpo"], results["ppo"], results["grpo"], results["memory"]
    assert dpo["reward_accuracy"] >= 0.9 and dpo["reward_margin"] > 0.5  # held-out prompts
    # the reward model: 0.93-0.98 held-out accuracy over 4 init seeds at the test's sizes (tests/test_trainers_reward)
    assert results["reward_model"]["accuracy"] >= 0.9 and results["reward_model"]["margin"] > 1.0
    # PPO against the learned reward raises the held-out rule score (sampled at the training temperature): +0.04 to
    # +0.11 over PPO seeds 0-3 and 42 (Intel Xeon) once the reward model also learns from the policy's own wrong
    # answers (without them: -0.03 to +0.01); one evaluation's noise (256 prompts) is about 0.02
    assert ppo["score_end"] > ppo["score_start"] + 0.02
    assert ppo["reward_model_score_end"] > ppo["reward_model_score_start"]
    # GRPO from the DPO policy: +0.27 to +0.40 in 6 runs here (3 seeds, 2 versions of the engine); the noise of one
    # evaluation (256 prompts) is about 0.02
    assert grpo["score_end"] > grpo["score_start"] + 0.15
    assert memory["tokens"] == 2 * QUICK.memory_tokens and memory["vocab_size"] == 32768
    assert 0 < memory["fused_mb"] < memory["reference_mb"]
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "held-out reward accuracy" in out and "GRPO held-out mean reward" in out and "reference" in out
    assert "reward model  held-out accuracy" in out and "PPO  on the learned reward" in out
    # quick mode trains like the full demo (only the GRPO run is shorter), so the targets above carry over
    assert QUICK.dpo_steps == FULL.dpo_steps and QUICK.reward_steps == FULL.reward_steps
    assert QUICK.ppo_steps == FULL.ppo_steps
    assert QUICK.grpo_steps <= FULL.grpo_steps
    assert FULL.memory_tokens == 8192


def test_a_long_subprocess_step_prints_progress(capsys):
    """The memory step's fresh processes (about 95 s silent before) print the seconds elapsed every ``every``."""
    out, _ = run_with_heartbeat([sys.executable, "-c", "import time; time.sleep(1.2); print('result')"],
                                dict(os.environ), "probe", every=0.25)
    assert out == "result\n"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 4 and all(line.strip().startswith("probe: ") for line in lines)
    assert lines[-1].strip().startswith("probe: done in")
    with pytest.raises(RuntimeError, match=r"(?s)probe failed:\n.*ZeroDivisionError"):
        run_with_heartbeat([sys.executable, "-c", "1 / 0"], dict(os.environ), "probe")
