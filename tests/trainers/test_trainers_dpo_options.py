"""DPOTrainer with TRL's other DPO options (weighted loss lists, f-divergence, LD-DPO, WPO) and ranked records:
the fused and the reference backends agree."""
from __future__ import annotations

import pytest
import torch

from fastalign.trainers import DPOConfig, DPOTrainer
from helpers.trainers import TASK, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path / "dpo"), learning_rate=3e-3, per_device_train_batch_size=4,
                  max_steps=2, disable_tqdm=True, max_length=32, max_prompt_length=16)
    return DPOConfig(**{**fields, **overrides})


def ranked_data(n: int, k: int, seed: int = 1) -> list[dict]:
    """Prompts of the counting task with k completions, best (the right answer) first, then worse ones."""
    pairs = TASK.preference_data(n * (k - 1), seed=seed)
    groups = [pairs[i * (k - 1):(i + 1) * (k - 1)] for i in range(n)]
    return [{"prompt": g[0]["prompt"], "completions": [g[0]["chosen"]] + [p["rejected"] for p in g]} for g in groups]


def both_backends(tmp_path, data, **options):
    """Loss, metrics and gradients of one batch on the fused and the reference backends (must agree)."""
    model, tok = tiny()
    trainers = {b: DPOTrainer(model, tok, data, config(tmp_path, loss_backend=b, **options))
                for b in ("fused", "reference")}
    refs = [t.reference_logps(t.train_pairs, [[0, 1, 2, 3]]) for t in trainers.values()]
    with torch.no_grad():  # move the policy away from the reference
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    results = []
    for trainer, ref in zip(trainers.values(), refs):
        loss, metrics = trainer.compute_loss(trainer.batch(trainer.train_pairs, [0, 1, 2, 3], ref))
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (loss_f, metrics_f, grads_f), (loss_r, metrics_r, grads_r) = results
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-6)
    assert metrics_f.keys() == metrics_r.keys()
    # step functions of values within noise may differ (the accuracies): compared in test_dpo.py
    for key in metrics_f.keys() - {"rewards/accuracies", "rewards/ranking_accuracy"}:
        assert metrics_f[key] == pytest.approx(metrics_r[key], rel=1e-4, abs=1e-5), key
    for g_f, g_r in zip(grads_f, grads_r):
        torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-5)
    return metrics_f


def test_list_loss_f_divergence_and_ld_dpo(tmp_path):
    metrics = both_backends(tmp_path, TASK.preference_data(4, seed=1), loss_type=["sigmoid", "sft", "ipo"],
                            loss_weights=[0.8, 1.0, 0.3], f_divergence_type="js_divergence", ld_alpha=0.5)
    assert {"nll_loss", "rewards/accuracies"} <= set(metrics)


def test_ranked_records_train_with_the_ranking_loss(tmp_path):
    data = ranked_data(8, 3)
    metrics = both_backends(tmp_path, data, num_responses=3)
    assert "rewards/ranking_accuracy" in metrics
    model, tok = tiny()
    history = DPOTrainer(model, tok, data, config(tmp_path, num_responses=3)).train()
    assert "rewards/ranking_accuracy" in history[-1]


def test_wpo_on_both_backends(tmp_path):
    metrics = both_backends(tmp_path, TASK.preference_data(4, seed=1), loss_type=["sigmoid", "sft"],
                            use_weighting=True)
    assert "nll_loss" in metrics


def test_bad_ranked_records(tmp_path):
    model, tok = tiny()
    with pytest.raises(ValueError, match="record 0: expected a string 'prompt' and 'completions', a list of 3"):
        DPOTrainer(model, tok, [{"prompt": "a", "completions": ["b", "c"]}], config(tmp_path, num_responses=3))
    with pytest.raises(ValueError, match="loss_type: with num_responses=3"):
        config(tmp_path, num_responses=3, loss_type="ipo")
