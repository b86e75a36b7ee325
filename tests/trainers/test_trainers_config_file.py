"""`fastalign dpo|ppo|reward --config FILE.yaml`: the example files run, mistakes get clear errors (CLI smoke tests)."""
import json
import os

import pytest
import yaml

from fastalign.trainers import DPOConfig
from fastalign.trainers.config_file import DESCRIPTIONS, ConfigError, example_config, run_from_config, trainer_config
from helpers.trainers import command, write_config


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_examples_run_dpo_then_ppo_from_its_output(tmp_path, capsys):
    assert command("dpo", "--config", write_config(tmp_path, "dpo")) == 0
    assert "3 steps done" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "dpo" / "model.safetensors")
    ppo = write_config(tmp_path, "ppo", model=str(tmp_path / "dpo"))
    assert command("ppo", "--config", ppo) == 0
    records = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert [r["step"] for r in records if "objective/scores" in r] == [1, 2, 3]
    assert "eval_objective/scores" in records[-1]
    assert os.path.isfile(tmp_path / "ppo" / "value_head.safetensors")


def test_the_grpo_example_runs_with_several_rewards(tmp_path, capsys, monkeypatch):
    assert command("grpo", "--example") == 0
    example = yaml.safe_load(capsys.readouterr().out)
    assert example["reward"] == "counting" and example["config"]["loss_type"] == "dapo"
    (tmp_path / "grpo_rewards.py").write_text("def length(prompts, completions):\n"
                                              "    return [len(c.split()) / 6 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = write_config(tmp_path, "grpo", model="tiny", tokenizer="counting",
                        reward=["counting", "grpo_rewards:length"],
                        config={"per_device_train_batch_size": 16, "reward_weights": [1.0, 0.5], "num_iterations": 2,
                                "beta": 0.1})
    assert command("grpo", "--config", spec) == 0
    assert "3 steps done" in capsys.readouterr().out
    records = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    train = [r for r in records if "reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in records if "eval_reward" in r] == [3]
    assert {"rewards/score/mean", "rewards/length/mean", "kl", "entropy", "clip_ratio/region_mean"} <= train[-1].keys()
    assert os.path.isfile(tmp_path / "grpo" / "model.safetensors")
    with pytest.raises(ConfigError, match="give reward"):
        run_from_config("grpo", write_config(tmp_path, "grpo", reward=None))


def test_the_reward_example_trains_a_reward_model_that_ppo_loads(tmp_path, capsys):
    """``fastalign reward`` (tiny model with a score head, the counting pairs), then ``fastalign ppo`` scoring with
    the saved reward model (``reward_model:``)."""
    assert command("reward", "--config", write_config(tmp_path, "reward")) == 0
    out = capsys.readouterr().out
    assert "3 steps done" in out and "eval_accuracy" in out  # evaluated at the end
    ppo = write_config(tmp_path, "ppo", model="tiny", tokenizer="counting", reward=None,
                       reward_model=str(tmp_path / "reward"))
    trainer = run_from_config("ppo", ppo)
    assert type(trainer.reward_fn).__name__ == "LlamaForSequenceClassification"
    assert trainer.step == 3


def test_user_files_char_tokenizer_and_an_imported_reward(tmp_path, monkeypatch):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no"}) + "\n"
                             for i in range(8)))
    spec = write_config(tmp_path, "dpo", tokenizer="char", train_file=str(train), eval_file=None,
                        tiny={"hidden_size": 32, "intermediate_size": 64}, config={"per_device_train_batch_size": 4})
    trainer = run_from_config("dpo", spec)
    assert trainer.step == 3 and trainer.model.config.hidden_size == 32 and len(trainer.tokenizer) == 100
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(f"Q{i}?") + "\n" for i in range(8)))
    (tmp_path / "my_rewards.py").write_text("def length(prompts, completions):\n"
                                            "    return [len(c) / 10 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = write_config(tmp_path, "ppo", model="tiny", tokenizer="char", prompts_file=str(prompts), eval_file=None,
                        reward="my_rewards:length",
                        config={"per_device_train_batch_size": 4, "missing_eos_penalty": None})
    trainer = run_from_config("ppo", spec)
    assert trainer.step == 3
    for r in trainer.history:  # characters of the completion / 10: at most the tokens of the response / 10
        assert 0 < r["objective/scores"] <= r["completions/mean_length"] / 10 + 1e-6


@pytest.mark.parametrize("changes, error, match", [
    ({"train_file": "nowhere.jsonl"}, FileNotFoundError, "train_dataset: no such file: nowhere.jsonl"),
    ({"model": "no/such/model"}, FileNotFoundError, "model: no such directory: no/such/model"),
    ({"trian_file": "x.jsonl"}, ConfigError, "unknown field 'trian_file'; did you mean 'train_file'"),
    ({"train_file": "builtin:sorting"}, ConfigError, "unknown built-in data 'builtin:sorting'"),
    ({"train_file": None}, ConfigError, "missing field 'train_file'"),
    ({"tiny": {"hidden_sise": 8}}, ConfigError, "did you mean 'hidden_size'"),
    ({"config": {"learning_rat": 0.1}}, ConfigError, "config: unknown field 'learning_rat'; did you mean "
                                                     "'learning_rate'"),
    ({"config": {"beta": "strong"}}, ConfigError, "DPOConfig.beta: expected float, got 'strong'"),
    ({"config": {"loss_type": "kto"}}, ConfigError, "DPOConfig.loss_type: expected names from"),
])
def test_mistakes_get_errors_that_say_what_to_fix(tmp_path, changes, error, match):
    with pytest.raises(error, match=match):
        run_from_config("dpo", write_config(tmp_path, "dpo", **changes))


def test_ppo_reward_mistakes(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of reward"):
        run_from_config("ppo", write_config(tmp_path, "ppo", reward=None))
    with pytest.raises(ConfigError, match="cannot import 'nomodule:score'"):
        run_from_config("ppo", write_config(tmp_path, "ppo", reward="nomodule:score", model="tiny"))


def test_command_exit_status_and_messages(tmp_path, capsys):
    assert command("dpo", "--config", str(tmp_path / "missing.yaml")) == 2
    assert "fastalign dpo: error: config: no such file" in capsys.readouterr().err
    assert command("ppo") == 2
    assert "--config FILE.yaml is required (try --example" in capsys.readouterr().err
    small = write_config(tmp_path, "dpo", config={"per_device_train_batch_size": 5000})
    assert command("dpo", "--config", small) == 2
    assert "less than one batch of 5000" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [tiny\n")
    assert command("dpo", "--config", str(bad)) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert command("ppo", "--example") == 0
    assert yaml.safe_load(capsys.readouterr().out)["reward"] == "counting"


def test_help_and_numbers_written_as_yaml_strings():
    for kind in ("dpo", "ppo", "grpo", "reward"):
        assert f"fastalign {kind} --example > {kind}.yaml" in DESCRIPTIONS[kind]
        assert example_config(kind) in DESCRIPTIONS[kind]
    # YAML reads 1e-3 (no dot) as a string; the field is a float, so it is converted
    assert trainer_config(DPOConfig, yaml.safe_load("learning_rate: 1e-3"), "f.yaml").learning_rate == 1e-3
