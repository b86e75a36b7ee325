"""README code blocks run as written, read from README.md (so the tests follow the README): the packed-batch snippet
gives the padded batch's losses on the default attention (sdpa) and on eager."""
import re
from pathlib import Path

import pytest
import torch

from fastalign import fused_linear_dpo_loss, fused_linear_grpo_loss, hf
from fastalign.trainers.data import collate_pairs, tokenize_pair
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import tiny_llama, word_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
TASK = CountingTask()


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = README.read_text()
    assert heading in text, heading
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_packed_snippet_gives_the_padded_batchs_losses(attention):
    tokenizer = word_tokenizer(TASK.words)
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64, attn_implementation=attention)
    pairs = [tokenize_pair(tokenizer, r, 32, 16) for r in TASK.preference_data(3, seed=1)]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)  # [6, T]: chosen 1..3, rejected 1..3, right-padded
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1
    inputs = dict(model=model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"], advantages=torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0, 0.5]),
                  ref_chosen=torch.tensor([-9.0, -12.0, -7.5]), ref_rejected=torch.tensor([-11.0, -8.0, -10.0]),
                  fused_linear_grpo_loss=fused_linear_grpo_loss, fused_linear_dpo_loss=fused_linear_dpo_loss)
    namespace = dict(inputs)
    exec(readme_block("### Packed (padding-free) batches"), namespace)
    padded = hf.causal_lm_parts(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    grpo = fused_linear_grpo_loss(padded.hidden, padded.weight, padded.targets, inputs["advantages"],
                                  loss_type="grpo")
    dpo = fused_linear_dpo_loss(padded.hidden, padded.weight, padded.targets, ref_chosen_logps=inputs["ref_chosen"],
                                ref_rejected_logps=inputs["ref_rejected"])
    torch.testing.assert_close(namespace["grpo"].loss, grpo.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(namespace["dpo"].loss, dpo.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(namespace["dpo"].chosen_logps, dpo.chosen_logps, rtol=1e-5, atol=1e-5)
