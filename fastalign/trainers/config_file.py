"""``fastalign sft|distill|dpo|kto|ppo|grpo|rloo|reward --config FILE.yaml``: the trainers from a YAML file.

The file names a model, a tokenizer, data files (and for PPO and GRPO rewards) and, under ``config:``, the fields
of the trainer's config (:class:`DPOConfig`, :class:`PPOConfig`, :class:`RewardConfig`...). ``example_config(kind)``
is a commented example that runs as is (tiny model, built-in data).
Mistakes (a missing file, an unknown or ill-typed field) raise :class:`ConfigError` or ``FileNotFoundError`` with a
message that says what to fix.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import typing
from dataclasses import fields

import torch

from . import distributed
from .distill import DistillationConfig, DistillationTrainer
from .dpo import DPOConfig, DPOTrainer
from .grpo import GRPOConfig, GRPOTrainer
from .kto import KTOConfig, KTOTrainer
from .ppo import PPOConfig, PPOTrainer
from .reward import RewardConfig, RewardTrainer
from .rloo import RLOOConfig, RLOOTrainer
from .sft import SFTConfig, SFTTrainer
from .tasks import CountingTask

BUILTIN = "builtin:"
BUILTIN_DATA = ("counting", "counting-heldout")
TOKENIZERS = ("char", "counting")


class ConfigError(ValueError):
    """A config file that cannot be run as written."""


EXAMPLES = {
    "sft": """\
# fastalign sft --config sft.yaml      (relative paths are relative to the current directory)
model: tiny                 # "tiny": a tiny Llama built in code (random init), or a transformers model directory
tokenizer: counting         # "char", "counting" (the built-in task's words), or a tokenizer directory
train_file: builtin:counting            # JSONL, one {"prompt": .., "completion": ..} per line (or {"text": ..},
                                        # or {"messages": [...]} with the tokenizer's chat template)
eval_file: builtin:counting-heldout     # optional, same format
config:                     # SFTConfig fields, TRL's names (see `pydoc fastalign.trainers.SFTConfig`)
  output_dir: fastalign-sft
  max_steps: 100
  learning_rate: 3.0e-3
  warmup_ratio: 0.1
  per_device_train_batch_size: 16
  completion_only_loss: true            # train on the completion only (null: on for prompt-completion data)
  loss_type: nll            # nll or dft
  label_smoothing_factor: 0.0
  padding_free: false       # pack each batch into one row without padding (packing: the same here)
  max_length: 64
  eval_steps: 50
  loss_backend: fused       # fused (no logits) or reference (materialized logits, for comparison)
""",
    "distill": """\
# fastalign distill --config distill.yaml    (relative paths are relative to the current directory)
model: tiny                 # the student: "tiny" (a tiny Llama built in code), or a transformers model directory
tiny: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1}  # a student narrower than the teacher
tokenizer: counting         # the teacher's vocabulary: "char", "counting", or a tokenizer directory
prompts_file: builtin:counting          # JSONL, one {"prompt": ..} (or a JSON string) per line
eval_file: builtin:counting-heldout     # optional prompts, scored by reward every eval_steps and at the end
reward: counting            # for eval_file only: "counting" or "package.module:function"
config:                     # DistillationConfig fields, TRL's names (pydoc fastalign.trainers.DistillationConfig)
  teacher_model_name_or_path: fastalign-sft     # the teacher: here the output of the sft example
  output_dir: fastalign-distill
  max_steps: 60
  learning_rate: 3.0e-3
  per_device_train_batch_size: 32
  max_completion_length: 6
  beta: 0.5                 # 0 forward KL, 1 reverse KL, else the generalized JSD
  temperature: 1.0
  eval_steps: 20
  loss_backend: fused       # fused (no logits of either model) or reference (materialized logits)
""",
    "dpo": """\
# fastalign dpo --config dpo.yaml      (relative paths are relative to the current directory)
model: tiny                 # "tiny": a tiny Llama built in code (random init), or a transformers model directory
# tiny: {hidden_size: 64, num_hidden_layers: 2}   # LlamaConfig fields for model: tiny
tokenizer: counting         # "char" (one token per character), "counting" (the built-in task's words), or a
                            # tokenizer directory; default: the model directory, or "char" for model: tiny
train_file: builtin:counting            # JSONL, one {"prompt": .., "chosen": .., "rejected": ..} per line
eval_file: builtin:counting-heldout     # optional, same format
config:                     # DPOConfig fields, TRL's names (see `pydoc fastalign.trainers.DPOConfig`)
  output_dir: fastalign-dpo
  max_steps: 120
  learning_rate: 3.0e-3
  warmup_ratio: 0.1
  per_device_train_batch_size: 16
  beta: 0.1
  loss_type: sigmoid        # sigmoid, robust, hinge, ipo, sppo_hard, nca_pair, apo_zero, apo_down
  rpo_alpha: 1.0            # adds the NLL of the chosen answers (RPO); null for plain DPO
  max_length: 64
  max_prompt_length: 32
  eval_steps: 40
  loss_backend: fused       # fused (no logits) or reference (materialized logits, for comparison)
  parallelism: ddp          # under torchrun with several processes: ddp (replicas) or fsdp (FSDP2 sharding)
""",
    "kto": """\
# fastalign kto --config kto.yaml      (relative paths are relative to the current directory)
model: tiny                 # "tiny": a tiny Llama built in code (random init), or a transformers model directory
                            # (KTO works best from a supervised model: e.g. the dpo example's output)
tokenizer: counting         # "char", "counting" (the built-in task's words), or a tokenizer directory
train_file: builtin:counting            # JSONL, one {"prompt": .., "completion": .., "label": true|false} per line
                                        # (or preference pairs {"prompt", "chosen", "rejected"}: unpaired)
eval_file: builtin:counting-heldout     # optional, same format
config:                     # KTOConfig fields, TRL's names (see `pydoc fastalign.trainers.KTOConfig`)
  output_dir: fastalign-kto
  max_steps: 120
  learning_rate: 1.0e-3
  warmup_ratio: 0.1
  per_device_train_batch_size: 16     # >= 2 for loss_type kto: the KL pairs come from the same batch
  beta: 0.5
  loss_type: kto            # kto or apo_zero_unpaired
  desirable_weight: 1.33    # KTO paper Eq. 8: desirable_weight * n_desirable / (undesirable_weight *
  undesirable_weight: 1.0   # n_undesirable) in [1, 4/3]
  max_length: 64
  max_prompt_length: 32
  eval_steps: 40
  loss_backend: fused       # fused (no logits) or reference (materialized logits, for comparison)
  parallelism: ddp          # under torchrun with several processes: ddp (replicas) or fsdp (FSDP2 sharding)
""",
    "ppo": """\
# fastalign ppo --config ppo.yaml      (relative paths are relative to the current directory)
model: fastalign-dpo        # a transformers model directory (here: the output of the dpo example), or "tiny"
# tokenizer: path/to/tokenizer          # default: the model directory, or "char" for model: tiny
prompts_file: builtin:counting          # JSONL, one {"prompt": ..} (or a JSON string) per line
eval_file: builtin:counting-heldout     # optional prompts, scored every eval_steps and at the end
reward: counting            # "counting" (the built-in task's rule), or "package.module:function" taking
                            # (prompts, completions) and returning a list of floats
# reward_model: fastalign-reward        # instead of reward: a sequence-classification model directory (here:
                                        # the output of the reward example)
config:                     # PPOConfig fields, TRL's names (see `pydoc fastalign.trainers.PPOConfig`)
  output_dir: fastalign-ppo
  max_steps: 100
  learning_rate: 3.0e-4
  per_device_train_batch_size: 32
  num_ppo_epochs: 4
  response_length: 6
  temperature: 1.0
  missing_eos_penalty: 1.0
  kl_coef: 0.05
  eval_steps: 25
  loss_backend: fused
""",
    "grpo": """\
# fastalign grpo --config grpo.yaml    (relative paths are relative to the current directory)
model: fastalign-dpo        # a transformers model directory (here: the output of the dpo example), or "tiny"
# tokenizer: path/to/tokenizer          # default: the model directory, or "char" for model: tiny
prompts_file: builtin:counting          # JSONL, one {"prompt": ..} (or a JSON string) per line
eval_file: builtin:counting-heldout     # optional prompts, mean reward every eval_steps and at the end
reward: counting            # "counting" (the built-in task's rule), "package.module:function" taking
                            # (prompts, completions) and returning a list of floats (or None: not applicable),
                            # or a list of them (weighted by reward_weights under config:)
# reward_model: path/to/reward-model    # sequence-classification model directory (or a list), with or without reward
config:                     # GRPOConfig fields, TRL's names (see `pydoc fastalign.trainers.GRPOConfig`)
  output_dir: fastalign-grpo
  max_steps: 60
  learning_rate: 1.0e-3
  per_device_train_batch_size: 64       # completions per process and micro-batch
  num_generations: 8        # completions per prompt: 8 prompts per step here
  max_completion_length: 6
  temperature: 1.0
  loss_type: dapo           # grpo, dapo, dr_grpo, bnpo, cispo, sapo, luspo, vespo
  importance_sampling_level: token      # or sequence (GSPO)
  scale_rewards: group      # group, batch or none
  beta: 0.0                 # KL to the reference model (created only when beta != 0)
  num_iterations: 1
  eval_steps: 20
  loss_backend: fused
""",
    "rloo": """\
# fastalign rloo --config rloo.yaml    (relative paths are relative to the current directory)
model: fastalign-dpo        # a transformers model directory (here: the output of the dpo example), or "tiny"
# tokenizer: path/to/tokenizer          # default: the model directory, or "char" for model: tiny
prompts_file: builtin:counting          # JSONL, one {"prompt": ..} (or a JSON string) per line
eval_file: builtin:counting-heldout     # optional prompts, mean reward every eval_steps and at the end
reward: counting            # "counting" (the built-in task's rule), "package.module:function" taking
                            # (prompts, completions) and returning a list of floats (or None: not applicable),
                            # or a list of them (weighted by reward_weights under config:)
# reward_model: path/to/reward-model    # sequence-classification model directory (or a list), with or without reward
config:                     # RLOOConfig fields, TRL's names (see `pydoc fastalign.trainers.RLOOConfig`)
  output_dir: fastalign-rloo
  max_steps: 60
  learning_rate: 1.0e-3
  per_device_train_batch_size: 64       # completions per process and micro-batch
  num_generations: 8        # completions per prompt (the leave-one-out baseline's group): 8 prompts per step here
  max_completion_length: 6
  temperature: 1.0
  beta: 0.05                # KL to the reference model, in the reward (the reference exists only when beta != 0)
  epsilon: 0.2              # clip range of the sequence ratio: [1 - epsilon, 1 + epsilon_high]
  epsilon_high: null        # null: epsilon
  normalize_advantages: false           # scale the step's advantages to mean 0, std 1
  reward_clip_range: null   # e.g. [0.0, 1.0]: clamp the summed reward
  num_iterations: 1
  eval_steps: 20
  loss_backend: fused
""",
    "reward": """\
# fastalign reward --config reward.yaml      (relative paths are relative to the current directory)
model: tiny                 # "tiny": a tiny Llama with a score head built in code (random init), or a directory
                            # of a transformers sequence-classification model (num_labels: 1)
# tiny: {hidden_size: 32, intermediate_size: 64}   # LlamaConfig fields for model: tiny
tokenizer: counting         # as for dpo; PPO or GRPO with this reward model need the policy's tokenizer
train_file: builtin:counting            # JSONL, one {"prompt": .., "chosen": .., "rejected": ..} per line, with an
                                        # optional number "margin"
eval_file: builtin:counting-heldout     # optional, same format
config:                     # RewardConfig fields, TRL's names (see `pydoc fastalign.trainers.RewardConfig`)
  output_dir: fastalign-reward
  max_steps: 300
  learning_rate: 3.0e-3
  lr_scheduler_type: cosine
  warmup_ratio: 0.1
  per_device_train_batch_size: 32
  max_length: 64            # longer pairs are dropped (as TRL)
  center_rewards_coefficient: null      # e.g. 0.01 to keep rewards centered on 0
  eval_steps: 100
  gradient_checkpointing: false         # recompute the layers' activations in the backward (long sequences)
  bf16: false               # bf16 mixed precision (CUDA, or CPU autocast); fp16: CUDA only
""",
}

HELP = {
    "sft": "supervised fine-tuning from a YAML config file (model, data files, SFTConfig fields)",
    "distill": "on-policy distillation of a teacher into a student from a YAML config file (models, prompts, "
               "DistillationConfig fields)",
    "dpo": "train a model with DPO from a YAML config file (model, data files, DPOConfig fields)",
    "ppo": "train a model with PPO from a YAML config file (model, prompts, reward, PPOConfig fields)",
    "grpo": "train a model with GRPO from a YAML config file (model, prompts, rewards, GRPOConfig fields)",
    "rloo": "train a model with RLOO from a YAML config file (model, prompts, rewards, RLOOConfig fields)",
    "kto": "train a model with KTO from a YAML config file (model, unpaired data files, KTOConfig fields)",
    "reward": "train a reward model on preference pairs from a YAML config file (model, data files, RewardConfig "
              "fields)",
}
KINDS = tuple(HELP)

DESCRIPTIONS = {
    kind: f"""{HELP[kind][0].upper()}{HELP[kind][1:]}.

Start from the example, which runs as is on a CPU (nothing is downloaded):

  fastalign {kind} --example > {kind}.yaml
  fastalign {kind} --config {kind}.yaml

Progress shows on a bar; metrics (TRL's names) go to OUTPUT_DIR/metrics.jsonl, checkpoints to
OUTPUT_DIR/checkpoint-N every save_steps (each complete or absent: written aside, then renamed), the final model
to OUTPUT_DIR. Set resume_from_checkpoint: true (the newest complete checkpoint) or a checkpoint directory at the
top level of the file to resume a run exactly (its config must match the checkpoint's). A fresh run in an
OUTPUT_DIR with an earlier run's checkpoints or metrics is refused unless overwrite_output_dir: true (under
config:), which deletes them.

Several processes (DDP, or FSDP2 with parallelism: fsdp under config:), one node:

  torchrun --standalone --nproc_per_node=2 --no-python fastalign {kind} --config {kind}.yaml

The example file:

{EXAMPLES[kind]}"""
    for kind in KINDS
}

_KEYS = {
    "sft": ("model", "tiny", "tokenizer", "train_file", "eval_file", "config", "resume_from_checkpoint"),
    "distill": ("model", "tiny", "tokenizer", "prompts_file", "eval_file", "reward", "config",
                "resume_from_checkpoint"),
    "dpo": ("model", "tiny", "tokenizer", "train_file", "eval_file", "config", "resume_from_checkpoint"),
    "kto": ("model", "tiny", "tokenizer", "train_file", "eval_file", "config", "resume_from_checkpoint"),
    "ppo": ("model", "tiny", "tokenizer", "prompts_file", "eval_file", "reward", "reward_model", "config",
            "resume_from_checkpoint"),
    "grpo": ("model", "tiny", "tokenizer", "prompts_file", "eval_file", "reward", "reward_model", "config",
             "resume_from_checkpoint"),
    "rloo": ("model", "tiny", "tokenizer", "prompts_file", "eval_file", "reward", "reward_model", "config",
             "resume_from_checkpoint"),
    "reward": ("model", "tiny", "tokenizer", "train_file", "eval_file", "config", "resume_from_checkpoint"),
}


def example_config(kind: str) -> str:
    """A commented example config file for ``kind`` (one of ``KINDS``)."""
    return EXAMPLES[_check_kind(kind)]


def _check_kind(kind: str) -> str:
    if kind not in _KEYS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return kind


def _unknown(what: str, name: str, allowed) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{what}: unknown field {name!r}; {hint}expected one of {', '.join(allowed)}")


def read_config_file(kind: str, path: str) -> dict:
    """The YAML mapping in ``path``, its top-level keys checked against those ``kind`` takes."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: no such file: {path}")
    with open(path) as f:
        try:
            spec = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping of fields (model:, config:, ...), got {type(spec).__name__}")
    for key in spec:
        if key not in _KEYS[kind]:
            raise _unknown(path, str(key), _KEYS[kind])
    if "model" not in spec:
        raise ConfigError(f"{path}: missing field 'model' (\"tiny\" or a transformers model directory)")
    return spec


def trainer_config(cls, values, path: str):
    """``cls(**values)`` with names checked, numbers written as strings (YAML's ``1e-3``) converted, and errors
    naming the field."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: config: expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
    names = [f.name for f in fields(cls)]
    hints = typing.get_type_hints(cls)
    converted = {}
    for name, value in values.items():
        if name not in names:
            raise _unknown(f"{path}: config", str(name), names)
        if isinstance(value, str) and float in typing.get_args(hints[name]) + (hints[name],):
            try:
                value = float(value)
            except ValueError:
                pass
        converted[name] = value
    try:
        return cls(**converted)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path}: config: {error}") from None


def load_model_and_tokenizer(spec: dict, path: str, kind: str = "dpo", seed: int | None = None):
    """The model (``tiny`` or a directory; a sequence-classification model for ``kind="reward"``) and its
    tokenizer, as the file says. ``seed``: the torch seed set before building the model (``model: tiny``'s
    initialization; the config's ``seed``, so that it governs the whole run)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    from .. import hf
    from .tiny import char_tokenizer, tiny_llama, tiny_reward_model, word_tokenizer

    model_name = spec["model"]
    if model_name != "tiny" and not os.path.isdir(str(model_name)):
        raise FileNotFoundError(f"{path}: model: no such directory: {model_name} (or use model: tiny)")
    tokenizer_name = spec.get("tokenizer") or ("char" if model_name == "tiny" else model_name)
    if tokenizer_name == "char":
        tokenizer = char_tokenizer()
    elif tokenizer_name == "counting":
        tokenizer = word_tokenizer(CountingTask().words)
    elif os.path.isdir(str(tokenizer_name)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    else:
        raise FileNotFoundError(f"{path}: tokenizer: no such directory: {tokenizer_name} "
                                f"(or use one of {', '.join(TOKENIZERS)})")
    if seed is not None:
        torch.manual_seed(seed)
    if model_name != "tiny":
        if kind == "reward":
            return AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=1), tokenizer
        return hf.load_pretrained(model_name), tokenizer
    overrides = spec.get("tiny") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: tiny: expected a mapping of LlamaConfig fields, got {overrides!r}")
    known = list(LlamaConfig().to_dict())
    for name in overrides:
        if name not in known:
            raise _unknown(f"{path}: tiny", str(name), known)
    return (tiny_reward_model if kind == "reward" else tiny_llama)(tokenizer, **overrides), tokenizer


def load_data(spec: dict, key: str, path: str, kind: str):
    """A data file path, or the built-in counting data (``builtin:counting``, ``builtin:counting-heldout``)."""
    value = spec.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {key}: expected a file path or builtin:counting, got {value!r}")
    if not value.startswith(BUILTIN):
        return value
    name = value[len(BUILTIN):]
    if name not in BUILTIN_DATA:
        raise ConfigError(f"{path}: {key}: unknown built-in data {value!r}; expected one of "
                          f"{', '.join(BUILTIN + n for n in BUILTIN_DATA)}")
    task, heldout = CountingTask(), name.endswith("heldout")
    if kind == "sft":  # the right answers
        return [{"prompt": r["prompt"], "completion": r["chosen"]}
                for r in task.preference_data(300 if heldout else 4000, seed=2 if heldout else 1, heldout=heldout)]
    if kind in ("dpo", "kto", "reward"):  # KTO unpairs the preference records
        return task.preference_data(300 if heldout else 4000, seed=2 if heldout else 1, heldout=heldout)
    return task.prompts(256 if heldout else 4000, seed=2 if heldout else 1, heldout=heldout)


def load_reward(spec: dict, path: str, several: bool = False):
    """The reward function (``counting`` or ``module:function``) or the reward model (a directory) the file names;
    ``several`` (GRPO, RLOO): the list of every ``reward`` and ``reward_model`` (each a string or a list of them)."""
    named = {key: spec.get(key) for key in ("reward", "reward_model")}
    lists = {key: [] if v is None else v if several and isinstance(v, list) else [v] for key, v in named.items()}
    if several and not lists["reward"] + lists["reward_model"]:
        raise ConfigError(f"{path}: give reward (\"counting\", \"module:function\" or a list of them) or "
                          f"reward_model (a directory or a list of them)")
    if not several and (named["reward"] is None) == (named["reward_model"] is None):
        raise ConfigError(f"{path}: give exactly one of reward (\"counting\" or \"module:function\") and "
                          f"reward_model (a directory)")
    loaded = [_reward_function(r, path) for r in lists["reward"]] + [_reward_model(m, path)
                                                                      for m in lists["reward_model"]]
    return loaded if several else loaded[0]


def _reward_model(directory, path: str):
    from transformers import AutoModelForSequenceClassification

    if not os.path.isdir(str(directory)):
        raise FileNotFoundError(f"{path}: reward_model: no such directory: {directory}")
    return AutoModelForSequenceClassification.from_pretrained(directory).eval()


def _reward_function(reward, path: str):
    if reward == "counting":
        return CountingTask().score
    module_name, _, function = str(reward).partition(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{path}: reward: cannot import {reward!r} (expected \"counting\" or "
                          f"\"package.module:function\"): {error}") from None


def run_from_config(kind: str, path: str) -> (SFTTrainer | DistillationTrainer | DPOTrainer | KTOTrainer
                                              | PPOTrainer | GRPOTrainer | RewardTrainer):
    """Build the trainer ``path`` describes (``kind``: one of ``KINDS``), train, and return it (its
    ``history`` holds the logged records, the final model is in its ``config.output_dir``)."""
    spec = read_config_file(_check_kind(kind), path)
    if kind in ("sft", "dpo", "kto", "reward"):
        config_class, trainer_class = {"sft": (SFTConfig, SFTTrainer), "dpo": (DPOConfig, DPOTrainer),
                                       "kto": (KTOConfig, KTOTrainer),
                                       "reward": (RewardConfig, RewardTrainer)}[kind]
        config = trainer_config(config_class, spec.get("config"), path)
        train = load_data(spec, "train_file", path, kind)
        if train is None:
            raise ConfigError(f"{path}: missing field 'train_file' (a JSONL file or builtin:counting)")
        model, tokenizer = load_model_and_tokenizer(spec, path, kind, seed=config.seed)
        trainer = trainer_class(model, tokenizer, train, config,
                                eval_dataset=load_data(spec, "eval_file", path, kind))
    elif kind == "distill":
        config = trainer_config(DistillationConfig, spec.get("config"), path)
        prompts = load_data(spec, "prompts_file", path, kind)
        if prompts is None:
            raise ConfigError(f"{path}: missing field 'prompts_file' (a JSONL file or builtin:counting)")
        reward = None if spec.get("reward") is None else _reward_function(spec["reward"], path)
        model, tokenizer = load_model_and_tokenizer(spec, path)
        trainer = DistillationTrainer(model, tokenizer, prompts, None, config,
                                      eval_dataset=load_data(spec, "eval_file", path, kind), reward_fn=reward)
    else:
        config_class, trainer_class = {"ppo": (PPOConfig, PPOTrainer), "grpo": (GRPOConfig, GRPOTrainer),
                                       "rloo": (RLOOConfig, RLOOTrainer)}[kind]
        config = trainer_config(config_class, spec.get("config"), path)
        prompts = load_data(spec, "prompts_file", path, kind)
        if prompts is None:
            raise ConfigError(f"{path}: missing field 'prompts_file' (a JSONL file or builtin:counting)")
        reward = load_reward(spec, path, several=kind in ("grpo", "rloo"))
        model, tokenizer = load_model_and_tokenizer(spec, path, seed=config.seed)
        trainer = trainer_class(model, tokenizer, prompts, reward, config,
                                eval_dataset=load_data(spec, "eval_file", path, kind))
    trainer.train(resume_from_checkpoint=spec.get("resume_from_checkpoint"))
    return trainer


def add_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """The options of ``fastalign dpo|kto|ppo|grpo|rloo|reward``: ``--config FILE.yaml`` and ``--example``."""
    parser.add_argument("--config", metavar="FILE.yaml", help="the YAML config file to run")
    parser.add_argument("--example", action="store_true", help="print a commented example config file and exit")
    parser.set_defaults(config_kind=_check_kind(kind))


def run_command(args: argparse.Namespace) -> int:
    """Run ``fastalign dpo|kto|ppo|grpo|rloo|reward`` from parsed :func:`add_arguments` options; exit status 2 with a
    one-line message on a bad config file or bad data."""
    kind = args.config_kind
    if args.example:
        print(example_config(kind), end="")
        return 0
    if not args.config:
        print(f"fastalign {kind}: error: --config FILE.yaml is required (try --example for a starting point)",
              file=sys.stderr)
        return 2
    try:
        trainer = run_from_config(kind, args.config)
    except (ValueError, FileNotFoundError) as error:  # ConfigError, and data errors (which name the problem)
        print(f"fastalign {kind}: error: {error}", file=sys.stderr)
        return 2
    if distributed.is_main():
        shown = (*trainer.progress_metrics, *(f"eval_{k}" for k in trainer.progress_metrics),
                 getattr(trainer, "eval_metric", None))
        final = {k: round(v, 4) for r in trainer.history for k, v in r.items() if k in shown}
        out = trainer.config.output_dir
        print(f"fastalign {kind}: {trainer.step} steps done on {distributed.world_size()} process(es); last values "
              f"{final}\nmodel: {out}/, metrics: {os.path.join(out, 'metrics.jsonl')}")
    del trainer  # before the group goes: see distributed.shutdown
    distributed.shutdown()
    return 0
