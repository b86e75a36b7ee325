"""fastalign.trl under torchrun's environment (2 gloo ranks on CPU) against one process with the same global batch:
the logged numbers (TRL's sum-and-count aggregation across ranks) and the final weights."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from helpers.distributed import run_ranks  # noqa: E402
from helpers.trl import RTOL, UNTIMED, _dpo_dataset, _saved_tiny_llama  # noqa: E402

WORLD = 2
PARALLELISM = {"ddp": {}, "fsdp2": dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2})}


def train_dpo(rank, world_size, model_dir, ref_dir, output_dir, parallelism):
    """fastalign.trl's DPOTrainer, 3 steps of 4 pairs in all (per process: 4 / world_size); history and weights.
    Loss types whose mean is over pairs (TRL's ``sft`` is a mean over each process's chosen tokens, averaged over
    processes by DDP: not the one-process mean, in TRL as here)."""
    import trl
    from transformers import AutoModelForCausalLM

    import fastalign.trl as fatrl

    args = trl.DPOConfig(output_dir=output_dir, max_steps=3, logging_steps=1, learning_rate=1e-3, report_to="none",
                         use_cpu=True, bf16=False, save_strategy="no", seed=0,
                         per_device_train_batch_size=4 // world_size, loss_type=["sigmoid", "ipo"], beta=0.5,
                         **PARALLELISM[parallelism])
    trainer = fatrl.DPOTrainer(model=model_dir, ref_model=AutoModelForCausalLM.from_pretrained(ref_dir), args=args,
                               train_dataset=_dpo_dataset(12))
    trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.accelerator.get_state_dict(trainer.model).items()}
    return trainer.state.log_history, weights


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return (_saved_tiny_llama(tmp_path_factory.mktemp("tiny"), 0), _saved_tiny_llama(tmp_path_factory.mktemp("ref"), 1))


@pytest.fixture(scope="module")
def one_process(dirs, tmp_path_factory):
    return run_ranks(train_dpo, 1, *dirs, str(tmp_path_factory.mktemp("one")), "ddp", init=False)[0]


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", list(PARALLELISM))
def test_two_ranks_match_one_process(parallelism, dirs, one_process, tmp_path):
    history, weights = one_process
    (ranked_history, ranked_weights), _ = run_ranks(train_dpo, WORLD, *dirs, str(tmp_path), parallelism, init=False)
    assert len(ranked_history) == len(history) >= 3
    for step, (log, ref) in enumerate(zip(ranked_history, history)):
        assert sorted(log) == sorted(ref)
        logps = max(abs(ref.get("logps/chosen", 0.0)), abs(ref.get("logps/rejected", 0.0)))
        for key in set(ref) - UNTIMED:
            atol = RTOL * logps if key.startswith("rewards/") else 1e-6
            assert math.isclose(log[key], ref[key], rel_tol=RTOL, abs_tol=atol), f"log {step} {key}"
    assert weights.keys() == ranked_weights.keys()
    for name, value in weights.items():
        assert (ranked_weights[name] - value).norm() <= RTOL * value.norm(), name
