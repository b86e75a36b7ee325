"""What the trainer tests share: the tiny model and task, configs, runs killed at a step, gradient capture, config
files and the CLI, scripted generation, unpaired KTO data."""
from __future__ import annotations

import argparse
import json
import random

import pytest
import torch
import yaml

from fastalign.trainers import DPOConfig, GRPOConfig, GRPOTrainer, PPOConfig
from fastalign.trainers.config_file import add_arguments, example_config, run_command
from fastalign.trainers.kto import unpair_preference_data
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import tiny_llama, word_tokenizer

TASK = CountingTask()


def tiny(seed=0):
    tokenizer = word_tokenizer(TASK.words)
    torch.manual_seed(seed)
    return tiny_llama(tokenizer, hidden_size=32, intermediate_size=64), tokenizer


def dpo_config(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path / "dpo"), learning_rate=3e-3, per_device_train_batch_size=8,
                  max_steps=4, disable_tqdm=True, max_length=32, max_prompt_length=16)
    return DPOConfig(**{**fields, **overrides})


def ppo_config(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path / "ppo"), learning_rate=1e-3, per_device_train_batch_size=8,
                  max_steps=3, disable_tqdm=True, response_length=6, temperature=1.0, num_ppo_epochs=2)
    return PPOConfig(**{**fields, **overrides})


def read_jsonl(path):
    with open(path) as lines:
        return [json.loads(line) for line in lines]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def capture_gradients(trainer):
    """Record the gradients at each optimizer step (before clipping)."""
    captured, step = [], trainer.optimizer_step

    def capture(finite):
        captured.append([p.grad.clone() for p in trainer.params])
        return step(finite)

    trainer.optimizer_step = capture
    return captured


def train_until_killed(trainer, method: str, step: int) -> None:
    """Train ``trainer``, killed (KeyboardInterrupt) when its ``method`` is called at ``step``, after the checkpoint
    saved at ``step``."""
    original = getattr(trainer, method)

    def crash(*args):
        if trainer.step == step:
            raise KeyboardInterrupt("killed")
        return original(*args)

    setattr(trainer, method, crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


def write_config(tmp_path, kind, config=(), **changes):
    """The example config of ``kind`` with top-level ``changes`` (None: drop the key), ``config`` field changes,
    and a short run into ``tmp_path``."""
    spec = yaml.safe_load(example_config(kind))
    spec["config"].update(output_dir=str(tmp_path / kind), max_steps=3, eval_steps=0, disable_tqdm=True,
                          **dict(config))
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def command(kind, *argv):
    parser = argparse.ArgumentParser(prog=f"fastalign {kind}")
    add_arguments(parser, kind)
    return run_command(parser.parse_args(list(argv)))


def scripted_generate(trainer, period: int | None = None):
    """A ``generate`` whose response to a prompt depends on that prompt only (1 to 4 words of the task's answer,
    reversed for some prompts, without EOS for others): rollouts then do not depend on how the prompts are split
    over ranks. ``period``: also on the row's index modulo ``period`` (the same on every rank when ``period``
    divides each rank's batch), so that the completions of one prompt differ."""
    tok, width = trainer.tokenizer, trainer.generation_config.max_new_tokens

    def generate(input_ids, attention_mask, **_):
        rows = []
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            prompt = ids[mask.bool()].tolist()
            key = sum(prompt) + (i % period if period else 0)
            words = TASK.answer(tok.decode(prompt))[:1 + key // 2 % 4]
            words = words[::-1] if key % 3 == 0 else words
            response = tok(" ".join(words), add_special_tokens=False)["input_ids"]
            response += [] if key % 4 == 0 else [tok.eos_token_id]
            rows.append((response + [tok.pad_token_id] * width)[:width])
        return torch.cat([input_ids, torch.tensor(rows)], 1)

    return generate


def make_trainer(tmp_path, reward_funcs=TASK.score, scripted=False, prompts=32, **overrides):
    tokenizer = word_tokenizer(TASK.words)
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64)
    fields = dict(output_dir=str(tmp_path / "grpo"), learning_rate=1e-3, per_device_train_batch_size=8,
                  num_generations=4, max_completion_length=6, max_steps=2, disable_tqdm=True) | overrides
    trainer = GRPOTrainer(model, tokenizer, TASK.prompts(prompts, seed=3), reward_funcs, GRPOConfig(**fields))
    if scripted:
        trainer.policy.generate = scripted_generate(trainer)
    return trainer


def length(prompts, completions):
    """A reward that varies from the start (the counting task's is 0 for a random model): the word count / 6."""
    return [len(c.split()) / 6 for c in completions]


def unpaired(n, seed):
    """``2n`` shuffled unpaired records: each pair's chosen answer (desirable) and rejected one, apart."""
    records = unpair_preference_data(TASK.preference_data(n, seed=seed))
    random.Random(seed).shuffle(records)
    return records
