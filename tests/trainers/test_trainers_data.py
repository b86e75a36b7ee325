"""Trainer data and configs: loading, tokenization with the prompt masked, truncation, padding, batch order."""
import json

import pytest

from fastalign.trainers import DPOConfig, PPOConfig
from fastalign.trainers.common import batch_indices
from fastalign.trainers.data import (collate_pairs, load_preference_data, load_prompts, load_ranked_data, pad,
                                     tokenize_pair)
from fastalign.trainers.kto import load_unpaired_data
from fastalign.trainers.tiny import char_tokenizer, word_tokenizer

WORDS = ["a", "b", "c", "d", "e", "x", "y"]


@pytest.fixture
def tok():
    return word_tokenizer(WORDS)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tokenize_pair_appends_eos_and_truncates(tok):
    record = {"prompt": "a b c d", "chosen": "x y x", "rejected": "y"}
    pair = tokenize_pair(tok, record, max_length=None, max_prompt_length=None)
    eos = tok.eos_token_id
    assert pair.prompt == ids(tok, "a b c d")
    assert pair.chosen == ids(tok, "x y x") + [eos] and pair.rejected == ids(tok, "y") + [eos]
    cut = tokenize_pair(tok, record, max_length=5, max_prompt_length=3)
    assert cut.prompt == ids(tok, "b c d")  # the prompt keeps its end
    assert cut.chosen == ids(tok, "x y")  # the response keeps its start, prompt + response <= max_length
    assert cut.rejected == ids(tok, "y") + [eos]
    no_prompt_limit = tokenize_pair(tok, record, max_length=3, max_prompt_length=None)
    assert no_prompt_limit.prompt == ids(tok, "c d") and no_prompt_limit.chosen == ids(tok, "x")


def test_collate_pairs_puts_chosen_first_and_masks_prompt_and_padding(tok):
    records = [{"prompt": "a b", "chosen": "x", "rejected": "y y y"},
               {"prompt": "c", "chosen": "x x", "rejected": "y"}]
    pairs = [tokenize_pair(tok, r, None, None) for r in records]
    batch = collate_pairs(pairs, tok.pad_token_id)
    x, y, a, b, c = (tok.convert_tokens_to_ids(w) for w in "xyabc")
    eos, pad_id = tok.eos_token_id, tok.pad_token_id
    assert batch["input_ids"].tolist() == [
        [a, b, x, eos, pad_id, pad_id], [c, x, x, eos, pad_id, pad_id],  # chosen of pair 0, 1
        [a, b, y, y, y, eos], [c, y, eos, pad_id, pad_id, pad_id]]  # rejected of pair 0, 1
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1],
                                                [1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, x, eos, -100, -100], [-100, x, x, eos, -100, -100],
                                        [-100, -100, y, y, y, eos], [-100, y, eos, -100, -100, -100]]


def test_collate_pairs_long_rejected_row():
    tok = char_tokenizer()
    pair = tokenize_pair(tok, {"prompt": "ab", "chosen": "c", "rejected": "def"}, None, None)
    batch = collate_pairs([pair], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 6)
    assert tok.decode(batch["input_ids"][1]) == "abdef<eos>"
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == "abc"


def test_pad_left_and_right():
    ids_, mask = pad([[1, 2, 3], [4]], 0, left=True)
    assert ids_.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids_, mask = pad([[1, 2, 3], [4]], 9)
    assert ids_.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_load_records_from_list_jsonl_and_dataset_like(tmp_path):
    records = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")

    class DatasetLike:
        def to_list(self):
            return records

    for source in (records, str(path), DatasetLike()):
        assert load_preference_data(source) == records
    assert load_prompts(["p1", {"prompt": "p2"}]) == ["p1", "p2"]


def test_load_records_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_dataset: no such file"):
        load_preference_data(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_preference_data(str(bad))
    with pytest.raises(ValueError, match="record 0: expected string fields"):
        load_preference_data([{"prompt": "p", "chosen": "c"}])
    with pytest.raises(ValueError, match="item 1: expected a string"):
        load_prompts(["p", {"text": "q"}])
    with pytest.raises(TypeError, match="expected a list of records"):
        load_prompts(42)


def test_blank_lines_and_empty_preferred_responses_are_named(tmp_path):
    """A blank JSONL line before a record and an empty preferred response: errors naming the file, the line and the
    field (blank lines at the end, and an empty rejected response, are fine)."""
    good = '{"prompt": "p", "chosen": "c", "rejected": "r"}\n'
    path = tmp_path / "pairs.jsonl"
    path.write_text(good + "\n  \n" + good)
    with pytest.raises(ValueError, match=rf"^train_dataset: {path} line 2 is blank \(expected one JSON record per "):
        load_preference_data(str(path))
    path.write_text(good + good.replace('"chosen": "c"', '"chosen": ""'))
    with pytest.raises(ValueError, match=rf"^train_dataset: {path} line 2: chosen: expected a non-empty preferred "
                                         r"response, got ''$"):
        load_preference_data(str(path))
    with pytest.raises(ValueError, match=r"^eval_dataset: record 0: chosen: expected a non-empty"):
        load_preference_data([{"prompt": "p", "chosen": "", "rejected": "r"}], "eval_dataset")
    assert load_preference_data([{"prompt": "p", "chosen": "c", "rejected": ""}])
    with pytest.raises(ValueError, match=r"^train_dataset: record 1: completions\[0\]: expected a non-empty"):
        load_ranked_data([{"prompt": "p", "completions": ["a", "b", ""]},
                          {"prompt": "p", "completions": ["", "b", "c"]}], 3)
    path.write_text('{"prompt": "p", "completion": "", "label": false}\n{"prompt": "p", "completion": "", '
                    '"label": true}\n')
    with pytest.raises(ValueError, match=rf"^train_dataset: {path} line 2: completion: expected a non-empty"):
        load_unpaired_data(str(path))
    with pytest.raises(ValueError, match=r"^train_dataset: record 0: chosen: expected a non-empty"):  # KTO, paired
        load_unpaired_data([{"prompt": "p", "chosen": "", "rejected": "r"}])


def test_batch_order_walks_a_permutation_per_epoch_and_depends_on_step_only():
    n, size = 10, 3  # 3 batches per epoch, the 10th item is dropped
    epoch0 = [batch_indices(n, size, step, seed=7) for step in range(3)]
    flat = sum(epoch0, [])
    assert len(set(flat)) == 9 and all(0 <= i < n for i in flat)
    assert batch_indices(n, size, 1, seed=7) == epoch0[1]  # same step, same batch
    assert sum((batch_indices(n, size, step, seed=7) for step in range(3, 6)), []) != flat  # a new permutation


@pytest.mark.parametrize("cls, field, value, error, match", [
    (DPOConfig, "beta", -1.0, ValueError, "DPOConfig.beta: expected a positive number"),
    (DPOConfig, "beta", "big", TypeError, "DPOConfig.beta: expected float"),
    (DPOConfig, "loss_type", "kto", ValueError, "DPOConfig.loss_type: expected names from"),
    (DPOConfig, "label_smoothing", 0.2, ValueError, "DPOConfig.label_smoothing"),  # not for hinge
    (DPOConfig, "max_prompt_length", 2048, ValueError, "less than max_length"),
    (DPOConfig, "loss_backend", "triton", ValueError, "DPOConfig.loss_backend: expected one of"),
    (DPOConfig, "per_device_train_batch_size", 0, ValueError, "an int >= 1"),
    (DPOConfig, "lr_scheduler_type", "step", ValueError, "lr_scheduler_type"),
    (PPOConfig, "kl_estimator", "k4", ValueError, "PPOConfig.kl_estimator"),
    (PPOConfig, "lam", 1.5, ValueError, "PPOConfig.lam"),
    (PPOConfig, "num_mini_batches", 1.5, TypeError, "PPOConfig.num_mini_batches: expected int"),
    (PPOConfig, "missing_eos_penalty", "1", TypeError, "float or None"),
])
def test_config_errors_name_the_field(cls, field, value, error, match):
    extra = {"loss_type": "hinge"} if field == "label_smoothing" else {}
    with pytest.raises(error, match=match):
        cls(**{field: value, **extra})


def test_config_defaults_are_trl_like():
    dpo, ppo = DPOConfig(), PPOConfig()
    assert (dpo.beta, dpo.loss_type, dpo.learning_rate, dpo.max_grad_norm) == (0.1, "sigmoid", 1e-6, 1.0)
    assert (ppo.kl_coef, ppo.kl_estimator, ppo.gamma, ppo.lam, ppo.cliprange, ppo.cliprange_value, ppo.vf_coef,
            ppo.num_ppo_epochs) == (0.05, "k1", 1.0, 0.95, 0.2, 0.2, 0.1, 4)
    assert ppo.loss_config.kl_coef == 0  # the KL penalty goes into the rewards
