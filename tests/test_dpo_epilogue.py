"""The DPO epilogue kernel under the Triton interpreter (CPU, TRITON_INTERPRET=1 set by conftest), in fp32.

The per-token lse and target logit, and the per-sequence sums of the log-probs, against a float64 merge of the
split partials and an `index_add_` written here.
"""
import pytest
import torch

from fastalign.kernels.dpo_epilogue import dpo_sequence_sums
from fastalign.kernels.lse_forward import LsePartials
from reference import random_split_partials

IGNORE = -100


def reference(p: LsePartials, targets: torch.Tensor, seq_ids: torch.Tensor, num_sequences: int):
    """lse = logsumexp_s(max_s + log sumexp_s) in float64; sums = index_add_ of the log-probs (0 at ignored rows)."""
    lse = torch.logsumexp(p.max.double() + p.sumexp.double().log(), 0)
    target = p.target_logit.double().sum(0)
    logp = torch.where(targets != IGNORE, target - lse, 0.0)
    sums = torch.zeros(num_sequences, dtype=torch.float64).index_add_(0, seq_ids, logp)
    return lse, target, sums


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("n,num_sequences", [(1, 1), (1, 4), (37, 1), (37, 6), (100, 9)])
def test_matches_float64_merge_and_index_add(n, num_sequences, splits):
    partials, targets = random_split_partials(n, splits, ignore_index=IGNORE, with_sum_pz=False)
    # Sequences as contiguous runs (pair by pair in the op) plus some shuffled tokens; the last sequence may be empty.
    seq_ids = torch.sort(torch.randint(0, max(num_sequences - 1, 1), (n,))).values
    seq_ids[::7] = torch.randint(0, num_sequences, (len(seq_ids[::7]),))
    lse, target, sums = dpo_sequence_sums(partials, targets, seq_ids, num_sequences, ignore_index=IGNORE)
    ref_lse, ref_target, ref_sums = reference(partials, targets, seq_ids, num_sequences)
    assert lse.dtype == target.dtype == sums.dtype == torch.float32
    assert sums.shape == (num_sequences,)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target.double(), ref_target, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5 * n)


def test_all_ignored_rows_give_zero_sums():
    partials, targets = random_split_partials(37, 3, ignore_index=IGNORE, with_sum_pz=False)
    targets[:] = IGNORE
    seq_ids = torch.arange(37) % 4
    lse, _, sums = dpo_sequence_sums(partials, targets, seq_ids, 4, ignore_index=IGNORE)
    assert torch.equal(sums, torch.zeros(4))
    torch.testing.assert_close(lse.double(), reference(partials, targets, seq_ids, 4)[0], rtol=1e-5, atol=1e-6)


def test_no_tokens():
    partials = LsePartials(*(torch.zeros(2, 0) for _ in range(2)), None, torch.zeros(2, 0))
    lse, target, sums = dpo_sequence_sums(partials, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                          3, ignore_index=IGNORE)
    assert lse.shape == target.shape == (0,) and torch.equal(sums, torch.zeros(3))
