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


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: tiny models stall on a busy 2-core machine with two (see conftest's ``one_thread``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    """Equal losses and equal gradients of every parameter (relative error in norm)."""
    theirs_value = float(theirs.detach())
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=RTOL, atol=RTOL * max(1.0, abs(theirs_value)))
    want, got = _grads(model, theirs), _grads(model, ours)
    assert set(got) == set(want) and len(want) == len(list(model.parameters()))
    assert max(float(g.abs().max()) for g in want.values()) > 1e-6  # not vacuous
    for name, g in want.items():  # relative error of each parameter's whole gradient (fp32 noise is per element)
        error = float((got[name] - g).norm() / g.norm().clamp(min=1e-30))
        assert error <= RTOL, f"{name}: gradient relative error {error:.2e} > {RTOL}"


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
                 importance_sampling_ratio=torch.where(completion_mask.bool(),
                                                       0.6 + 0.8 * torch.rand(b, C, generator=g), 1.0),
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
        "vespo-off-policy-small-lambda", "gspo-luspo", "sapo-no-bias-correction", "dr_grpo-delta"])
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


# ------------------------------------------------------------------------------------------------------------ DPO
SMOOTHING = {"robust": 0.2, "exo_pair": 1e-3, "aot": 0.15, "aot_unpaired": 0.05}  # sigmoid: see trl-semantics.md
PAIRS = dict(prompt=["a b c", "d e", "f g h i", "j"], chosen=[" k l", " m n o p", " q", " r s t"],
             rejected=[" u v w", " x", " y z a b c", " d e"])  # TRL tokenizes prompt + completion, concatenated


@pytest.fixture(scope="module")
def ref_model(tiny):
    torch.manual_seed(1)
    return tiny_llama(tiny[1], hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1).eval()


def preference_trainer(kind: str, tiny, ref_model, data: dict, **config):
    """TRL's ``{kind}Trainer`` (DPO or KTO) on ``data`` with the shared model and reference, and its collated batch
    of the whole data."""
    model, tokenizer, tmp = tiny
    size = len(next(iter(data.values())))
    args = getattr(trl, f"{kind}Config")(output_dir=str(tmp / kind), per_device_train_batch_size=size, **COMMON,
                                         **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = getattr(trl, f"{kind}Trainer")(model=model, ref_model=ref_model, args=args,
                                                 processing_class=tokenizer,
                                                 train_dataset=datasets.Dataset.from_dict(data))
    return trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(size)])


def shifted(model, ids, attention, completion_mask):
    """fastalign's hidden states and targets of a DPO/KTO batch: the positions predicting tokens 1.. of ``ids``."""
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
    return hidden, ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)


@pytest.fixture(scope="module")
def dpo(tiny, ref_model):
    """TRL's DPOTrainer built with ``use_weighting`` (so its fused head returns ``log_sum_sq_probs``; cases without
    WPO switch it off) and its collated batch of four pairs."""
    return preference_trainer("DPO", tiny, ref_model, PAIRS, use_weighting=True)


def dpo_pair(trainer, batch, o: DPOOptions, backend: str = "torch"):
    types = [o.loss_type] if isinstance(o.loss_type, str) else list(o.loss_type)
    with options(trainer, beta=o.beta, loss_types=types, loss_weights=list(o.loss_weights or [1.0] * len(types)),
                 label_smoothing=o.label_smoothing, f_divergence_type=o.f_divergence_type,
                 f_alpha_divergence_coef=o.f_alpha_divergence_coef, ld_alpha=o.ld_alpha,
                 use_weighting=o.use_weighting, **{"args.discopop_tau": o.discopop_tau}):
        theirs = trainer._compute_loss(trainer.model, batch, False)
    layout = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    hidden, targets = shifted(trainer.model, *layout)
    with torch.no_grad():
        ref_hidden, _ = shifted(trainer.ref_model, *layout)
    kwargs = {f.name: getattr(o, f.name) for f in dataclasses.fields(DPOOptions) if f.name != "num_responses"}
    ours = fused_linear_dpo_loss(hidden, trainer.model.lm_head.weight, targets, ref_hidden=ref_hidden,
                                 ref_weight=trainer.ref_model.lm_head.weight, backend=backend, **kwargs)
    return theirs, ours.loss


def dpo_options(loss_type, **kw) -> DPOOptions:
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    smoothing = max([SMOOTHING.get(t, 0.0) for t in types])
    return DPOOptions(beta=kw.pop("beta", 0.7), loss_type=loss_type, label_smoothing=smoothing, **kw)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                                       "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                                       "sigmoid_norm"])
def test_dpo_every_loss_type(dpo, loss_type):
    trainer, batch = dpo
    tau = dict(discopop_tau=0.2) if loss_type == "discopop" else {}  # the default 0.05 amplifies fp32 noise 20x
    assert_same(trainer.model, *dpo_pair(trainer, batch, dpo_options(loss_type, **tau)))


@pytest.mark.parametrize("loss_type, kw", [
    (["sigmoid", "bco_pair", "sft"], dict(loss_weights=(0.8, 0.2, 1.0))),  # MPO
    (["ipo", "discopop", "apo_zero"], dict(loss_weights=(0.5, 1.5, 0.3), discopop_tau=0.2)),
    ("sigmoid", dict(f_divergence_type="forward_kl")),
    ("hinge", dict(f_divergence_type="js_divergence")),
    ("ipo", dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)),
    (["robust", "sft"], dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7)),
    ("sigmoid", dict(ld_alpha=0.4)),
    (["ipo", "sft"], dict(ld_alpha=0.6)),
    ("sigmoid", dict(use_weighting=True)),
    (["sigmoid", "ipo"], dict(use_weighting=True, loss_weights=(1.0, 0.5))),  # TRL 1.16 crashes on hinge/sft + WPO
], ids=["mpo", "weighted-list", "forward_kl", "js", "alpha-ipo", "alpha-robust-sft", "ld", "ld-ipo-sft", "wpo",
        "wpo-list"])
def test_dpo_options(dpo, loss_type, kw):
    trainer, batch = dpo
    assert_same(trainer.model, *dpo_pair(trainer, batch, dpo_options(loss_type, **kw)))


@pytest.mark.parametrize("loss_type, kw", [("sigmoid", dict(use_weighting=True)), (["ipo", "sft"], dict(ld_alpha=0.6))])
def test_dpo_triton(dpo, loss_type, kw):
    """The triton kernels (under the interpreter) on a subset."""
    pytest.importorskip("triton")
    trainer, batch = dpo
    assert_same(trainer.model, *dpo_pair(trainer, batch, dpo_options(loss_type, **kw), backend="triton"))


# ------------------------------------------------------------------------------------------------------------ KTO
UNPAIRED = dict(prompt=["a b c", "d e", "f g h i", "j", "k l"], completion=[" m n", " o p q r", " s", " t u v", " w"],
                label=[True, False, True, False, False])


@pytest.fixture(scope="module")
def kto(tiny, ref_model):
    return preference_trainer("KTO", tiny, ref_model, UNPAIRED)


@pytest.mark.parametrize("loss_type, kw, backend", [
    ("kto", {}, "torch"), ("kto", dict(beta=0.5, desirable_weight=1.3, undesirable_weight=0.6), "torch"),
    ("apo_zero_unpaired", {}, "torch"), ("kto", dict(beta=0.3), "triton"),
])
def test_kto(kto, loss_type, kw, backend):
    from fastalign import fused_linear_logprobs
    from fastalign.objectives.kto import kto_kl
    trainer, batch = kto
    beta = kw.get("beta", 0.1)
    weights = {k: kw.get(k, 1.0) for k in ("desirable_weight", "undesirable_weight")}
    with options(trainer, loss_type=loss_type, calculate_KL=loss_type == "kto", beta=beta, **weights):
        theirs = trainer._compute_loss(trainer.model, batch, False)
    model, ref = trainer.model, trainer.ref_model
    hidden, targets = shifted(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        ref_hidden, _ = shifted(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        ref_logps = fused_linear_logprobs(ref_hidden, ref.lm_head.weight, targets, backend="torch").sum(-1)
        kl = None
        if loss_type == "kto":
            ids, attention, mask = batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
            sums = []
            for m in (model, ref):
                h, t = shifted(m, ids, attention, mask)
                sums.append(fused_linear_logprobs(h, m.lm_head.weight, t, backend="torch").sum(-1))
            kl = kto_kl(*sums)
            assert float(kl) > 0  # the KL term is exercised
    ours = fused_linear_kto_loss(hidden, model.lm_head.weight, targets, batch["label"].bool(), ref_logps=ref_logps,
                                 kl=kl, loss_type=loss_type, backend=backend, **kw)
    assert_same(model, theirs, ours.loss)


def test_vespo_lambda_floor_matches_trl_gamma_weights():
    """vespo's lambda is floored at 1e-4 as in TRL's ``get_gamma_weights`` (issue #30: a lambda below the floor, with
    sequence weights far from 1, tells a floor of 1e-4 from one of 1e-2)."""
    from fastalign.objectives.grpo import vespo_weights
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[1, 4:] = 0
    log_ratio = torch.tensor([0.4, -0.5, 0.3, -0.35], dtype=torch.float64)[:, None] + 0.05 * torch.randn(
        4, 6, generator=g, dtype=torch.float64)  # sequence log-weights about +-2
    advantages = torch.tensor([1.0, -0.5, -2.0, 0.7], dtype=torch.float64)[:, None]
    config = GRPOLossConfig(loss_type="vespo", vespo_lambda_pos=1e-6, vespo_lambda_neg=3e-5, vespo_k_neg=1.5)
    want = trl.GRPOTrainer.get_gamma_weights(advantages, log_ratio, mask, None, k_pos=config.vespo_k_pos,
                                             lambda_pos=config.vespo_lambda_pos, k_neg=config.vespo_k_neg,
                                             lambda_neg=config.vespo_lambda_neg)
    torch.testing.assert_close(vespo_weights(advantages, log_ratio, mask, None, config), want, rtol=1e-9, atol=0)
