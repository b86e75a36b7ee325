"""The trainers on 2 gloo ranks spawned from pytest (DDP and FSDP2): 2 ranks x b give the gradients, weights and
logged metrics of one process x 2b (the global normalization, the sampler split, FSDP2's unshard and reduce-scatter
of the lm_head the fused ops read directly), only rank 0 writes, a checkpoint resumes at another world size, and the
README's torchrun commands run (one node, and two "nodes" on loopback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from torch.distributed.tensor import DTensor

from helpers.distributed import free_port, run_ranks
from helpers.noise import SEPARATED, recorded_calls, reward_margins
from helpers.trainers import scripted_generate
from fastalign import hf
from fastalign.trainers import (DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, PPOConfig,
                                PPOTrainer, RLOOConfig, RLOOTrainer)
from fastalign.trainers.config_file import example_config
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import tiny_llama, word_tokenizer

TASK = CountingTask()
WORLD = 2
pytestmark = pytest.mark.usefixtures("one_thread")


def preference_data() -> list[dict[str, str]]:
    """48 counting pairs whose chosen answers have 1 to 4 words: token means differ from means over pairs."""
    return [{**r, "chosen": " ".join(r["chosen"].split()[:1 + i % 4])}
            for i, r in enumerate(TASK.preference_data(48, seed=1))]


def unpaired_data() -> list[dict]:
    """48 KTO examples, 3 in 4 desirable, all with one completion: an example's KL pair (its prompt, the previous
    example's completion) is then the same however the batch is split over ranks, and the batch KL, pushed above 0
    by the desirable examples, is the mean over the step's examples both ways."""
    prompts = TASK.prompts(48, seed=3)
    completion = " ".join(TASK.answer(prompts[0]))
    return [{"prompt": p, "completion": completion, "label": i % 4 != 0} for i, p in enumerate(prompts)]


def make_trainer(kind: str, output_dir: str, per_device: int, accumulation: int = 2, tied: bool = False,
                 scripted: bool = True, eval_dataset=None, **overrides):
    """A DPO (with RPO, so the chosen-token count matters), PPO or GRPO trainer on a tiny Llama, ``accumulation``
    micro-batches of ``per_device`` samples per step. ``scripted``: responses from :func:`scripted_generate`. GRPO:
    one micro-batch of ``per_device x accumulation`` completions, so that with 2 ranks each holds one group of 4
    (lengths that depend on the prompt: the ranks' token counts differ) in one micro-batch; batch-scaled rewards
    (over all ranks), dapo's token normalizer over the whole step, two iterations per generation batch (old
    log-probs), a reference model."""
    tokenizer = word_tokenizer(TASK.words)
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64, tie_word_embeddings=tied)
    fields = dict(output_dir=output_dir, per_device_train_batch_size=per_device,
                  gradient_accumulation_steps=accumulation,
                  max_steps=3, disable_tqdm=True) | overrides
    if kind == "dpo":
        config = DPOConfig(learning_rate=3e-3, max_length=32, max_prompt_length=16, rpo_alpha=1.0, **fields)
        return DPOTrainer(model, tokenizer, preference_data(), config)
    if kind == "kto":  # one micro-batch per rank: the batch KL is a mean over it (then over the ranks)
        fields = dict(fields, per_device_train_batch_size=per_device * accumulation, gradient_accumulation_steps=1)
        config = KTOConfig(learning_rate=3e-3, max_length=32, max_prompt_length=16, **fields)
        return KTOTrainer(model, tokenizer, unpaired_data(), config)
    if kind in ("grpo", "rloo"):  # RLOO: the batch-normalized advantages and the KL in the reward over all ranks
        fields = dict(fields, per_device_train_batch_size=per_device * accumulation, gradient_accumulation_steps=1)
        options = dict(scale_rewards="batch") if kind == "grpo" else dict(normalize_advantages=True)
        config = (GRPOConfig if kind == "grpo" else RLOOConfig)(
            learning_rate=1e-3, num_generations=4, max_completion_length=6, num_iterations=2, beta=0.1,
            **options, **fields | overrides)
        trainer = (GRPOTrainer if kind == "grpo" else RLOOTrainer)(model, tokenizer, TASK.prompts(48, seed=3),
                                                                   TASK.score, config)
        if scripted:  # a group's 4 completions differ by their position in the step's batch, modulo 4
            trainer.policy.generate = scripted_generate(trainer, period=4)
        return trainer
    config = PPOConfig(learning_rate=1e-3, response_length=6, temperature=1.0, num_ppo_epochs=2,
                       missing_eos_penalty=1.0, **fields)
    trainer = PPOTrainer(model, tokenizer, TASK.prompts(48, seed=3), TASK.score, config, eval_dataset=eval_dataset)
    if scripted:
        trainer.policy.generate = scripted_generate(trainer)
    return trainer


def capture_gradients(trainer) -> list[list[torch.Tensor]]:
    """Every optimizer step's gradients, whole (gathered from FSDP's shards), before clipping."""
    captured, step = [], trainer.optimizer_step

    def capture(finite):
        captured.append([p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                         for p in trainer.params])
        return step(finite)

    trainer.optimizer_step = capture
    return captured


def smallest_margins(calls, calls_per_step: int) -> list[float]:
    """Per optimizer step (``calls_per_step`` recorded DPO loss calls each), the smallest ``|reward margin|``."""
    margins = reward_margins(calls)
    return [float(torch.cat(margins[i:i + calls_per_step]).min()) for i in range(0, len(margins), calls_per_step)]


def assert_same_records(a: list[dict], b: list[dict], keys, margins: list[float], **tolerance) -> int:
    """Records of the same steps agree on ``keys``; ``rewards/accuracies``, a step function of the reward margins,
    only where ``margins`` (per step, the smallest over both runs) exceed ``SEPARATED`` (at step 1 policy =
    reference: the margins are rounding noise, ~1e-8, and their signs depend on the summation order). Returns how
    many steps compared accuracies."""
    assert len(a) == len(b) == len(margins)
    compared = 0
    for step, (x, y, margin) in enumerate(zip(a, b, margins), 1):
        for key in keys:
            if key == "rewards/accuracies" and margin <= SEPARATED:
                continue
            compared += key == "rewards/accuracies"
            assert x[key] == pytest.approx(y[key], **tolerance), f"step {step}: {key}"
    return compared


def train_on_rank(rank, world_size, kind, output_dir, parallelism, tied, overrides=None):
    """The records, every step's gradients, (PPO) whether the reference model is sharded (all DTensors) and (DPO)
    every step's smallest reward margin on this rank."""
    trainer = make_trainer(kind, output_dir, 2, 2, tied, parallelism=parallelism, **(overrides or {}))
    gradients = capture_gradients(trainer)
    with recorded_calls("fused_linear_dpo_loss") as calls:
        history = trainer.train()
    reference = getattr(trainer, "ref_engine", None)
    sharded = None if reference is None else all(isinstance(p, DTensor) for p in reference.parameters())
    return history, gradients, sharded, smallest_margins(calls, trainer.config.gradient_accumulation_steps)


def saved_weights(directory: str) -> dict[str, torch.Tensor]:
    return hf.load_pretrained(directory).state_dict()


def assert_same_weights(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tolerance, msg=lambda m: f"{key}: {m}")


# Metrics that are the same number for 2 ranks x b and 1 process x 2b (PPO's token means, e.g. policy/clipfrac,
# are averaged over ranks as TRL does, which weighs each rank's tokens by 1 / its token count).
SAME_METRICS = {"dpo": ("loss", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                        "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "epoch"),
                "ppo": ("loss/policy", "loss/value", "loss/total", "objective/scores", "objective/rlhf_reward",
                        "grad_norm", "learning_rate", "episode", "epoch"),
                "grpo": ("loss", "reward", "reward_std", "frac_reward_zero_std", "rewards/score/mean",
                         "completions/mean_length", "completions/clipped_ratio", "grad_norm", "learning_rate",
                         "epoch"),
                "rloo": ("loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "rewards/score/mean",
                         "completions/mean_length", "grad_norm", "learning_rate", "epoch"),
                "kto": ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                        "logps/rejected", "grad_norm", "learning_rate", "epoch")}


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """One-process runs with the global batch (2 ranks x 2 micro-batches x 2) in one micro-batch, by (kind, tied):
    history, gradients, output directory, (DPO) every step's smallest reward margin."""
    runs = {}

    def run(kind: str, tied: bool):
        if (kind, tied) not in runs:
            output_dir = str(tmp_path_factory.mktemp(f"{kind}-{tied}"))
            trainer = make_trainer(kind, output_dir, 2 * 2 * WORLD, 1, tied)
            gradients = capture_gradients(trainer)
            with recorded_calls("fused_linear_dpo_loss") as calls:
                history = trainer.train()
            runs[kind, tied] = history, gradients, output_dir, smallest_margins(calls, 1)
        return runs[kind, tied]

    return run


@pytest.mark.parametrize("kind, parallelism, tied, checkpointing, padding_free", [
    ("dpo", "ddp", False, False, False), ("ppo", "ddp", False, True, False), ("dpo", "fsdp", False, True, False),
    ("ppo", "fsdp", True, False, False), ("grpo", "ddp", False, False, False), ("grpo", "fsdp", True, True, False),
    ("dpo", "ddp", False, False, True), ("dpo", "fsdp", False, False, True), ("grpo", "fsdp", True, False, True), ("kto", "ddp", False, False, False),
    pytest.param("rloo", "ddp", False, False, False, marks=pytest.mark.slow)])
def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path, one_process_runs, kind, parallelism, tied,
                                                          checkpointing, padding_free):
    """Gradients of every optimizer step (3 steps, 2 micro-batches each, PPO 2 epochs, GRPO 2 iterations), the logged
    metrics and the final weights. Under FSDP2 the lm_head (tied to the embeddings for PPO) is a sharded root
    parameter that the fused ops read without its forward: a gradient that missed the reduce-scatter would differ
    here. DPO's accuracies are compared at the steps whose reward margins are all far from 0 (steps 2 and 3). Three
    cases run the ranks with gradient checkpointing (the one-process run without): recomputing the layers inside
    DDP's and FSDP2's forward and backward hooks changes nothing; three with ``padding_free`` (packed sequences
    through DDP and FSDP2: the same steps as the padded one-process run)."""
    history, gradients, output_dir, margins = one_process_runs(kind, tied)
    (ranked_history, ranked_gradients, sharded_reference, margins0), other = run_ranks(
        train_on_rank, WORLD, kind, str(tmp_path), parallelism, tied,
        {"gradient_checkpointing": checkpointing, "padding_free": padding_free}, init=False)
    assert sharded_reference == (None if kind == "dpo" else parallelism == "fsdp")  # PPO's reference: as the policy
    assert other[0] == ranked_history  # every rank logs the same (averaged) records
    assert len(ranked_gradients) == len(gradients) == 3 * (1 if kind in ("dpo", "kto") else 2)
    assert all(any(g.abs().sum() > 0 for g in step) for step in gradients)  # GRPO: rewards vary within the group
    if kind == "kto":  # the batch KL, averaged over the ranks, above its clamp at 0 after step 1
        assert all(r["kl"] > 1e-3 for r in history[1:]), [r["kl"] for r in history]
    for step, (ranked, single) in enumerate(zip(ranked_gradients, gradients)):
        assert len(ranked) == len(single)
        for i, (a, b) in enumerate(zip(ranked, single)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step} param {i}: {m}")
    assert [r["step"] for r in ranked_history] == [r["step"] for r in history] == [1, 2, 3]
    margins = [min(m) for m in zip(margins, margins0, other[3])] if kind == "dpo" else [0.0] * 3
    compared = assert_same_records(ranked_history, history, SAME_METRICS[kind], margins, rel=1e-4, abs=1e-6)
    assert compared == (2 if kind == "dpo" else 0)
    # GRPO: AdamW normalizes gradient elements near 0 (equal here only to the 1e-6 absolute tolerance above), so their
    # float noise can reach the weights magnified; a real error would move them by about the learning rate (1e-3)
    atol = 1e-5 if kind in ("grpo", "rloo") else 1e-6
    assert_same_weights(saved_weights(str(tmp_path)), saved_weights(output_dir), rtol=1e-4, atol=atol)


def train_and_record_rank_metrics(rank, world_size, output_dir):
    """FSDP2 PPO with real sampling (generate as an FSDP forward method, ranks kept in step) and evaluation; each
    rank writes to its own ``output_dir`` and records its metrics before averaging."""
    # 5 eval prompts in batches of 2: rank 0 evaluates [0, 2], [4]; rank 1 [1, 3] and a batch that counts 0 times
    trainer = make_trainer("ppo", os.path.join(output_dir, f"rank{rank}"), 2, scripted=False, parallelism="fsdp",
                           eval_dataset=TASK.prompts(5, seed=4, heldout=True), save_steps=2, eval_steps=2,
                           per_device_eval_batch_size=2)
    local, end_step = [], trainer.end_step

    def record(metrics):
        local.append(metrics)
        end_step(metrics)

    trainer.end_step = record
    return trainer.train(), local


def test_only_rank_zero_writes_and_logs_the_average_over_ranks(tmp_path):
    (history, local0), (history1, local1) = run_ranks(train_and_record_rank_metrics, WORLD, str(tmp_path),
                                                      init=False)
    assert sorted(os.listdir(tmp_path)) == ["rank0"]  # rank 1 wrote nothing
    written = sorted(os.listdir(tmp_path / "rank0"))
    assert {"checkpoint-2", "metrics.jsonl", "model.safetensors", hf.VALUE_HEAD_FILE} <= set(written)
    with open(tmp_path / "rank0" / "metrics.jsonl") as lines:
        assert [json.loads(line) for line in lines] == history == history1
    train = [r for r in history if "objective/scores" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in history if "eval_objective/scores" in r] == [2, 3]
    assert local0[0]["objective/scores"] != local1[0]["objective/scores"]  # the ranks sampled different prompts
    for record, a, b in zip(train, local0, local1):
        for key in a:
            assert record[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-6), key


def test_resume_at_another_world_size(tmp_path):
    """2 ranks save at step 2 and finish at step 4; one process resumes the step-2 checkpoint with the same global
    batch (2 x 2 per micro-batch) and ends with the same weights and records. Another global batch is refused."""
    output_dir = str(tmp_path / "run")
    (history, _, _, margins0), (*_, margins1) = run_ranks(train_on_rank, WORLD, "dpo", output_dir, "fsdp", False,
                                                          dict(max_steps=4, save_steps=2), init=False)
    ranked_final = saved_weights(output_dir)
    resumed = make_trainer("dpo", output_dir, 2 * WORLD, max_steps=4, save_steps=2)
    with recorded_calls("fused_linear_dpo_loss") as calls:
        resumed.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2"))
    assert_same_weights(saved_weights(output_dir), ranked_final, rtol=1e-4, atol=1e-6)
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r.keys() for r in resumed.history] == [r.keys() for r in history]
    # steps 1 and 2 are the checkpoint's records; 3 and 4 were computed again by one process
    margins = [min(m) for m in zip(margins0, margins1, [float("inf")] * 2 + smallest_margins(calls, 1))]
    assert assert_same_records(resumed.history, history, history[0].keys(), margins, rel=1e-4, abs=1e-6) >= 2
    with pytest.raises(ValueError, match=r"global batch of 8 samples per step, this run has 4 .*set "
                                         r"per_device_train_batch_size x gradient_accumulation_steps x processes"):
        make_trainer("dpo", output_dir, WORLD, max_steps=4).train(resume_from_checkpoint=True)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the torchrun script runs


@pytest.mark.parametrize("nodes", [1, 2])
def test_torchrun_runs_the_readme_commands(tmp_path, nodes):
    """The README's commands with FSDP2 on a tiny config, 2 processes: one node (``--standalone
    --nproc_per_node=2``), or two "nodes" of one process on this machine (``--nnodes=2 --node_rank=K
    --rdzv_endpoint=127.0.0.1:PORT``). One summary line, rank 0's files."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TASK.preference_data(32, seed=1)))
    spec = yaml.safe_load(example_config("dpo"))
    spec.pop("eval_file")
    spec["train_file"] = str(data)
    spec["config"].update(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                          per_device_eval_batch_size=8, disable_tqdm=True, eval_steps=0, parallelism="fsdp")
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(spec))
    program = ["-m", "fastalign.cli", "dpo", "--config", str(config)]
    if nodes == 1:
        commands = [TORCHRUN + ["--standalone", "--nproc_per_node=2", *program]]
    else:
        endpoint = f"127.0.0.1:{free_port()}"
        commands = [TORCHRUN + ["--nnodes=2", f"--node_rank={k}", "--nproc_per_node=1", f"--rdzv_endpoint={endpoint}",
                                *program] for k in range(2)]
    runs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}) for c in commands]
    try:
        outputs = [run.communicate(timeout=90) for run in runs]
    except subprocess.TimeoutExpired:
        for run in runs:
            run.kill()
        pytest.fail("torchrun hung:\n" + "\n".join(run.communicate()[1][-2000:] for run in runs))
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-12000:]
    out = "".join(o for o, _ in outputs)
    assert out.count("steps done") == 1 and "2 steps done on 2 process(es)" in out
    with open(tmp_path / "out" / "metrics.jsonl") as lines:
        assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
