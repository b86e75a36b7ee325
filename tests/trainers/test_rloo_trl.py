"""RLOO against the real TRL 1.16 ``RLOOTrainer`` on a tiny random Llama (word-level tokenizer built in code, nothing
downloaded, ``bf16=False``): TRL samples and scores a generation batch (two weighted reward functions, an unscorable
completion, ``reward_clip_range``, KL in the reward against a perturbed reference model, ``normalize_advantages``);
``rloo_advantages`` gives TRL's advantages and reward metrics from the same rewards; the fused op on the same model's
hidden states gives ``RLOOTrainer._compute_loss``'s loss, metrics and every parameter's gradient on TRL's own inputs
dict (old log-probs shifted so that some completions are clipped); the defaults are TRL's."""
from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from datasets import Dataset
from trl import RLOOConfig as TRLRLOOConfig
from trl import RLOOTrainer as TRLRLOOTrainer

from fastalign import fused_linear_rloo_loss, hf
from fastalign.objectives.rloo import RLOOOptions, rloo_advantages
from fastalign.trainers import RLOOConfig
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import tiny_llama, word_tokenizer

PROMPTS = ["1 2 3 :", "7 6 5 :"]  # the same length: no prompt padding
G = 4
OPTIONS = dict(beta=0.1, epsilon=0.2, epsilon_high=0.28, normalize_advantages=True, reward_clip_range=(0.0, 4.0))
TEMPERATURE = 0.8
WEIGHTS = [1.0, 0.5]


class Rewards:
    """``words``: the completion's word count, None for the prompt starting with 7; ``ones``: how many "1" it holds,
    None for the first completion of that prompt (so that completion is unscorable). Both record what they
    returned."""

    def __init__(self):
        self.returned = {}

    def words(self, prompts, completions, **kwargs):
        scores = [None if p.startswith("7") else float(len(c.split())) for p, c in zip(prompts, completions)]
        self.returned["words"] = scores
        return scores

    def ones(self, prompts, completions, **kwargs):
        scores = [float(c.split().count("1")) for c in completions]
        scores[G] = None
        self.returned["ones"] = scores
        return scores


@pytest.fixture(scope="module")
def trl_batch(tmp_path_factory):
    """TRL's trainer, its inputs dict for one generation batch of 2 prompts x 4 completions, and the rewards."""
    directory = str(tmp_path_factory.mktemp("tiny"))
    tokenizer = word_tokenizer(CountingTask().words)
    torch.manual_seed(0)
    tiny_llama(tokenizer, hidden_size=32, intermediate_size=64).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    rewards = Rewards()
    args = TRLRLOOConfig(output_dir=str(tmp_path_factory.mktemp("out")), bf16=False, report_to="none", use_cpu=True,
                         num_generations=G, per_device_train_batch_size=2 * G, max_completion_length=6,
                         temperature=TEMPERATURE, reward_weights=WEIGHTS, disable_dropout=True, **OPTIONS)
    trainer = TRLRLOOTrainer(model=directory, reward_funcs=[rewards.words, rewards.ones], args=args,
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():  # a reference model that differs from the policy: the KL term is not 0
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.model.train()
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    return trainer, inputs, rewards


def sequence_inputs(inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    return ids, torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1]


def test_advantages_match_trl(trl_batch):
    trainer, inputs, rewards = trl_batch
    ids, attention_mask, width = sequence_inputs(inputs)
    with torch.no_grad():
        old, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention_mask, width)
        ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, attention_mask, width)
    mask = inputs["completion_mask"]
    torch.testing.assert_close((old * mask).sum(1), inputs["old_logps"])
    rewards_per_func = torch.tensor([[math.nan if r is None else r for r in rewards.returned[name]]
                                     for name in ("words", "ones")]).T
    options = RLOOOptions(num_generations=G, **{k: OPTIONS[k] for k in ("beta", "normalize_advantages",
                                                                      "reward_clip_range")})
    kl = ((old - ref) * mask).sum(-1)
    assert float(kl.abs().min()) > 1e-3  # the KL term matters
    got = rloo_advantages(rewards_per_func, torch.tensor(WEIGHTS), options, kl=kl)
    torch.testing.assert_close(got.advantages, inputs["advantages"], rtol=1e-5, atol=1e-6)
    assert float(got.advantages[G]) == 0.0 and float(got.advantages.abs().max()) > 0.1  # unscorable: 0
    logged = trainer._metrics["train"]
    for name in ("reward", "reward_std", "frac_reward_zero_std"):
        torch.testing.assert_close(float(got.metrics[name]), logged[name][-1], rtol=1e-6, atol=1e-7)
    without_kl = rloo_advantages(rewards_per_func, torch.tensor(WEIGHTS),
                                 dataclasses.replace(options, beta=0.0)).advantages
    assert not torch.allclose(without_kl, inputs["advantages"], atol=1e-3)  # the test sees a missing KL term


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_and_every_gradient_match_trl(trl_batch, backend):
    trainer, inputs, _ = trl_batch
    model = trainer.model
    inputs = dict(inputs, old_logps=inputs["old_logps"] + torch.tensor([0.5, -0.5, 0.05, 0.4, -0.4, 0.0, 0.6, -0.1]))
    params = [p for p in model.parameters() if p.requires_grad]
    want = trainer._compute_loss(model, inputs)
    want_grads = torch.autograd.grad(want, params)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k == "entropy" or k.startswith("clip_")}

    ids, attention_mask, width = sequence_inputs(inputs)
    out = hf.get_backbone(model)(input_ids=ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state[:, -width - 1:-1]
    targets = inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    head = hf.get_lm_head(model)
    got = fused_linear_rloo_loss(hidden, head.weight, targets, inputs["advantages"], old_logprobs=inputs["old_logps"],
                                 bias=head.bias, temperature=TEMPERATURE, backend=backend,
                                 epsilon=OPTIONS["epsilon"], epsilon_high=OPTIONS["epsilon_high"])
    grads = torch.autograd.grad(got.loss, params)
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=0)
    assert 0 < float(got.metrics["clip_ratio/region_mean"]) < 1  # some completions clipped, some not
    assert set(got.metrics) == set(logged)
    for name, value in logged.items():
        torch.testing.assert_close(float(got.metrics[name]), value, rtol=1e-5, atol=1e-7, msg=name)
    for (name, _), g, w in zip(model.named_parameters(), grads, want_grads):
        assert float(w.abs().max()) > 0, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()), msg=lambda m: f"{name}: {m}")


def test_defaults_are_trl_and_come_from_one_place():
    """The options' defaults are TRL 1.16's ``RLOOConfig`` defaults; the op's signature and fastalign's
    ``RLOOConfig`` take the same values."""
    trl_defaults = {f.name: f.default for f in dataclasses.fields(TRLRLOOConfig)}
    op = inspect.signature(fused_linear_rloo_loss).parameters
    ours = RLOOConfig()
    for f in dataclasses.fields(RLOOOptions):
        assert f.default == trl_defaults[f.name], f.name
        assert getattr(ours, f.name) == f.default, f.name
        if f.name in op:
            assert op[f.name].default == f.default, f.name
    for name in ("num_iterations", "max_completion_length", "temperature", "top_p", "top_k", "learning_rate",
                 "mask_truncated_completions", "reward_weights"):
        assert getattr(ours, name) == trl_defaults[name], name
