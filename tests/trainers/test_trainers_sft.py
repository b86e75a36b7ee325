"""The SFT trainer on a tiny model: its loss against F.cross_entropy on the model's own logits (the labels TRL's
SFTTrainer builds: completion only, padding ignored), dft and label smoothing, padding-free batches, learning, the
config's checks."""
import pytest
import torch
import torch.nn.functional as F

from fastalign.trainers import SFTConfig, SFTTrainer
from fastalign.trainers.data import IGNORE_INDEX
from fastalign.trainers.sft import tokenize_sft
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import tiny_llama, word_tokenizer

TASK = CountingTask()
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0):
    tokenizer = word_tokenizer(TASK.words)
    torch.manual_seed(seed)
    return tiny_llama(tokenizer, hidden_size=32, intermediate_size=64), tokenizer


def data(n, seed=1, heldout=False):
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in TASK.preference_data(n, seed, heldout)]


def sft_config(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path / "sft"), learning_rate=3e-3, per_device_train_batch_size=8, max_steps=3,
                  disable_tqdm=True, max_length=32)
    return SFTConfig(**{**fields, **overrides})


@pytest.mark.parametrize("options", [dict(), dict(loss_type="dft"), dict(label_smoothing_factor=0.1),
                                     dict(padding_free=True), dict(completion_only_loss=False)])
def test_sft_loss_matches_cross_entropy_of_the_model_logits(tmp_path, options):
    model, tokenizer = tiny()
    trainer = SFTTrainer(model, tokenizer, data(8), sft_config(tmp_path, **options))
    batch = trainer.batch(trainer.train_items, list(range(8)))
    loss, metrics = trainer.compute_loss(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    eps = options.get("label_smoothing_factor", 0.0)
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", label_smoothing=eps)
    if options.get("loss_type") == "dft":
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        per_token = -logp * logp.exp()
    valid = labels != IGNORE_INDEX
    want = (per_token * valid).sum() / valid.sum()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    accuracy = (logits.argmax(-1) == labels)[valid].double().mean()
    assert metrics["mean_token_accuracy"] == pytest.approx(float(accuracy), abs=1e-6)
    prompt_tokens = len(tokenizer(data(8)[0]["prompt"])["input_ids"])
    trained_prompt = bool((batch["labels"][0, :prompt_tokens] != IGNORE_INDEX).any())
    assert trained_prompt == (options.get("completion_only_loss") is False)


def test_sft_fused_and_reference_backends_agree_and_learn(tmp_path):
    histories = []
    for backend in ("fused", "reference"):
        model, tokenizer = tiny()
        config = sft_config(tmp_path, loss_backend=backend, max_steps=6, gradient_accumulation_steps=2,
                            per_device_train_batch_size=4, output_dir=str(tmp_path / backend))
        histories.append(SFTTrainer(model, tokenizer, data(64), config, eval_dataset=data(8, 2, True)).train())
    fused, reference = histories
    for f, r in zip(fused, reference):
        assert f.keys() == r.keys()
        for key in ("loss", "eval_loss", "mean_token_accuracy"):
            if key in f:
                assert f[key] == pytest.approx(r[key], rel=1e-4, abs=1e-5)
    assert {"loss", "entropy", "mean_token_accuracy", "grad_norm", "learning_rate"} <= fused[0].keys()
    assert fused[-2]["loss"] < fused[0]["loss"]


def test_sft_text_and_messages_records():
    _, tokenizer = tiny()
    config = SFTConfig(max_length=5)
    text = tokenize_sft(tokenizer, {"text": "1 2 3 4 5 6"}, config, 0, "train_dataset")
    assert text.input_ids == text.labels and len(text.input_ids) == 5
    with pytest.raises(ValueError, match="has no chat_template"):
        tokenize_sft(tokenizer, {"messages": [{"role": "user", "content": "1"}]}, config, 0, "train_dataset")
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
                               "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }} : {% endif %}{% endfor %}")
    record = {"messages": [{"role": "user", "content": "1 2"}, {"role": "assistant", "content": "3 4"}]}
    tokens = tokenize_sft(tokenizer, record, SFTConfig(assistant_only_loss=True), 0, "train_dataset")
    words = tokenizer.convert_ids_to_tokens(tokens.input_ids)
    trained = [w for w, label in zip(words, tokens.labels) if label != IGNORE_INDEX]
    assert words == ["1", "2", ":", "3", "4"] and trained == ["3", "4"]
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }} {% endfor %}"
    with pytest.raises(ValueError, match="assistant_only_loss=True needs a chat template"):
        tokenize_sft(tokenizer, record, SFTConfig(assistant_only_loss=True), 0, "train_dataset")
    with pytest.raises(ValueError, match="expected a string 'text'"):
        tokenize_sft(tokenizer, {"answer": "1"}, config, 3, "train_dataset")


@pytest.mark.parametrize("fields, error", [
    (dict(loss_type="focal"), "SFTConfig.loss_type: expected one of"),
    (dict(label_smoothing_factor=1.5), "SFTConfig.label_smoothing_factor: expected a number in"),
    (dict(loss_type="dft", label_smoothing_factor=0.1), "SFTConfig.label_smoothing_factor: expected 0 with"),
    (dict(max_length=1), "SFTConfig.max_length: expected None or an int >= 2"),
])
def test_sft_config_checks(fields, error):
    with pytest.raises(ValueError, match=error):
        SFTConfig(**fields)


@pytest.mark.parametrize("options", [dict(loss_type="nll"), dict(loss_type="dft"),
                                     dict(loss_type="nll", label_smoothing_factor=0.1)])
def test_sft_matches_the_real_trl_sft_trainer(tmp_path, options):
    """TRL 1.16's ``SFTTrainer``: the same batch (ids and labels: prompt masked, EOS appended) from its collator and
    ours, and the same loss and metrics from its ``compute_loss`` and ours (bf16 off)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model, tokenizer = tiny()
    # TRL joins prompt + completion as text: the completion's leading space keeps ":" a word of its own
    records = [{**r, "completion": " " + r["completion"]} for r in data(8)]
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to=[], max_length=32, **options)
    theirs = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                            processing_class=tokenizer)
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(8)])
    want = theirs.compute_loss(model, dict(batch))
    ours = SFTTrainer(model, tokenizer, records, sft_config(tmp_path, **options))
    mine = ours.batch(ours.train_items, list(range(8)))
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(mine[key], batch[key]), key
    loss, metrics = ours.compute_loss(mine)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    for name in ("entropy", "mean_token_accuracy"):
        assert metrics[name] == pytest.approx(theirs._metrics["train"][name][-1], rel=1e-5)
