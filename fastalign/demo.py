"""``fastalign demo``: SFT, DPO, a reward model, PPO, GRPO, then on-policy distillation, on a tiny Llama built in code
and a built-in counting task, on the CPU.

Nothing is downloaded. The model (``fastalign.trainers.tiny``) starts from random weights; the task
(``fastalign.trainers.tasks.CountingTask``) asks to continue a count (``"3 4 5 :"`` -> ``"6 7 8 9"``), and its
rejected answers turn around, get a number wrong or do not stop. Held-out rule scores are the mean fraction of
positions right of one answer sampled at temperature 1 per held-out prompt. Steps:

1. SFT (``SFTTrainer``, the fused cross-entropy) on the task's right answers (completion only), from the random
   init; the held-out rule score before and after. The later stages start from the same random init, not from the
   SFT policy: started from it (60 SFT steps), DPO left PPO and GRPO no room on the training prompts (rollout rule
   score 0.97 at their start) and neither raised the held-out score (-0.01 and +0.02, one run).
2. DPO with RPO's NLL term (``rpo_alpha=1``: the NLL term teaches the model to write answers while the DPO term
   teaches which ones are preferred); reward accuracy on held-out prompts.
3. A reward model trained on preference pairs (Bradley-Terry, a score head on a Llama of width 128 from random
   weights): the task's pairs plus, as in InstructGPT, pairs of the policy's own sampled answers, the wrong ones
   ranked below the right answer by the rule (standing in for the labelers); its accuracy on held-out pairs.
4. PPO from the DPO policy against that learned reward (not the rule), on the training prompts; the mean rule score
   of sampled answers to held-out prompts before and after. PPO exploits a learned
   reward where it misjudges the policy's answers: with the task's pairs alone (0.97 held-out accuracy, but not
   trained on the policy's own mistakes) the rule score moved by -0.03 to +0.01 over 4 PPO seeds on the Intel Xeon;
   with the policy's answers added, +0.04 to +0.11 over 5 seeds at 100 steps. Longer, PPO over-optimizes the
   learned reward: at 200 steps +0.00 to +0.045 over 4 seeds, so both demos run 100. Earlier, PPO steps large
   enough to move 4-10 nats of KL within 25 steps (learning rate 1e-3) did the same harm.
5. GRPO from the same DPO policy with the same reward (8 sampled answers per prompt, no value model, no reference
   model); the mean reward of sampled answers to held-out prompts before and after.
6. On-policy distillation (``DistillationTrainer``, the fused generalized JSD, ``beta=0``: forward KL) of the GRPO
   policy (2 layers) into a 1-layer student initialized from the teacher's embeddings, first layer and head
   (DistilBERT's initialization): the student samples, the teacher scores its tokens; the held-out rule scores of
   teacher and student. Students from random weights (half the width or one layer, 100-150 steps, learning rate 3e-3
   to 1e-2) ended 0.43 below to 0.14 above the teacher (half the width at 1e-2, 100 steps: 0.09 below to 0.03 above
   over 3 seeds); the layer-dropped one lands above it in 50 steps.
7. Peak memory of one DPO training step at 2 x 8192 tokens with a 32k vocabulary, fused vs reference loss, each in
   a fresh process.

Then a summary, a PNG of the curves and the memory bars, and optionally the results as JSON.
"""
from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from .trainers import (DistillationConfig, DistillationTrainer, DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer,
                       PPOConfig, PPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer)
from .trainers.data import encode_prompt, pad
from .trainers.rollout import truncate_at_eos
from .trainers.tasks import CountingTask
from .trainers.tiny import tiny_llama, tiny_reward_model, word_tokenizer

MiB = 1 << 20


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run."""

    sft_steps: int
    dpo_steps: int
    ppo_steps: int
    grpo_steps: int
    reward_steps: int
    distill_steps: int
    memory_tokens: int  # tokens per sequence of the memory comparison (2 sequences: one pair)
    memory_vocab: int = 32768
    train_pairs: int = 4000
    heldout_pairs: int = 300
    heldout_prompts: int = 256
    policy_samples: int = 2000  # the DPO policy's answers to as many training prompts, for the reward model's data
    score_prompts: int = 512  # held-out prompts of the SFT and distillation scores (one sampled answer each)


FULL = DemoSettings(sft_steps=100, dpo_steps=120, ppo_steps=100, grpo_steps=200, reward_steps=300, distill_steps=100,
                    memory_tokens=8192)
QUICK = DemoSettings(sft_steps=100, dpo_steps=120, ppo_steps=100, grpo_steps=125, reward_steps=200, distill_steps=50,
                     memory_tokens=512)


def sft_config(output_dir: str, steps: int, seed: int = 0) -> SFTConfig:
    return SFTConfig(output_dir=output_dir, overwrite_output_dir=True, max_steps=steps, learning_rate=1e-2,
                     warmup_ratio=0.1, per_device_train_batch_size=16, per_device_eval_batch_size=128,
                     logging_steps=5, eval_steps=25, max_length=32, seed=42 + seed)


def dpo_config(output_dir: str, steps: int, seed: int = 0) -> DPOConfig:
    return DPOConfig(output_dir=output_dir, overwrite_output_dir=True, max_steps=steps, learning_rate=3e-3,
                     warmup_ratio=0.1, per_device_train_batch_size=16, per_device_eval_batch_size=64, beta=0.1,
                     rpo_alpha=1.0, logging_steps=5, eval_steps=25, max_length=32, max_prompt_length=16,
                     seed=42 + seed)


PPO_RESPONSE_LENGTH = 6


def ppo_config(output_dir: str, steps: int, seed: int = 0) -> PPOConfig:
    return PPOConfig(output_dir=output_dir, overwrite_output_dir=True, max_steps=steps, learning_rate=2e-4,
                     warmup_ratio=0.05, per_device_train_batch_size=32, per_device_eval_batch_size=128,
                     num_ppo_epochs=4, response_length=PPO_RESPONSE_LENGTH, temperature=1.0, missing_eos_penalty=1.0,
                     kl_coef=0.05, logging_steps=5, eval_steps=25, seed=42 + seed)


def grpo_config(output_dir: str, steps: int, seed: int = 0) -> GRPOConfig:
    return GRPOConfig(output_dir=output_dir, overwrite_output_dir=True, max_steps=steps, learning_rate=1e-3,
                      warmup_ratio=0.05, per_device_train_batch_size=64, per_device_eval_batch_size=128,
                      num_generations=8, max_completion_length=6, temperature=1.0, logging_steps=5, eval_steps=25,
                      seed=42 + seed)


def distill_config(output_dir: str, steps: int, seed: int = 0) -> DistillationConfig:
    return DistillationConfig(output_dir=output_dir, overwrite_output_dir=True, max_steps=steps, learning_rate=3e-3,
                              warmup_ratio=0.05, per_device_train_batch_size=32, per_device_eval_batch_size=128,
                              max_completion_length=PPO_RESPONSE_LENGTH, beta=0.0, temperature=1.0,
                              logging_steps=5, eval_steps=25, seed=42 + seed)


def layer_dropped_student(teacher, tokenizer, keep: int = 0):
    """A one-layer student of ``teacher`` (a default-shaped :func:`tiny_llama`), initialized from the teacher's
    embeddings, its layer ``keep``, final norm and lm_head (DistilBERT initializes its student from the teacher's
    layers likewise)."""
    student = tiny_llama(tokenizer, num_hidden_layers=1)
    prefix = f"model.layers.{keep}."
    student.load_state_dict({k.replace(prefix, "model.layers.0."): v for k, v in teacher.state_dict().items()
                             if not k.startswith("model.layers.") or k.startswith(prefix)})
    return student


def reward_config(output_dir: str, steps: int, seed: int = 0) -> RewardConfig:
    return RewardConfig(output_dir=output_dir, overwrite_output_dir=True, max_steps=steps, learning_rate=1e-3,
                        lr_scheduler_type="cosine", warmup_ratio=0.1, per_device_train_batch_size=32,
                        per_device_eval_batch_size=128, logging_steps=5, eval_steps=50, max_length=32,
                        seed=42 + seed)


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: list[str], response_length: int) -> list[str]:
    """One answer sampled (temperature 1, at most ``response_length`` tokens, cut after the first EOS) to each
    prompt, as text; the model is left in train mode."""
    answers = []
    model.eval()
    for start in range(0, len(prompts), 256):
        ids, mask = pad([encode_prompt(tokenizer, p, None) for p in prompts[start:start + 256]],
                        tokenizer.pad_token_id, left=True)
        sequences = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                   max_new_tokens=response_length, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
        responses = truncate_at_eos(sequences[:, ids.shape[1]:], tokenizer.eos_token_id, tokenizer.pad_token_id)[0]
        answers += tokenizer.batch_decode(responses, skip_special_tokens=True)
    model.train()
    return answers


def policy_preference_data(model, tokenizer, task: CountingTask, prompts: int, seed: int,
                           response_length: int) -> list[dict[str, str]]:
    """The policy's answers sampled (temperature 1) to ``prompts`` training prompts; each wrong one becomes a
    preference record, rejected against the right answer."""
    torch.manual_seed(seed)
    texts = task.prompts(prompts, seed=seed)
    records = []
    for prompt, answer in zip(texts, sample_answers(model, tokenizer, texts, response_length)):
        right = " ".join(task.answer(prompt))
        if answer.strip() != right:
            records.append({"prompt": prompt, "chosen": right, "rejected": answer})
    return records


def sampled_score(model, tokenizer, task: CountingTask, settings: DemoSettings, heldout: bool = True) -> float:
    """Mean rule score of one answer sampled (temperature 1, PPO's response length) to each of
    ``settings.score_prompts`` held-out (or training) prompts, the same prompts and seed for every model, on a forked
    random number generator (the caller's draws are unchanged)."""
    prompts = task.prompts(settings.score_prompts, seed=8, heldout=heldout)
    with torch.random.fork_rng():
        torch.manual_seed(8)
        answers = sample_answers(model, tokenizer, prompts, PPO_RESPONSE_LENGTH)
    return sum(task.score(prompts, answers)) / len(prompts)


def sft_data(task: CountingTask, n: int, seed: int, heldout: bool = False) -> list[dict[str, str]]:
    """``n`` prompt-completion records of the task: a prompt and its right answer."""
    return [{"prompt": p, "completion": " ".join(task.answer(p))} for p in task.prompts(n, seed, heldout)]


def train_reward_model(tokenizer, task: CountingTask, settings: DemoSettings, output_dir: str,
                       policy_pairs: list[dict[str, str]] = (), seed: int = 0):
    """A reward model (a tiny Llama of width 128 with a score head, random init from ``seed``) trained on preference
    pairs of the task and ``policy_pairs`` (shuffled together); returns it (in eval mode) and its logged records."""
    pairs = task.preference_data(settings.train_pairs, seed=5) + list(policy_pairs)
    random.Random(0).shuffle(pairs)
    torch.manual_seed(seed)
    reward_model = tiny_reward_model(tokenizer, hidden_size=128, intermediate_size=256)
    trainer = RewardTrainer(reward_model, tokenizer, pairs,
                            reward_config(output_dir, settings.reward_steps, seed),
                            eval_dataset=task.preference_data(settings.heldout_pairs, seed=2, heldout=True))
    return reward_model.eval(), trainer.train()


def dpo_step_memory(loss_backend: str, tokens: int, vocab_size: int) -> dict:
    """Extra peak memory of one DPO training step (forward, backward, AdamW step) of the tiny Llama on one pair of
    ``tokens``-token sequences with a ``vocab_size`` vocabulary, in this process (call it in a fresh one)."""
    from .bench import extra_peak_bytes

    words = [f"w{i}" for i in range(vocab_size - 3)]  # + <pad> <eos> <unk>
    tokenizer = word_tokenizer(words)
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, max_position_embeddings=tokens)
    rng = random.Random(0)
    prompt_length = tokens // 16
    record = {"prompt": " ".join(rng.choices(words, k=prompt_length)),
              "chosen": " ".join(rng.choices(words, k=tokens - prompt_length - 1)),
              "rejected": " ".join(rng.choices(words, k=tokens - prompt_length - 1))}
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(output_dir=output_dir, max_length=tokens, max_prompt_length=prompt_length,
                           per_device_train_batch_size=1, loss_backend=loss_backend, disable_tqdm=True)
        trainer = DPOTrainer(model, tokenizer, [record], config)
    trainer.setup_optimizer(2)
    batch = trainer.batch(trainer.train_pairs, [0], trainer.reference_logps(trainer.train_pairs, [[0]]))
    short = {k: v[:, :64] if v.dim() == 2 else v for k, v in batch.items()}

    def step(b):
        loss, _ = trainer.compute_loss(b)
        loss.backward()
        trainer.optimizer_step(True)

    step(short)  # warm-up: libraries, threads, AdamW state
    extra = extra_peak_bytes(lambda: step(batch), torch.device("cpu"))
    return {"loss_backend": loss_backend, "extra_peak_bytes": extra}


def run_with_heartbeat(command: list[str], env: dict, what: str, every: float = 5.0) -> tuple[str, str]:
    """Run ``command``, printing ``what`` and the seconds elapsed every ``every`` seconds until it ends; its
    ``(stdout, stderr)``, or a ``RuntimeError`` with its stderr if it fails."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env)
        while True:
            try:
                process.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                print(f"      {what}: {time.perf_counter() - start:.0f} s", flush=True)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{err}")
    print(f"      {what}: done in {time.perf_counter() - start:.0f} s", flush=True)
    return out, err


def measure_memory(tokens: int, vocab_size: int) -> dict:
    """``dpo_step_memory`` for both loss backends, each in a fresh Python process; sizes in MiB."""
    out = {"tokens": 2 * tokens, "sequence_length": tokens, "vocab_size": vocab_size}
    for backend in ("fused", "reference"):
        code = (f"import json; from fastalign.demo import dpo_step_memory; "
                f"print(json.dumps(dpo_step_memory({backend!r}, {tokens}, {vocab_size})))")
        # Freed tensors go back to the system at once, so that RSS follows the live tensors (see fastalign.bench).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        stdout, _ = run_with_heartbeat([sys.executable, "-c", code], env, f"{backend} loss")
        out[f"{backend}_mb"] = json.loads(stdout.strip().splitlines()[-1])["extra_peak_bytes"] / MiB
    out["ratio"] = out["fused_mb"] / out["reference_mb"]
    return out


def plot(path: str, sft_history: list[dict], dpo_history: list[dict], ppo_history: list[dict],
         grpo_history: list[dict], distill_history: list[dict], memory: dict) -> None:
    """Training curves (SFT loss and token accuracy, DPO loss and reward accuracy/margin, PPO score and KL, GRPO
    reward, distillation loss and student reward) and the memory bars, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(history, key):
        points = [(r["step"], r[key]) for r in history if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    panels = [  # (title, history, [(key, line style, label)])
        ("SFT on the right answers", sft_history, [("loss", "-", "train loss"), ("eval_loss", "o-", "held-out loss"),
                                                   ("eval_mean_token_accuracy", "s--", "held-out token accuracy")]),
        ("DPO (+RPO) loss", dpo_history, [("loss", "-", "train loss"), ("eval_loss", "o-", "held-out loss")]),
        ("DPO implicit reward", dpo_history, [("rewards/accuracies", "-", "train accuracy"),
                                              ("eval_rewards/accuracies", "o-", "held-out accuracy"),
                                              ("eval_rewards/margins", "s--", "held-out margin")]),
        ("PPO (learned reward; scores from the reward model)", ppo_history,
         [("objective/scores", "-", "rollout score"), ("eval_objective/scores", "o-", "held-out score"),
          ("objective/kl", "-", "KL to reference")]),
        ("GRPO (rule-based reward, 8 answers per prompt)", grpo_history,
         [("reward", "-", "rollout reward"), ("eval_reward", "o-", "held-out reward")]),
        ("On-policy distillation of the GRPO policy", distill_history,
         [("loss", "-", "train loss (generalized JSD)"), ("eval_reward", "o-", "student's held-out rule score")]),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(22, 8))
    axes = axes.ravel()
    for ax, (title, history, curves) in zip(axes, panels):
        for key, style, label in curves:
            ax.plot(*series(history, key), style, label=label)
        ax.set(title=title, xlabel="step")
        ax.legend()
    ax = axes[6]
    bars = ax.bar(["fused", "reference"], [memory["fused_mb"], memory["reference_mb"]], color=["C2", "C3"])
    ax.bar_label(bars, fmt="%.0f MiB")
    ax.margins(y=0.15)
    ax.set(title=f"DPO step, 2 x {memory['sequence_length']} tokens, V={memory['vocab_size']}",
           ylabel="extra peak memory (MiB)")
    axes[7].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prompt_trainer(trainer_class, model, tokenizer, task: CountingTask, settings: DemoSettings, config, reward):
    """A ``trainer_class`` (PPO or GRPO) for ``model`` on the task's training prompts and ``reward``, evaluated on
    held-out prompts."""
    return trainer_class(model, tokenizer, task.prompts(settings.train_pairs, seed=3), reward, config,
                         eval_dataset=task.prompts(settings.heldout_prompts, seed=4, heldout=True))


def rule_score(trainer: PPOTrainer, task: CountingTask) -> float:
    """PPO's held-out evaluation (one sampled answer per prompt) scored by the task's rule, whatever it trains on."""
    reward_fn, trainer.reward_fn = trainer.reward_fn, task.score
    try:
        return trainer.evaluate()[trainer.eval_metric]
    finally:
        trainer.reward_fn = reward_fn


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_demo(json_out: str | None = None, out_dir: str = "fastalign-demo", quick: bool = False, seed: int = 0) -> dict:
    """Run the demo (``quick``: shorter training and a 2 x 512-token memory comparison); write ``out_dir/demo.png``
    and the trainers' outputs under ``out_dir``, and the results to ``json_out`` if given. ``seed``: the models'
    random initialization; the trainers' ``seed`` (data order, sampling) is ``42 + seed``. Returns the results:
    ``{"sft": {"score_start", "score_end"}, "dpo": {"reward_accuracy", "reward_margin"}, "reward_model":
    {"accuracy", "margin"}, "ppo": {"score_start", "score_end"}, "grpo": {"score_start", "score_end"}, "distill":
    {"teacher_score", "student_score_start", "student_score_end"}, "memory": {"tokens", "fused_mb",
    "reference_mb", ...}, "seconds": ...}``; each training stage also gives its ``steps`` and ``seconds``."""
    settings = QUICK if quick else FULL
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    seconds = {}

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = now - since
        return now

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread beats two (no OpenMP hand-offs on small matmuls)
    try:
        task = CountingTask()
        tokenizer = word_tokenizer(task.words)
        torch.manual_seed(seed)
        model = tiny_llama(tokenizer)
        sft_model = copy.deepcopy(model)
        print(f"[1/7] SFT: tiny Llama ({parameters(model) / 1e3:.0f}k parameters, random init) on the right answers "
              f"of the counting task ('3 4 5 :' -> '6 7 8 9'), {settings.sft_steps} steps", flush=True)
        sft_start = sampled_score(sft_model, tokenizer, task, settings)
        sft = SFTTrainer(sft_model, tokenizer, sft_data(task, settings.train_pairs, seed=7),
                         sft_config(os.path.join(out_dir, "sft"), settings.sft_steps, seed),
                         eval_dataset=sft_data(task, settings.heldout_pairs, seed=2, heldout=True))
        sft_history = sft.train()
        sft_end = sampled_score(sft_model, tokenizer, task, settings)
        t = stage("sft", start)
        print(f"[2/7] DPO (+RPO) from the same random init on the task's preference pairs, {settings.dpo_steps} "
              f"steps", flush=True)
        dpo = DPOTrainer(model, tokenizer, task.preference_data(settings.train_pairs, seed=1),
                         dpo_config(os.path.join(out_dir, "dpo"), settings.dpo_steps, seed),
                         eval_dataset=task.preference_data(settings.heldout_pairs, seed=2, heldout=True))
        dpo_history = dpo.train()
        final = dpo_history[-1]
        dpo_model = copy.deepcopy(model)  # GRPO starts from here too
        t = stage("dpo", t)
        policy_pairs = policy_preference_data(model, tokenizer, task, settings.policy_samples, seed=6,
                                              response_length=PPO_RESPONSE_LENGTH)
        print(f"[3/7] reward model: a tiny Llama with a score head, trained on the task's preference pairs and "
              f"{len(policy_pairs)} wrong answers of the DPO policy ranked below the right ones, "
              f"{settings.reward_steps} steps", flush=True)
        reward_model, reward_history = train_reward_model(tokenizer, task, settings, os.path.join(out_dir, "reward"),
                                                          policy_pairs, seed)
        t = stage("reward_model", t)
        print(f"[4/7] PPO from the DPO policy against the learned reward, {settings.ppo_steps} steps", flush=True)
        ppo = prompt_trainer(PPOTrainer, model, tokenizer, task, settings,
                             ppo_config(os.path.join(out_dir, "ppo"), settings.ppo_steps, seed), reward_model)
        score_start = rule_score(ppo, task)
        ppo_history = ppo.train()
        score_end = rule_score(ppo, task)
        t = stage("ppo", t)
        print(f"[5/7] GRPO from the DPO policy, the task's rule as reward, {settings.grpo_steps} steps", flush=True)
        grpo = prompt_trainer(GRPOTrainer, dpo_model, tokenizer, task, settings,
                              grpo_config(os.path.join(out_dir, "grpo"), settings.grpo_steps, seed), task.score)
        grpo_start = grpo.evaluate()[grpo.eval_metric]
        grpo_history = grpo.train()
        t = stage("grpo", t)
        teacher = dpo_model  # the GRPO policy
        student = layer_dropped_student(teacher, tokenizer)
        print(f"[6/7] on-policy distillation of the GRPO policy ({parameters(teacher) / 1e3:.0f}k parameters, 2 "
              f"layers) into a 1-layer student ({parameters(student) / 1e3:.0f}k, from the teacher's first layer), "
              f"{settings.distill_steps} steps", flush=True)
        teacher_score = sampled_score(teacher, tokenizer, task, settings)
        teacher_train_score = sampled_score(teacher, tokenizer, task, settings, heldout=False)
        student_start = sampled_score(student, tokenizer, task, settings)
        distill = DistillationTrainer(student, tokenizer, task.prompts(settings.train_pairs, seed=3), teacher,
                                      distill_config(os.path.join(out_dir, "distill"), settings.distill_steps, seed),
                                      eval_dataset=task.prompts(settings.heldout_prompts, seed=4, heldout=True),
                                      reward_fn=task.score)
        distill_history = distill.train()
        student_end = sampled_score(student, tokenizer, task, settings)
        student_train_score = sampled_score(student, tokenizer, task, settings, heldout=False)
        stage("distill", t)
    finally:
        torch.set_num_threads(threads)
    rollout_scores = [r["objective/scores"] for r in ppo_history if "objective/scores" in r]
    rollout_rewards = [r["reward"] for r in grpo_history if "reward" in r]
    sft_evals = [r for r in sft_history if "eval_loss" in r]
    distill_losses = [r["loss"] for r in distill_history if "loss" in r]
    tokens, vocab = settings.memory_tokens, settings.memory_vocab
    print(f"[7/7] peak memory of a DPO step at 2 x {tokens} tokens, V={vocab}: fused vs reference loss "
          f"(fresh processes)", flush=True)
    memory = measure_memory(tokens, vocab)
    results = {
        "sft": {"score_start": sft_start, "score_end": sft_end,  # under the rule
                "token_accuracy": sft_evals[-1]["eval_mean_token_accuracy"], "loss": sft_evals[-1]["eval_loss"],
                "steps": settings.sft_steps, "seconds": seconds["sft"]},
        "dpo": {"reward_accuracy": final["eval_rewards/accuracies"], "reward_margin": final["eval_rewards/margins"],
                "steps": settings.dpo_steps, "seconds": seconds["dpo"]},
        "reward_model": {"accuracy": reward_history[-1]["eval_accuracy"],
                         "margin": reward_history[-1]["eval_margin"], "steps": settings.reward_steps,
                         "seconds": seconds["reward_model"]},
        "ppo": {"score_start": score_start, "score_end": score_end,  # under the rule
                "reward_model_score_start": rollout_scores[0], "reward_model_score_end": rollout_scores[-1],
                "steps": settings.ppo_steps, "seconds": seconds["ppo"]},
        "grpo": {"score_start": grpo_start, "score_end": grpo_history[-1]["eval_reward"],
                 "rollout_reward_start": rollout_rewards[0], "rollout_reward_end": rollout_rewards[-1],
                 "steps": settings.grpo_steps, "seconds": seconds["grpo"]},
        "distill": {"teacher_score": teacher_score, "student_score_start": student_start,
                    "student_score_end": student_end,  # under the rule, on the same held-out prompts
                    "teacher_train_score": teacher_train_score, "student_train_score": student_train_score,
                    "teacher_parameters": parameters(teacher), "student_parameters": parameters(student),
                    "loss_start": distill_losses[0], "loss_end": distill_losses[-1],
                    "steps": settings.distill_steps, "seconds": seconds["distill"]},
        "memory": memory,
        "seconds": time.perf_counter() - start,
        "plot": os.path.join(out_dir, "demo.png"),
    }
    plot(results["plot"], sft_history, dpo_history, ppo_history,
         [{"step": 0, "eval_reward": grpo_start}, *grpo_history], distill_history, memory)
    print(summary(results), flush=True)
    if json_out:
        with open(json_out, "w") as out:
            json.dump(results, out, indent=2)
            out.write("\n")
    return results


STAGES = (("SFT", "sft"), ("DPO", "dpo"), ("reward model", "reward_model"), ("PPO", "ppo"), ("GRPO", "grpo"),
          ("distillation", "distill"))


def summary(results: dict) -> str:
    sft, dpo, reward, ppo, grpo = (results[k] for k in ("sft", "dpo", "reward_model", "ppo", "grpo"))
    distill, memory = results["distill"], results["memory"]
    return "\n".join([
        "",
        "fastalign demo: summary",
        f"  SFT  held-out mean rule score {sft['score_start']:.3f} -> {sft['score_end']:.3f} (held-out token "
        f"accuracy {sft['token_accuracy']:.3f})",
        f"  DPO  held-out reward accuracy {dpo['reward_accuracy']:.3f}, reward margin {dpo['reward_margin']:.2f}",
        f"  reward model  held-out accuracy {reward['accuracy']:.3f}, margin {reward['margin']:.2f}",
        f"  PPO  on the learned reward: held-out mean rule score {ppo['score_start']:.3f} -> {ppo['score_end']:.3f} "
        f"(training rollouts' learned reward {ppo['reward_model_score_start']:.2f} -> "
        f"{ppo['reward_model_score_end']:.2f})",
        f"  GRPO held-out mean reward {grpo['score_start']:.3f} -> {grpo['score_end']:.3f} "
        f"(training rollouts {grpo['rollout_reward_start']:.3f} -> {grpo['rollout_reward_end']:.3f})",
        f"  distillation  held-out mean rule score: teacher (the GRPO policy, "
        f"{distill['teacher_parameters'] / 1e3:.0f}k parameters) {distill['teacher_score']:.3f}, student "
        f"({distill['student_parameters'] / 1e3:.0f}k) "
        f"{distill['student_score_start']:.3f} -> {distill['student_score_end']:.3f}",
        f"  memory, one DPO step at 2 x {memory['sequence_length']} tokens, V={memory['vocab_size']}, fp32: "
        f"fused {memory['fused_mb']:.0f} MiB vs reference {memory['reference_mb']:.0f} MiB extra peak "
        f"({memory['ratio']:.2f}x)",
        f"  plot {results['plot']}; {results['seconds']:.0f} s in all ("
        + ", ".join(f"{name} {results[key]['seconds']:.0f} s" for name, key in STAGES) + ")",
    ])
