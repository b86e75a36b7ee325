"""Hugging Face glue: hidden states and lm_head from transformers causal LMs without the lm_head forward; value head."""
import os

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from fastalign import fused_linear_logprobs, hf

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def lora(model, **kwargs):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kwargs)
    return peft.get_peft_model(model, config)


MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                               bos_token_id=0, eos_token_id=1)),
    "llama-lora": lambda: lora(LlamaForCausalLM(LlamaConfig(**COMMON))),
}


def fail_on_lm_head(model):
    def fail(*_):
        raise AssertionError("lm_head forward called")

    return hf.unwrap_model(model).get_output_embeddings().register_forward_hook(fail)


def batch():
    """Two rows of 10 tokens, the second right-padded after 7 tokens."""
    input_ids = torch.randint(2, V, (2, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    return input_ids, attention_mask


def logits_logprobs(model, input_ids, attention_mask, targets):
    """Reference: log-softmax of the model's own logits, shifted."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=hf.position_ids_from_mask(attention_mask)).logits[:, :-1]
    valid = targets != -100
    logp = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(valid, logp, 0.0)


@pytest.mark.parametrize("name", list(MODELS))
def test_logprobs_from_hidden_match_the_models_logits(name):
    model = MODELS[name]().eval()
    input_ids, attention_mask = batch()
    handle = fail_on_lm_head(model)
    parts = hf.causal_lm_parts(model, input_ids, attention_mask)
    logprobs = fused_linear_logprobs(parts.hidden, parts.weight, parts.targets, bias=parts.bias)
    handle.remove()
    assert parts.hidden.shape == (2, 9, 32) and parts.targets.shape == (2, 9)
    assert torch.equal(parts.targets[0], input_ids[0, 1:])
    assert (parts.targets[1, 6:] == -100).all() and torch.equal(parts.targets[1, :6], input_ids[1, 1:7])
    reference = logits_logprobs(model, input_ids, attention_mask, parts.targets)
    torch.testing.assert_close(logprobs, reference, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_backbone_and_the_tied_embedding():
    model = MODELS["llama-tied"]()
    input_ids, attention_mask = batch()
    parts = hf.causal_lm_parts(model, input_ids, attention_mask)
    assert parts.weight is model.model.embed_tokens.weight
    fused_linear_logprobs(parts.hidden, parts.weight, parts.targets, bias=parts.bias).sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_lm_head_bias_is_used():
    model = MODELS["llama"]().eval()
    model.lm_head = nn.Linear(32, V, bias=True)
    nn.init.normal_(model.lm_head.bias, std=2.0)
    input_ids, attention_mask = batch()
    parts = hf.causal_lm_parts(model, input_ids, attention_mask)
    assert parts.bias is model.lm_head.bias
    logprobs = fused_linear_logprobs(parts.hidden, parts.weight, parts.targets, bias=parts.bias)
    torch.testing.assert_close(logprobs, logits_logprobs(model, input_ids, attention_mask, parts.targets),
                               rtol=1e-5, atol=1e-5)


def test_left_padding_gives_the_hidden_states_of_the_unpadded_row():
    model = MODELS["gpt2"]().eval()  # absolute positions: padding must not shift them
    row = torch.randint(2, V, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    torch.testing.assert_close(hf.hidden_states(model, padded, mask)[:, 3:], hf.hidden_states(model, row),
                               rtol=1e-5, atol=1e-5)


def test_labels_shift_and_padding():
    input_ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert hf.shifted_labels(input_ids, mask).tolist() == [[6, 7, 8], [6, -100, -100]]
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 6, -100, -100]])
    assert hf.shifted_labels(input_ids, mask, labels).tolist() == [[-100, 7, 8], [6, -100, -100]]


TRANSFORMED = {  # models that transform their logits after the lm_head, small enough that the transform matters
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **COMMON, head_dim=8, final_logit_softcapping=0.5)),
    "cohere": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**COMMON, logit_scale=3.0)),
    "granite": lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(**COMMON, logits_scaling=0.25)),
}
EXPECTED_TRANSFORMS = {"gemma2": hf.LogitTransform(1.0, 0.5), "cohere": hf.LogitTransform(3.0, None),
                       "granite": hf.LogitTransform(4.0, None)}


@pytest.mark.parametrize("name", list(TRANSFORMED))
def test_transformed_logits_match_the_models_logits(name):
    """Gemma 2's soft-cap, Cohere's scale, Granite's divisor: read from the config, the fused log-probs and entropy
    equal the log-softmax of the model's own logits."""
    model = TRANSFORMED[name]().eval()
    with torch.no_grad():  # logits of a few units (random init gives ~0.01): the transform bends them
        model.get_output_embeddings().weight.mul_(30.0)
    input_ids, attention_mask = batch()
    parts = hf.causal_lm_parts(model, input_ids, attention_mask)
    assert parts.transform == EXPECTED_TRANSFORMS[name]
    logprobs = fused_linear_logprobs(parts.hidden, parts.weight, parts.targets, bias=parts.bias,
                                     **parts.transform._asdict())
    torch.testing.assert_close(logprobs, logits_logprobs(model, input_ids, attention_mask, parts.targets),
                               rtol=1e-5, atol=1e-5)
    plain = fused_linear_logprobs(parts.hidden, parts.weight, parts.targets, bias=parts.bias)  # the transform matters
    assert (plain - logprobs).abs().max() > 0.1


def test_logit_transforms_it_cannot_reproduce_are_refused():
    model = MODELS["llama"]()
    assert hf.logit_transform(model) == hf.LogitTransform()
    model.config.logit_scale, model.config.logits_scaling = 2.0, 3.0
    with pytest.raises(ValueError, match=r"sets both config.logit_scale=2.0 and config.logits_scaling=3.0"):
        hf.logit_transform(model)
    model.config.logits_scaling = 1.0  # neutral: ignored
    assert hf.logit_transform(model) == hf.LogitTransform(2.0, None)
    model.config.final_logit_softcapping = -1.0
    with pytest.raises(ValueError, match=r"config.final_logit_softcapping: expected a positive finite number, got -1"):
        hf.logit_transform(model)
    model.config.final_logit_softcapping, model.config.model_type = 30.0, "hyperclovax"  # multiplies
    model.config.logit_scale, model.config.logits_scaling = None, 0.5
    assert hf.logit_transform(model) == hf.LogitTransform(0.5, 30.0)


def test_adapted_lm_head_is_refused():
    peft = pytest.importorskip("peft")
    adapted = peft.get_peft_model(LlamaForCausalLM(LlamaConfig(**COMMON)),
                                  peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="target_modules"):
        hf.get_lm_head(adapted)


@pytest.mark.parametrize("name", ["llama", "llama-tied", "llama-lora"])
def test_value_head_saves_and_loads_with_the_model(tmp_path, name):
    model = MODELS[name]()
    head = hf.attach_value_head(model)
    assert hf.get_value_head(model) is head and hf.attach_value_head(model) is head
    assert any(p is head.weight for p in model.parameters())  # trains with the model
    with torch.no_grad():
        head.weight.normal_()
        head.bias.fill_(0.5)
    hidden = torch.randn(3, 5, 32)
    values = head(hidden)
    assert values.shape == (3, 5)
    hf.save_pretrained(model, str(tmp_path))
    assert os.path.exists(tmp_path / hf.VALUE_HEAD_FILE)
    if name != "llama-lora":  # the model file stays a plain transformers checkpoint
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert not any(k.startswith("value_head") for k in f.keys())
        loaded = hf.load_pretrained(str(tmp_path))
        torch.testing.assert_close(hf.get_value_head(loaded)(hidden), values)
        torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    # load_weights restores everything in place (resume)
    fresh = MODELS[name]()
    hf.attach_value_head(fresh)
    hf.load_weights(fresh, str(tmp_path))
    torch.testing.assert_close(hf.get_value_head(fresh)(hidden), values)
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        if "lora" in key or name != "llama-lora":  # peft saves its adapters only
            assert torch.equal(a, b), key


def test_load_weights_reports_missing_weights(tmp_path):
    model = MODELS["llama"]()
    model.save_pretrained(str(tmp_path), state_dict={k: v for k, v in model.state_dict().items()
                                                     if "layers.1." not in k})
    with pytest.raises(ValueError, match="lacks weights"):
        hf.load_weights(MODELS["llama"](), str(tmp_path))
