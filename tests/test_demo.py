"""`fastalign demo` in quick mode: the same SFT, DPO and PPO training as the full demo, a shorter reward model, GRPO and
distillation (the learning targets are asserted here), a smaller memory comparison."""
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
    sft, distill = results["sft"], results["distill"]
    # SFT on the right answers raises the held-out rule score from the random init's: +0.54 to +0.79 over seeds 0-2
    # (0.04 -> 0.57-0.83, held-out token accuracy 0.91-0.98; AMD EPYC); one score's noise (512 prompts) is about 0.015
    assert sft["score_end"] > sft["score_start"] + 0.4 and sft["token_accuracy"] > 0.85
    assert dpo["reward_accuracy"] >= 0.9 and dpo["reward_margin"] > 0.5  # held-out prompts
    # the reward model: 0.93-0.98 held-out accuracy over 4 init seeds at the test's sizes (tests/test_trainers_reward)
    assert results["reward_model"]["accuracy"] >= 0.9 and results["reward_model"]["margin"] > 1.0
    # PPO against the learned reward raises the held-out rule score (sampled at the training temperature): +0.04 to
    # +0.11 over PPO seeds 0-3 and 42 (Intel Xeon) once the reward model also learns from the policy's own wrong
    # answers (without them: -0.03 to +0.01); one evaluation's noise (256 prompts) is about 0.02. With quick mode's
    # 200-step reward model: +0.05 at the test's seed (0); the init seeds 1 and 2 (run_demo's seed) gave +0.02, -0.005
    assert ppo["score_end"] > ppo["score_start"] + 0.02
    assert ppo["reward_model_score_end"] > ppo["reward_model_score_start"]
    # GRPO from the DPO policy: +0.27 to +0.40 in 6 runs here (3 seeds, 2 versions of the engine); the noise of one
    # evaluation (256 prompts) is about 0.02. At quick mode's 125 steps: +0.27 at seed 0, +0.08 and +0.09 at init
    # seeds 1 and 2
    assert grpo["score_end"] > grpo["score_start"] + 0.15
    # the 1-layer student distilled from the GRPO policy (2 layers) gets within 0.05 of the teacher's rule score:
    # held-out +0.07 to +0.11 above it (0.63-0.78 -> 0.70-0.86), on training prompts 0.01-0.04 below it (0.94-0.96),
    # over seeds 0-2; up from the layer-dropped start (0.15-0.36)
    assert distill["student_parameters"] < distill["teacher_parameters"]
    assert distill["student_score_end"] > distill["teacher_score"] - 0.05
    assert distill["student_train_score"] > distill["teacher_train_score"] - 0.05
    assert distill["student_score_end"] > distill["student_score_start"] + 0.3
    assert memory["tokens"] == 2 * QUICK.memory_tokens and memory["vocab_size"] == 32768
    assert 0 < memory["fused_mb"] < memory["reference_mb"]
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "held-out reward accuracy" in out and "GRPO held-out mean reward" in out and "reference" in out
    assert "reward model  held-out accuracy" in out and "PPO  on the learned reward" in out
    assert "SFT  held-out mean rule score" in out and "distillation  held-out mean rule score" in out
    # quick mode trains SFT, DPO and PPO like the full demo; the reward model, GRPO and distillation run shorter
    assert QUICK.sft_steps == FULL.sft_steps and QUICK.dpo_steps == FULL.dpo_steps
    assert QUICK.ppo_steps == FULL.ppo_steps
    assert QUICK.grpo_steps <= FULL.grpo_steps and QUICK.reward_steps <= FULL.reward_steps
    assert QUICK.distill_steps <= FULL.distill_steps
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
