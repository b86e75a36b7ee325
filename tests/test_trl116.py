"""fastalign's fused ops against the real TRL 1.16 trainers: ``GRPOTrainer``, ``DPOTrainer`` and ``KTOTrainer`` of
the installed ``trl`` are built on one tiny random Llama, their ``_compute_loss(model, batch)`` is run on a batch
they collate (GRPO: the ``inputs`` dict of ``_compute_loss``), and the loss and the gradient of every parameter are
compared with fastalign's op on the model's last hidden states and lm_head (fp32, 1e-5 relative).

The trainers are built once per module; each case sets the options ``_compute_loss`` reads on the trainer (and
restores them), so the grid costs one forward and backward per side."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from fastalign import fused_linear_dpo_loss, fused_linear_grpo_loss, fused_linear_kto_loss  # noqa: E402
from fastalign.objectives.dpo import DPOOptions  # noqa: E402
from fastalign.objectives.grpo import GRPO_LOSS_TYPES, GRPOLossConfig  # noqa: E402
from fastalign.trainers.tiny import tiny_llama, word_tokenizer  # noqa: E402

assert trl.__version__.startswith("1.16"), trl.__version__

WORDS = "a b c d e f g h i j k l m n o p q r s t u v w x y z".split()
RTOL = 1e-5
COMMON = dict(bf16=False, report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny Llama (fp32, train mode, no dropout) and its word-level tokenizer, shared by every trainer."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    return model.train(), tokenizer, tmp_path_factory.mktemp("trl")


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same(model, theirs: torch.Tensor, ours: torch.Tensor):
    """Equal losses and equal gradients of every parameter (relative to each gradient's largest entry)."""
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=RTOL, atol=RTOL * max(1.0, abs(float(theirs))))
    want, got = _grads(model, theirs), _grads(model, ours)
    assert set(got) == set(want) and len(want) == len(list(model.parameters()))
    assert max(float(g.abs().max()) for g in want.values()) > 1e-6  # not vacuous
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=RTOL, atol=RTOL * float(g.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def hidden_and_head(model, input_ids, attention_mask, start: int):
    """Last hidden states at the positions predicting tokens ``start:`` of ``input_ids``, and the lm_head weight."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden[:, start - 1:-1], model.lm_head.weight


@contextlib.contextmanager
def options(trainer, **values):
    """Set attributes of the trainer (``args.x`` for names with a dot) for one case, restored afterwards."""
    saved = {}
    for name, value in values.items():
        owner, attr = (trainer.args, name[5:]) if name.startswith("args.") else (trainer, name)
        saved[name] = (owner, attr, getattr(owner, attr))
        object.__setattr__(owner, attr, value)
    try:
        yield
    finally:
        for owner, attr, value in saved.values():
            object.__setattr__(owner, attr, value)


# ----------------------------------------------------------------------------------------------------------- GRPO
P, C = 3, 5  # prompt and completion lengths


@pytest.fixture(scope="module")
def grpo(tiny):
    model, tokenizer, tmp = tiny
    args = trl.GRPOConfig(output_dir=str(tmp / "grpo"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=C, **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                  args=args, train_dataset=datasets.Dataset.from_dict({"prompt": ["a b"] * 4}),
                                  processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(1)
    b = 4
    prompt_ids = torch.randint(3, len(tokenizer), (b, P), generator=g)
    prompt_mask = torch.ones(b, P, dtype=torch.long)
    prompt_mask[1, 0] = 0  # left padding
    prompt_ids[1, 0] = tokenizer.pad_token_id
    completion_ids = torch.randint(3, len(tokenizer), (b, C), generator=g)
    completion_mask = torch.ones(b, C, dtype=torch.long)
    completion_mask[0, 3:] = 0
    completion_mask[2, 2:] = 0
    completion_ids[completion_mask == 0] = tokenizer.pad_token_id
    with torch.no_grad():
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attention_mask = torch.cat([prompt_mask, completion_mask], 1)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, P - 1:-1]
        logps = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None])[..., 0]
    seq = torch.tensor([0.3, -0.25, 0.05, -0.4])[:, None]  # per-sequence offsets of pi_old, far from the clips
    old = logps - seq + 0.03 * torch.randn(b, C, generator=g)
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, advantages=torch.tensor([1.0, -0.7, 0.4, -1.2]),
                 old_per_token_logps=old, ref_per_token_logps=logps + 0.2 * torch.randn(b, C, generator=g),
                 sampling_per_token_logps=old + torch.tensor([0.0, 0.6, 0.0, 0.05])[:, None],
                 importance_sampling_ratio=torch.where(completion_mask.bool(), 0.6 + 0.8 * torch.rand(b, C, generator=g),
                                                       1.0),
                 num_items_in_batch=torch.tensor(40.0))
    return trainer, batch


def grpo_pair(trainer, batch, config: GRPOLossConfig, *, is_ratio=False, backend="torch"):
    """(TRL's loss, fastalign's loss) with the options of ``config`` set on the trainer."""
    model = trainer.model
    inputs = dict(batch)
    if not is_ratio and config.loss_type != "vespo":
        inputs.pop("importance_sampling_ratio")
    if config.off_policy_mask_threshold is None:
        inputs.pop("sampling_per_token_logps")
    eps_high = config.eps_high
    with options(trainer, loss_type=config.loss_type, importance_sampling_level=config.importance_sampling_level,
                 epsilon_low=config.epsilon, epsilon_high=eps_high, beta=config.beta,
                 top_entropy_quantile=config.top_entropy_quantile,
                 off_policy_mask_threshold=config.off_policy_mask_threshold, entropy_coef=config.entropy_coef,
                 _entropy_bonus_enabled=config.entropy_coef != 0, use_vllm=is_ratio,
                 vllm_importance_sampling_correction=is_ratio, max_completion_length=C,
                 **{f"args.{k}": getattr(config, k) for k in (
                     "delta", "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                     "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")}):
        theirs = trainer._compute_loss(model, inputs)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    hidden, weight = hidden_and_head(model, input_ids, attention_mask, P)
    mask = batch["completion_mask"].bool()
    targets = batch["completion_ids"].masked_fill(~mask, -100)
    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(GRPOLossConfig)}
    ours = fused_linear_grpo_loss(
        hidden, weight, targets, batch["advantages"], old_logprobs=batch["old_per_token_logps"],
        ref_logprobs=batch["ref_per_token_logps"] if config.beta else None,
        importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
        sampling_logprobs=inputs.get("sampling_per_token_logps"), num_items_in_batch=batch["num_items_in_batch"],
        backend=backend, **kwargs)
    return theirs, ours.loss


def grpo_config(loss_type, level="token", **kw) -> GRPOLossConfig:
    return GRPOLossConfig(loss_type=loss_type, importance_sampling_level=level,
                          max_completion_length=C if loss_type == "dr_grpo" else None, **kw)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_every_loss_type_and_level(grpo, loss_type, level):
    """The 1.16 defaults (``use_bias_correction_kl=True``), with the KL term on (luspo included: TRL 1.16 sums the
    now ``[B, T]`` per-token loss per sequence)."""
    trainer, batch = grpo
    assert_same(trainer.model, *grpo_pair(trainer, batch, grpo_config(loss_type, level, beta=0.05)))


@pytest.mark.parametrize("loss_type, level, kw", [
    ("dapo", "token", dict(top_entropy_quantile=0.5, entropy_coef=0.05)),
    ("vespo", "token", dict(top_entropy_quantile=0.6, entropy_coef=0.05)),
    ("luspo", "sequence", dict(top_entropy_quantile=0.5, entropy_coef=0.05)),
    ("cispo", "token", dict(entropy_coef=-0.03, epsilon_high=1.1)),
    ("grpo", "sequence", dict(off_policy_mask_threshold=0.3, entropy_coef=0.02)),
    ("vespo", "token", dict(off_policy_mask_threshold=0.3, vespo_lambda_neg=5e-5, vespo_k_pos=1.5)),
    ("luspo", "sequence", dict(beta=0.0)),
    ("sapo", "token", dict(sapo_temperature_neg=2.0, beta=0.02, use_bias_correction_kl=False)),
    ("dr_grpo", "token", dict(delta=1.2, epsilon=0.1, epsilon_high=0.15, beta=0.02)),
], ids=["dapo-entropy-mask", "vespo-entropy-mask", "luspo-entropy-mask", "cispo-bonus", "gspo-off-policy",
        "vespo-off-policy-lambda-floor", "gspo-luspo", "sapo-no-bias-correction", "dr_grpo-delta"])
def test_grpo_options(grpo, loss_type, level, kw):
    trainer, batch = grpo
    assert_same(trainer.model, *grpo_pair(trainer, batch, grpo_config(loss_type, level, **kw)))


@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence"), ("luspo", "token")])
def test_grpo_importance_sampling_correction(grpo, loss_type, level):
    """The rollout engine's per-token IS ratio (TRL: ``use_vllm`` and ``vllm_importance_sampling_correction``)."""
    trainer, batch = grpo
    assert_same(trainer.model, *grpo_pair(trainer, batch, grpo_config(loss_type, level, beta=0.03), is_ratio=True))


def test_grpo_nan_sampling_logprobs_are_no_evidence(grpo):
    """A NaN sampling log-prob (a token vLLM could not score) does not drop a negative-advantage sequence."""
    trainer, batch = grpo
    sampling = batch["sampling_per_token_logps"].clone()
    sampling[3, 1] = float("nan")
    config = grpo_config("dapo", off_policy_mask_threshold=0.3)
    assert_same(trainer.model, *grpo_pair(trainer, {**batch, "sampling_per_token_logps": sampling}, config))


@pytest.mark.parametrize("loss_type, level, kw", [
    ("dapo", "token", dict(beta=0.05)),
    ("vespo", "token", dict(top_entropy_quantile=0.5, entropy_coef=0.05)),
    ("luspo", "sequence", dict(off_policy_mask_threshold=0.3, beta=0.02)),
])
def test_grpo_triton(grpo, loss_type, level, kw):
    """The triton kernels (under the interpreter) on a subset of the grid."""
    pytest.importorskip("triton")
    trainer, batch = grpo
    assert_same(trainer.model, *grpo_pair(trainer, batch, grpo_config(loss_type, level, **kw), backend="triton"))
