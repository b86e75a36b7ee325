"""KTOTrainer end to end on a tiny model: learning the counting task from unpaired labels, TRL's KL pairs and
estimate, fused == reference backend, exact resume, config and data errors."""
import json
import os
import pathlib

import pytest
import torch
import yaml

from fastalign import hf
from fastalign.objectives.kto import KTO_LOSS_TYPES
from fastalign.trainers import KTOConfig, KTOTrainer
from fastalign.trainers.data import PairTokens, encode_response, pad
from fastalign.trainers.kto import unpair_preference_data
from fastalign.trainers.tasks import CountingTask
from helpers.trainers import read_jsonl, tiny, unpaired, weights

TASK = CountingTask()
KTO_METRICS = {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
               "logps/rejected", "grad_norm", "learning_rate", "epoch"}

pytestmark = pytest.mark.usefixtures("one_thread")


def kto_config(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path / "kto"), learning_rate=3e-3, per_device_train_batch_size=8,
                  max_steps=4, disable_tqdm=True, max_length=32, max_prompt_length=16)
    return KTOConfig(**{**fields, **overrides})


@torch.no_grad()
def heldout_reward_margins(trainer, pairs):
    """``beta * (policy - reference)`` of each held-out pair's chosen minus its rejected completion."""
    records = unpair_preference_data(pairs)  # chosen ones first, then rejected
    examples = trainer.tokenize(records, "heldout")
    batch = trainer.batch(examples, list(range(len(examples))))
    rows = [batch[k][:len(examples)] for k in ("input_ids", "attention_mask", "labels")]
    rewards = trainer.config.beta * (trainer.sequence_logps(trainer.model, *rows)
                                     - trainer.sequence_logps(trainer.ref_model, *rows))
    return rewards[:len(pairs)] - rewards[len(pairs):]


def supervised_warmup(model, tok, records, steps=100, batch=16, lr=3e-3):
    """KTO starts from a supervised model (the KTO paper's and TRL's recipe): a few steps of next-token loss on the
    desirable completions. From a random init no preference loss here (nor DPO without its NLL term) learns the
    rule well enough to generalize to the held-out prompts."""
    desirable = [r for r in records if r["label"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        chunk = [desirable[(step * batch + i) % len(desirable)] for i in range(batch)]
        pairs = [PairTokens(tok(r["prompt"])["input_ids"], encode_response(tok, r["completion"], 0, None), [])
                 for r in chunk]
        ids, mask = pad([p.prompt + p.chosen for p in pairs], tok.pad_token_id)
        labels = pad([[-100] * len(p.prompt) + p.chosen for p in pairs], -100)[0]
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.slow
def test_kto_learns_counting_from_unpaired_labels(tmp_path):
    """Held-out fraction 0.94 to 0.99 over model seeds 0 to 3 when written (0.88 to 0.98 with equal weights)."""
    model, tok = tiny()
    records = unpaired(960, seed=1)
    supervised_warmup(model, tok, records, steps=200)
    # desirable_weight 1.33: the top of the KTO paper's range for balanced data (Eq. 8), it keeps the desirable
    # completions' log-probs from sinking with the undesirable ones that share their tokens.
    config = kto_config(tmp_path, max_steps=200, per_device_train_batch_size=16, learning_rate=1e-3, beta=0.5,
                        desirable_weight=1.33, warmup_ratio=0.1, eval_steps=100, logging_steps=5)
    trainer = KTOTrainer(model, tok, records, config, eval_dataset=unpaired(32, seed=2))
    history = trainer.train()
    assert read_jsonl(os.path.join(config.output_dir, "metrics.jsonl")) == history
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(5, 201, 5)) and [r["step"] for r in evals] == [100, 200]
    assert KTO_METRICS <= set(train[-1]) and {"eval_kl", "eval_rewards/margins"} <= set(evals[-1])
    assert train[-1]["loss"] < train[0]["loss"] - 0.1
    assert evals[-1]["eval_rewards/margins"] > 1.0
    # Held-out prompts (first number a multiple of 5, never trained on): desirable above undesirable.
    margins = heldout_reward_margins(trainer, TASK.preference_data(100, seed=3, heldout=True))
    assert (margins > 0.05).float().mean() >= 0.9, margins  # well clear of 0: not a float-noise decision


def test_kl_pairs_and_estimate_follow_trl(tmp_path):
    model, tok = tiny()
    records = unpaired(4, seed=1)
    trainer = KTOTrainer(model, tok, records, kto_config(tmp_path, per_device_train_batch_size=4, beta=0.5))
    with torch.no_grad():  # a policy away from the reference: a non-zero KL
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    indices = [5, 0, 3, 6]
    batch = trainer.batch(trainer.train_examples, indices)
    text = [tok.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    for k, i in enumerate(indices):
        previous = records[indices[k - 1]]  # k = 0 takes the last example's completion, as TRL's rotation
        assert text[k] == f"{records[i]['prompt']} {records[i]['completion']} <eos>"
        assert text[4 + k] == f"{records[i]['prompt']} {previous['completion']} <eos>"
    assert batch["label"].tolist() == [records[i]["label"] for i in indices]

    rows = [batch[k][4:] for k in ("input_ids", "attention_mask", "labels")]
    with torch.no_grad():
        gap = (trainer.sequence_logps(model, *rows) - trainer.sequence_logps(trainer.ref_model, *rows)).mean()
    ref, kl = trainer.reference_and_kl(batch)
    assert kl.item() == pytest.approx(max(gap.item(), 0.0), abs=1e-6)
    metrics = trainer.compute_loss(batch)[1]
    assert metrics["kl"] == pytest.approx(kl.item(), abs=1e-6)
    assert metrics["count/chosen"] + metrics["count/rejected"] == 4


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_kto_fused_and_reference_backends_agree(tmp_path, loss_type):
    model, tok = tiny()
    data = unpaired(4, seed=1)
    trainers = {backend: KTOTrainer(model, tok, data, kto_config(tmp_path, loss_backend=backend,
                                                                 loss_type=loss_type, desirable_weight=1.3))
                for backend in ("fused", "reference")}
    with torch.no_grad():  # move the policy away from the reference, so that rewards and KL are not 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    results = {}
    for backend, trainer in trainers.items():
        loss, metrics = trainer.compute_loss(trainer.batch(trainer.train_examples, list(range(8))))
        loss.backward()
        results[backend] = loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
    (loss_f, metrics_f, grads_f), (loss_r, metrics_r, grads_r) = results.values()
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-6)
    assert metrics_f.keys() == metrics_r.keys()
    for key in metrics_f:
        assert metrics_f[key] == pytest.approx(metrics_r[key], rel=1e-4, abs=1e-5), key
    assert any(g.abs().sum() > 0 for g in grads_f)
    for g_f, g_r in zip(grads_f, grads_r):
        torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-5)


def make_trainer(tmp_path, **options):
    model, tok = tiny()
    config = kto_config(tmp_path, max_steps=6, save_steps=3, per_device_train_batch_size=4,
                        gradient_accumulation_steps=2, **options)
    return KTOTrainer(model, tok, unpaired(20, seed=1), config)


@pytest.mark.parametrize("options", [{}, {"gradient_checkpointing": True, "bf16": True}], ids=["fp32", "ckpt-bf16"])
def test_kto_resume_continues_exactly(tmp_path, options):
    full = make_trainer(tmp_path / "full", **options)
    full.train()
    crashed = make_trainer(tmp_path / "resumed", **options)
    original = crashed.compute_loss

    def crash(*args):
        if crashed.step == crashed.config.save_steps:
            raise KeyboardInterrupt("killed")
        return original(*args)

    crashed.compute_loss = crash
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = make_trainer(tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=True)
    for (key, a), b in zip(weights(full.model).items(), weights(resumed.model).values()):
        assert torch.equal(a, b), key
    assert read_jsonl(os.path.join(resumed.config.output_dir, "metrics.jsonl")) == full.history
    assert not torch.equal(full.model.lm_head.weight, make_trainer(tmp_path / "x").model.lm_head.weight)


def test_kto_config_and_data_errors(tmp_path):
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        KTOConfig(per_device_train_batch_size=1)
    KTOConfig(per_device_train_batch_size=1, loss_type="apo_zero_unpaired")  # no KL term: one example is fine
    with pytest.raises(ValueError, match="loss_type"):
        KTOConfig(loss_type="sigmoid")
    with pytest.raises(ValueError, match="desirable_weight"):
        KTOConfig(desirable_weight=-1.0)
    model, tok = tiny()
    with pytest.raises(ValueError, match="record 1.*label"):
        KTOTrainer(model, tok, [{"prompt": "1 2 :", "completion": "3", "label": True},
                                {"prompt": "1 2 :", "completion": "3", "label": 1}], kto_config(tmp_path))


def test_cli_example_runs_with_user_unpaired_data(tmp_path, capsys):
    from fastalign.cli import main
    from fastalign.trainers.config_file import example_config

    assert main(["kto", "--example"]) == 0
    assert capsys.readouterr().out == example_config("kto")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in unpaired(8, seed=1)))
    spec = yaml.safe_load(example_config("kto"))
    spec.update(train_file=str(train), eval_file=None, tiny={"hidden_size": 32, "intermediate_size": 64})
    spec["config"].update(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                          disable_tqdm=True)
    path = tmp_path / "kto.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["kto", "--config", str(path)]) == 0
    assert "2 steps done" in capsys.readouterr().out
    records = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and "kl" in records[-1]
    spec["config"]["loss_type"] = "sigmoid"
    path.write_text(yaml.safe_dump(spec))
    assert main(["kto", "--config", str(path)]) == 2
    assert "KTOConfig.loss_type: expected one of ('kto', 'apo_zero_unpaired')" in capsys.readouterr().err


# --- two ranks (DDP, FSDP2) -----------------------------------------------------------------------------------------

def distributed_trainer(output_dir, per_device, accumulation, **overrides):
    model, tok = tiny()
    config = kto_config(pathlib.Path(output_dir), per_device_train_batch_size=per_device,
                        gradient_accumulation_steps=accumulation, max_steps=2, **overrides)
    return KTOTrainer(model, tok, unpaired(16, seed=1), config)


def kto_on_rank(rank, world_size, output_dir, overrides):
    return distributed_trainer(output_dir, 2, 2, **overrides).train()


def saved_weights(output_dir):
    return hf.load_pretrained(os.path.join(output_dir, "kto")).state_dict()


@pytest.mark.slow
def test_two_ranks_ddp_and_fsdp():
    """apo_zero_unpaired (no KL term) on 2 ranks x 2 x 2 micro-batches = one process x 8: same logged losses and
    weights. kto: its KL pairs and estimate are per rank and micro-batch (TRL's), so DDP and FSDP2 (reference
    sharded too) are compared with each other."""
    import tempfile

    from helpers.distributed import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        apo = {"loss_type": "apo_zero_unpaired"}
        single_history = distributed_trainer(os.path.join(tmp, "single"), 8, 1, **apo).train()
        ranked, other = run_ranks(kto_on_rank, 2, os.path.join(tmp, "apo"), apo, init=False)
        assert other == ranked and len(ranked) == len(single_history) == 2
        for a, b in zip(ranked, single_history):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        for key, value in saved_weights(os.path.join(tmp, "single")).items():
            torch.testing.assert_close(saved_weights(os.path.join(tmp, "apo"))[key], value, rtol=1e-4, atol=1e-6,
                                       msg=key)
        runs = {p: run_ranks(kto_on_rank, 2, os.path.join(tmp, p), {"parallelism": p}, init=False)[0]
                for p in ("ddp", "fsdp")}
        assert runs["ddp"] != [] and [a.keys() for a in runs["ddp"]] == [b.keys() for b in runs["fsdp"]]
        for a, b in zip(runs["ddp"], runs["fsdp"]):
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        for key, value in saved_weights(os.path.join(tmp, "ddp")).items():
            torch.testing.assert_close(saved_weights(os.path.join(tmp, "fsdp"))[key], value, rtol=1e-4, atol=1e-6,
                                       msg=key)
