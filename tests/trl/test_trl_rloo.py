"""``fastalign.trl.RLOOTrainer`` against TRL 1.16's ``RLOOTrainer``: the same seed and data, 3 optimizer steps, every
logged number and the final weights equal (relative 1e-5), over a grid of RLOO options; and one ``_compute_loss`` of
each trainer on a batch whose ratios reach both clips (the loss, every gradient and every metric)."""
from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402

import fastalign.trl as fatrl  # noqa: E402
from fastalign.trainers.tiny import tiny_llama, word_tokenizer  # noqa: E402
from helpers.trl import ATOL, RTOL, WORDS, assert_same_training_run  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and its word-level tokenizer saved to disk (TRL builds the reference from the path)."""
    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = word_tokenizer(WORDS)
    torch.manual_seed(0)
    tiny_llama(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _prompts(n: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(4)
    return Dataset.from_dict({"prompt": [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (2 + k % 3,),
                                                                                      generator=g))
                                         for k in range(n)]})


def count_cats(completions, **kwargs) -> list[float]:
    """A rule reward: the number of "cat" words minus half the number of "dog" words."""
    return [c.split().count("cat") - 0.5 * c.split().count("dog") for c in completions]


def short(completions, **kwargs) -> list[float]:
    """A second reward: shorter completions score higher."""
    return [-0.1 * len(c.split()) for c in completions]


CASES = {
    # LoRA (frozen lm_head), the KL penalty in the reward (reference: the disabled adapter), 2 iterations per
    # generation, gradient accumulation 2, an asymmetric clip range, a sampling temperature, normalized advantages
    "lora_kl_iterations_accumulation": dict(
        peft=True, beta=0.1, num_iterations=2, gradient_accumulation_steps=2, epsilon=0.05, epsilon_high=0.1,
        temperature=0.8, normalize_advantages=True),
    # the full model (lm_head gradients), two weighted rewards clipped, truncated completions masked, no KL
    "rewards_clip_truncated": dict(
        peft=False, beta=0.0, reward_weights=[1.0, 0.5], reward_clip_range=(-0.5, 1.0),
        mask_truncated_completions=True, num_generations=4, max_completion_length=3),
}


def _train(cls, model_dir, where, peft, **config):
    config = {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 5, **config}
    args = trl.RLOOConfig(output_dir=str(where), max_steps=3, logging_steps=1, learning_rate=1e-3, report_to="none",
                          use_cpu=True, bf16=False, save_strategy="no", seed=0, **config)
    extra = {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights=False)} if peft else {}
    rewards = [count_cats, short] if "reward_weights" in config else count_cats
    trainer = cls(model=model_dir, reward_funcs=rewards, args=args, train_dataset=_prompts(), **extra)
    trainer.train()
    return trainer


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_rloo_trainer_matches_trl(case, model_dir, tmp_path):
    case = dict(case)
    peft = case.pop("peft")
    theirs = _train(trl.RLOOTrainer, model_dir, tmp_path / "trl", peft, **case)
    ours = _train(fatrl.RLOOTrainer, model_dir, tmp_path / "fa", peft, **case)
    assert_same_training_run(ours, theirs, rtol=RTOL, atol=ATOL)
    first = theirs.state.log_history[0]
    assert "clip_ratio/region_mean" in first and "entropy" in first


@pytest.fixture(scope="module")
def rloo_pair(model_dir, tmp_path_factory):
    """TRL's RLOOTrainer and fastalign's on the same weights, and a batch as TRL's generation step leaves it, with
    ``old_logps`` set so that the sequence ratios fall below, inside and above the clip range."""
    trainers = []
    for cls in (trl.RLOOTrainer, fatrl.RLOOTrainer):
        args = trl.RLOOConfig(output_dir=str(tmp_path_factory.mktemp("rloo")), report_to="none", use_cpu=True,
                              bf16=False, per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                              beta=0.0, epsilon=0.1, epsilon_high=0.3, temperature=0.9)
        trainers.append(cls(model=model_dir, reward_funcs=count_cats, args=args, train_dataset=_prompts()))
    g = torch.Generator().manual_seed(0)
    vocab = trainers[0].model.config.vocab_size
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    inputs = {"prompt_ids": torch.randint(3, vocab, (4, 3), generator=g), "prompt_mask": torch.ones(4, 3).long(),
              "completion_ids": torch.randint(3, vocab, (4, 6), generator=g), "completion_mask": completion_mask}
    with torch.no_grad():  # the current log-probs, shifted per completion: ratios e^0.5, e^-0.5, e^0.05, 1
        model = trainers[0].model
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        logits = model(input_ids=ids).logits[:, 2:-1] / 0.9
        logps = (logits.log_softmax(-1).gather(-1, inputs["completion_ids"][..., None])[..., 0] * completion_mask)
    inputs["old_logps"] = logps.sum(1) - torch.tensor([0.5, -0.5, 0.05, 0.0])
    return trainers, inputs


def test_rloo_loss_gradients_and_metrics_match_trl(rloo_pair):
    """Both clip sides reached (ratios e^0.5 > 1.3 with A > 0, e^-0.5 < 0.9 with A < 0), then neither (the signs
    flipped: the unclipped term wins), a completion without tokens: the loss, every weight's gradient and every
    metric TRL logs."""
    trainers, inputs = rloo_pair
    regions = []
    for advantages in ([1.0, -0.7, 0.4, -1.2], [-1.0, 0.7, -0.4, 1.2]):
        batch = {**inputs, "advantages": torch.tensor(advantages)}
        results = []
        for trainer in trainers:
            trainer.model.train()
            trainer._metrics["train"].clear()
            params = [p for p in trainer.model.parameters() if p.requires_grad]
            loss = trainer._compute_loss(trainer.model, batch)
            results.append((loss.item(), torch.autograd.grad(loss, params), dict(trainer._metrics["train"])))
        (loss, grads, metrics), (ref_loss, ref_grads, ref_metrics) = results[1], results[0]
        assert math.isclose(loss, ref_loss, rel_tol=RTOL, abs_tol=ATOL), (loss, ref_loss)
        for grad, ref in zip(grads, ref_grads, strict=True):
            assert (grad - ref).norm() <= RTOL * ref.norm() + 1e-9
        assert metrics.keys() == ref_metrics.keys() and len(metrics) == 6
        for key, ref in ref_metrics.items():
            assert all(math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)
                       for a, b in zip(metrics[key], ref, strict=True)), (key, metrics[key], ref)
        regions += ref_metrics["clip_ratio/region_mean"]
    assert regions == [0.5, 0.0]  # not vacuous
