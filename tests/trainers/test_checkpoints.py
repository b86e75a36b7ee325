"""Checkpoints: written aside and renamed when complete, resume from the newest complete one (a run SIGKILLed at
random points of its saves resumes exactly), broken ones named, Python's random stream restored, fresh runs refused
in an earlier run's directory, resumes refused under another config."""
import builtins
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
import warnings

import pytest
import torch
import transformers.modeling_utils
from safetensors import torch as safetensors_torch

from fastalign import hf
from fastalign.trainers import DPOConfig, DPOTrainer, common
from fastalign.trainers.config_file import load_model_and_tokenizer
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import tiny_llama, word_tokenizer
from helpers.noise import recorded_calls

TASK = CountingTask()

pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(output_dir, **overrides):
    """A DPO run of 4 steps on a tiny Llama, a checkpoint after every step."""
    tokenizer = word_tokenizer(TASK.words)
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64)
    fields = dict(output_dir=str(output_dir), learning_rate=3e-3, per_device_train_batch_size=4, max_steps=4,
                  save_steps=1, disable_tqdm=True, max_length=32, max_prompt_length=16)
    return DPOTrainer(model, tokenizer, TASK.preference_data(24, seed=1), DPOConfig(**{**fields, **overrides}))


def read_jsonl(path):
    with open(path) as lines:
        return [json.loads(line) for line in lines]


def assert_same_weights(a, b):
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key


# --- killed while saving -----------------------------------------------------------------------------------------

class SaveEvents:
    """Counts the file operations of the saves (the checkpoint of ``trainer.step``): each open for writing, rename
    and rmtree (before it happens), and each whole-file write (``torch.save``, safetensors) twice: before it, and
    cut off half-way (the file written, then truncated to half its size). With ``kill_at`` the process SIGKILLs
    itself at that event of the save at step ``kill_step``."""

    def __init__(self, monkeypatch, kill_step=None, kill_at=None):
        self.events: dict[int, list[str]] = {}
        self.step, self.kill_step, self.kill_at = None, kill_step, kill_at
        save = common.Trainer.save_checkpoint

        def save_checkpoint(trainer):
            self.step = trainer.step
            self.events[self.step] = []
            try:
                directory = save(trainer)
                if self.event("saved"):  # killed just after the save
                    self.kill()
                return directory
            finally:
                self.step = None

        monkeypatch.setattr(common.Trainer, "save_checkpoint", save_checkpoint)
        for owner, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree")):
            monkeypatch.setattr(owner, name, self.before(getattr(owner, name), name))
        original_open = builtins.open

        def open_file(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax") and self.event(f"open {os.path.basename(str(file))}"):
                self.kill()
            return original_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_file)
        for owner, name, path_arg in ((torch, "save", 1), (transformers.modeling_utils, "safe_save_file", 1),
                                      (safetensors_torch, "save_file", 1), (hf, "save_file", 1)):
            monkeypatch.setattr(owner, name, self.whole_file(getattr(owner, name), name, path_arg))

    def event(self, what: str) -> bool:
        """Record ``what``; SIGKILL at the chosen event. True if this event is the kill (for cut-off writes)."""
        if self.step is None:
            return False
        self.events[self.step].append(what)
        return self.step == self.kill_step and len(self.events[self.step]) == self.kill_at

    def kill(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def before(self, function, name):
        def wrapped(*args, **kwargs):
            if self.event(name):
                self.kill()
            return function(*args, **kwargs)
        return wrapped

    def whole_file(self, function, name, path_arg):
        def wrapped(*args, **kwargs):
            if self.event(name):
                self.kill()
            cut = self.event(f"{name} cut off")
            out = function(*args, **kwargs)
            if cut:
                path = str(args[path_arg])
                os.truncate(path, os.path.getsize(path) // 2)
                self.kill()
            return out
        return wrapped


def killed_in_a_fork(output_dir, monkeypatch, kill_step, kill_at) -> None:
    """Train in a forked child that SIGKILLs itself at event ``kill_at`` of its save at ``kill_step``."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            SaveEvents(monkeypatch, kill_step, kill_at)
            make_trainer(output_dir).train()
            code = 3  # not killed
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + 120  # a child stuck (e.g. on a lock another thread held at the fork) fails
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the training child did not end in 120 s (kill at {kill_at} of save {kill_step})")
        time.sleep(0.02)
    status = done[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.slow
def test_killed_at_random_points_of_its_saves_a_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    """20 runs SIGKILLed at a random file operation of a random save (steps 2-4): each resume (output_dir, the
    newest complete checkpoint) takes the checkpoint of the killed save if its rename happened, else the previous
    one (saying why it skipped the cut-off one), and ends bitwise equal to the uninterrupted run (weights and
    metrics)."""
    with monkeypatch.context() as patches:
        counted = SaveEvents(patches)
        full = make_trainer(tmp_path / "full")
        full.train()
    events = counted.events
    assert sorted(events) == [1, 2, 3, 4] and all(events[s] == events[1] for s in events)
    renamed = events[1].index("rename") + 1  # the events up to this one leave only checkpoint-<step>.tmp
    assert events[1][-2:] == ["rename", "saved"] and {"save cut off", "safe_save_file cut off"} <= {*events[1]}
    rng = random.Random(0)
    resumed_from = set()
    for trial in range(20):
        step, kill_at = rng.choice([2, 3, 4]), rng.randint(1, len(events[1]))
        output_dir = tmp_path / f"run{trial}"
        killed_in_a_fork(output_dir, monkeypatch, step, kill_at)
        cut_off = os.path.isdir(output_dir / f"checkpoint-{step}.tmp")
        resumed = make_trainer(output_dir)
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed.train(resume_from_checkpoint=True)
        start = step if kill_at > renamed else step - 1
        assert f"resuming from {output_dir / f'checkpoint-{start}'} (step {start})" in capsys.readouterr().err
        skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
        assert cut_off == (start < step), (step, kill_at)  # the rename is the one step from .tmp to complete
        assert len(skipped) == cut_off and all(f"checkpoint-{step}.tmp (a save cut off" in s for s in skipped)
        assert_same_weights(resumed.model, full.model)
        assert read_jsonl(output_dir / "metrics.jsonl") == full.history
        assert sorted(os.listdir(output_dir))[:4] == [f"checkpoint-{s}" for s in range(1, 5)]
        resumed_from.add(start < step)
    assert resumed_from == {True, False}  # both cases met


# --- broken checkpoints ------------------------------------------------------------------------------------------

def test_a_checkpoint_is_complete_with_its_manifest(tmp_path):
    trainer = make_trainer(tmp_path / "run", max_steps=2)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "run"))
    listed = json.loads((checkpoint / common.MANIFEST_FILE).read_text())["files"]
    assert set(listed) == set(os.listdir(checkpoint)) - {common.MANIFEST_FILE}
    assert {common.STATE_FILE, common.CONFIG_FILE, "model.safetensors", "config.json"} <= set(listed)
    assert all(os.path.getsize(checkpoint / name) == size for name, size in listed.items())
    assert common.checkpoint_problem(str(checkpoint)) is None


def test_a_broken_checkpoint_is_named_and_skipped(tmp_path):
    """A cut-off trainer_state.pt: named by hand, a one-line error naming the file; resuming the newest, a warning
    naming it and the previous checkpoint taken."""
    run = tmp_path / "run"
    make_trainer(run, max_steps=3).train()
    state = run / "checkpoint-3" / common.STATE_FILE
    os.truncate(state, os.path.getsize(state) // 2)
    with pytest.raises(ValueError, match=rf"^resume_from_checkpoint: {run / 'checkpoint-3'} is not a complete "
                                         rf"checkpoint: {state} has \d+ bytes, the manifest says \d+$"):
        make_trainer(run, max_steps=3).train(resume_from_checkpoint=str(run / "checkpoint-3"))
    # the manifest agrees but the file is corrupt: the file named, one line
    (run / "checkpoint-3" / common.MANIFEST_FILE).unlink()
    common.write_manifest(str(run / "checkpoint-3"))
    with pytest.raises(ValueError, match=rf"^resume_from_checkpoint: cannot read {state}: [^\n]*$"):
        make_trainer(run, max_steps=3).train(resume_from_checkpoint=str(run / "checkpoint-3"))
    os.remove(run / "checkpoint-3" / common.MANIFEST_FILE)
    resumed = make_trainer(run, max_steps=3)
    with pytest.warns(RuntimeWarning, match=rf"skipped {run / 'checkpoint-3'} \(no .*manifest.json \(the save did "
                                            r"not complete\)\)"):
        resumed.train(resume_from_checkpoint=True)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


# --- random streams ----------------------------------------------------------------------------------------------

def test_resume_restores_pythons_random_stream(tmp_path, monkeypatch):
    """A collator or callback drawing from ``random`` draws after a resume what the uninterrupted run drew."""
    draws, crash_at = [], []
    compute_loss = DPOTrainer.compute_loss

    def drawing(self, *args, **kwargs):
        if self.step in crash_at:
            raise KeyboardInterrupt("killed")
        draws.append((self.step, random.random()))
        return compute_loss(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "compute_loss", drawing)
    make_trainer(tmp_path / "full").train()
    full = list(draws)
    crash_at.append(2)  # after the checkpoint of step 2
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "run").train()
    crash_at.clear()
    random.seed(1234)  # what the process drew in between does not matter
    draws.clear()
    make_trainer(tmp_path / "run").train(resume_from_checkpoint=True)
    assert draws == full[2:] and len(draws) == 2


# --- fresh starts and config changes -----------------------------------------------------------------------------

def test_a_fresh_run_refuses_an_earlier_runs_directory(tmp_path):
    run = tmp_path / "run"
    make_trainer(run, max_steps=3).train()
    with recorded_calls("token_logprobs") as forwards, pytest.raises(
            ValueError, match=r"DPOConfig.output_dir: expected a directory without an earlier run, got .* holding "
                              r"checkpoint-1, checkpoint-2, checkpoint-3 and 1 more; set overwrite_output_dir"):
        make_trainer(run, max_steps=2, learning_rate=1e-3).train()
    assert not forwards  # refused before the reference log-probs
    fresh = make_trainer(run, max_steps=2, learning_rate=1e-3, overwrite_output_dir=True)
    fresh.train()
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert_same_weights(fresh.model, hf.load_pretrained(str(run / "checkpoint-2")))


def test_an_output_dir_that_is_a_file_fails_at_once(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="DPOConfig.output_dir: expected a directory .*, not a file"):
        DPOConfig(output_dir=str(path))


def test_a_resume_under_another_config_is_refused_with_the_fields_named(tmp_path):
    run = tmp_path / "run"
    make_trainer(run, max_steps=2).train()
    with pytest.raises(ValueError, match=r"checkpoint-2 was trained with another config: learning_rate=0.003 "
                                         r"\(this run: 0.001\), beta=0.1 \(this run: 0.2\); resume with"):
        make_trainer(run, max_steps=2, learning_rate=1e-3, beta=0.2).train(resume_from_checkpoint=True)
    # where and how often it writes may change
    make_trainer(run, max_steps=2, logging_steps=2, save_steps=0).train(resume_from_checkpoint=True)


def test_the_seed_governs_a_tiny_model_from_a_config_file():
    def weights(seed):
        return load_model_and_tokenizer({"model": "tiny"}, "x.yaml", seed=seed)[0].state_dict()

    torch.manual_seed(5)
    a = weights(42)
    torch.manual_seed(6)
    b, c = weights(42), weights(43)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
