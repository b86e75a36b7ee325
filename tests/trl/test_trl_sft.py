"""fastalign.trl.SFTTrainer against TRL 1.16's SFTTrainer: the same seed, data and tiny random Llama (word-level
tokenizer built in code), 3 optimizer steps, every logged number and the final weights equal (1e-5 relative); and one
``compute_loss`` of each trainer on one collated batch over a grid of losses: the loss, every parameter's gradient
and every metric."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, PromptTuningConfig, TaskType  # noqa: E402
from transformers.trainer_pt_utils import LabelSmoother  # noqa: E402

import fastalign.trl as fatrl  # noqa: E402
from fastalign.trainers.tiny import tiny_llama, word_tokenizer  # noqa: E402
from fastalign.trl import head  # noqa: E402
from helpers.trl import assert_same_training_run  # noqa: E402

WORDS = "the a cat dog sat ran on under mat rug big small red blue fast slow yes no user bot".split()
# Assistant turns inside {% generation %}: what assistant_only_loss trains on
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}bot {% generation %}{{ m['content'] }} "
                 "<eos>{% endgeneration %} {% else %}user {{ m['content'] }} {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}bot {% endif %}")
RTOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and its word-level tokenizer (with a chat template) saved where TRL loads them from."""
    directory = tmp_path_factory.mktemp("tiny_sft")
    tokenizer = word_tokenizer(WORDS)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    tiny_llama(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _sentences(seed: int, n: int, low: int, high: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(16, (int(torch.randint(low, high, (1,), generator=g)),),
                                                          generator=g)) for _ in range(n)]


def _dataset(kind: str, n: int) -> Dataset:
    prompts, answers = _sentences(1, n, 2, 6), _sentences(2, n, 1, 6)
    if kind == "text":
        return Dataset.from_dict({"text": [f"{p} {a}" for p, a in zip(prompts, answers)]})
    if kind == "prompt_completion":
        return Dataset.from_dict({"prompt": prompts, "completion": [" " + a for a in answers]})
    return Dataset.from_dict({"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
                                           for p, a in zip(prompts, answers)]})


def _args(where, **config):
    return trl.SFTConfig(output_dir=str(where), max_steps=3, logging_steps=1, learning_rate=1e-3, report_to="none",
                         use_cpu=True, bf16=False, save_strategy="no", seed=0, per_device_train_batch_size=2,
                         **config)


def _lora():
    # Random B (not the zero init): the adapter changes the forward from the first step
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


RUNS = {
    # TRL's collator packs the batch into one row (position_ids): fastalign runs it through its packed attention
    # (per-sequence sdpa); TRL needs an extra full-logits forward for the smoothing
    "nll_smoothing_completion_only_padding_free_accumulation": (
        "prompt_completion", 12, False, dict(label_smoothing_factor=0.1, padding_free=True, max_length=None,
                                             gradient_accumulation_steps=2)),
    # BFD packing (padding-free rows) under gradient checkpointing: the block-diagonal mask path
    "dft_assistant_only_lora_packing_checkpointing": (
        "conversational", 24, True, dict(loss_type="dft", assistant_only_loss=True, packing=True, max_length=16,
                                         gradient_checkpointing=True)),
    # Padded batches on the whole text, with an evaluation
    "nll_text_eval": ("text", 8, False, dict(eval_strategy="steps", eval_steps=3)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", RUNS)
def test_sft_trainer_matches_trl(case, model_dir, tmp_path, monkeypatch):
    kind, n, peft, config = RUNS[case]
    dataset = _dataset(kind, n)
    extra = {"peft_config": _lora()} if peft else {}
    if "eval_strategy" in config:
        extra["eval_dataset"] = _dataset(kind, 4)

    def run(cls, where):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(model=model_dir, args=_args(where, **config), train_dataset=dataset, **extra)
            trainer.train()
        return trainer

    theirs = run(trl.SFTTrainer, tmp_path / "trl")
    packed, original = [], head.packed_row_hidden_states
    monkeypatch.setattr(head, "packed_row_hidden_states", lambda *a, **k: packed.append(1) or original(*a, **k))
    ours = run(fatrl.SFTTrainer, tmp_path / "fa")
    steps = 3 * config.get("gradient_accumulation_steps", 1)
    assert len(packed) == (steps if theirs.padding_free else 0)
    assert_same_training_run(ours, theirs, rtol=RTOL)


# --- one compute_loss, a grid of options -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_pair(model_dir, tmp_path_factory):
    """TRL's SFTTrainer and fastalign's on the same weights and a prompt-completion batch TRL collated (prompts
    masked, right padding)."""
    dataset = _dataset("prompt_completion", 3)
    trainers = [cls(model=model_dir, args=_args(tmp_path_factory.mktemp("sft")), train_dataset=dataset)
                for cls in (trl.SFTTrainer, fatrl.SFTTrainer)]
    batch = trainers[0].data_collator([trainers[0].train_dataset[i] for i in range(3)])
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()
    return trainers, batch


@pytest.mark.parametrize("loss_type, smoothing, num_items", [
    ("nll", 0.0, None), ("dft", 0.0, 23.0), ("nll", 0.2, 23.0), ("nll", 0.2, None),
    ("dft", 0.2, None)])  # TRL smooths the nll loss only
def test_sft_loss_gradients_and_metrics_match_trl(sft_pair, loss_type, smoothing, num_items):
    trainers, batch = sft_pair
    for trainer in trainers:
        trainer.args.loss_type, trainer.args.label_smoothing_factor = loss_type, smoothing
        trainer.label_smoother = LabelSmoother(epsilon=smoothing) if smoothing else None
    _assert_same_step(trainers, batch, num_items)


def test_sft_prompt_tuning_matches_trl(model_dir, tmp_path):
    """A prompt-learning adapter: peft prepends virtual tokens (and -100 labels) in its forward."""
    dataset = _dataset("prompt_completion", 3)
    trainers = [cls(model=model_dir, args=_args(tmp_path / cls.__module__), train_dataset=dataset,
                    peft_config=PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
                for cls in (trl.SFTTrainer, fatrl.SFTTrainer)]
    prepared = trainers[0].train_dataset
    _assert_same_step(trainers, trainers[0].data_collator([prepared[i] for i in range(3)]), 17.0)


def _assert_same_step(trainers, batch, num_items):
    """One ``compute_loss`` of TRL's trainer and of fastalign's: the loss, the trained parameters' gradients and
    every metric equal."""
    results = []
    for trainer in trainers:
        trainer.model.train()
        trainer._metrics["train"].clear()
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
        results.append((loss.item(), torch.autograd.grad(loss, params), dict(trainer._metrics["train"])))
    (ref_loss, ref_grads, ref_metrics), (loss, grads, metrics) = results
    assert math.isclose(loss, ref_loss, rel_tol=RTOL), (loss, ref_loss)
    assert max(float(g.abs().max()) for g in ref_grads) > 1e-6  # not vacuous
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert (grad - ref).norm() <= RTOL * ref.norm() + 1e-9
    assert metrics.keys() == ref_metrics.keys() == {"entropy", "mean_token_accuracy", "num_tokens"}
    for key, ref in ref_metrics.items():
        assert all(math.isclose(a, b, rel_tol=RTOL) for a, b in zip(metrics[key], ref, strict=True)), key


def test_sft_return_outputs_gives_the_logits(sft_pair):
    """``return_outputs=True`` (deprecated in TRL 1.16): the loss and the model's own outputs, logits included."""
    trainers, batch = sft_pair
    with pytest.warns(FutureWarning):
        (ref_loss, ref_out), (loss, out) = (t.compute_loss(t.model, dict(batch), return_outputs=True)
                                            for t in trainers)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(out.logits, ref_out.logits)


def test_sft_compute_loss_func_is_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func"):
        fatrl.SFTTrainer(model_dir, _args(tmp_path), None, _dataset("text", 2), None, None,
                         lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum())
