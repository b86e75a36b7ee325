"""What the vocab-parallel tests share: uneven vocabulary splits, the problem, its float64 leaves, the comparison of
the ranks' results."""
from __future__ import annotations

import torch

SHARDS = {2: [50, 47], 4: [300, 250, 251, 200]}  # uneven vocabulary splits, V = 97 and V = 1001
WIDTH = 16


def problem(sizes: list[int]) -> dict[str, torch.Tensor]:
    """The same inputs on every rank and in the parent: 2 DPO pairs (``[4, 6]`` tokens), the full lm_head of the
    vocabulary split into shards of ``sizes``."""
    vocab = sum(sizes)
    gen = torch.Generator().manual_seed(vocab)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    targets = torch.randint(0, vocab, (4, 6), generator=gen)
    targets[:, 0] = -100  # prompt
    targets[1, 4:] = -100  # padding
    targets[0, 1:4] = torch.tensor([0, vocab - 1, vocab - sizes[-1]])  # the first and last ids, the last shard's first
    return dict(hidden=randn(4, 6, WIDTH), weight=randn(vocab, WIDTH) / WIDTH ** 0.5, bias=randn(vocab),
                targets=targets, g_lp=randn(4, 6), g_ent=randn(4, 6), old=-3 + randn(4, 6), adv=randn(4, 6),
                ref_lp=-3 + randn(4, 6), mask=torch.rand(4, 6, generator=gen) > 0.2, vhead=randn(WIDTH),
                vbias=randn(()), old_values=randn(4, 6), returns=randn(4, 6), ref_hidden=randn(4, 6, WIDTH),
                ref_weight=randn(vocab, WIDTH) / WIDTH ** 0.5, ref_bias=randn(vocab), ref_logps=-20 + randn(4),
                # small integers, exact logits; the first shard's columns recur in the others: ties across shards
                int_hidden=torch.randint(-2, 3, (4, 6, WIDTH), generator=gen).float(),
                int_weight=torch.randint(-2, 3, (sizes[0], WIDTH), generator=gen).float().repeat(4, 1)[:vocab])


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def compare_ranks(ranks: list[dict], want: dict[str, torch.Tensor], checked_above=lambda key: False) -> None:
    """Every rank's outputs (``run_ops``-style keys) against the single-process ``want``: ``/dw`` and ``/db`` keys
    against the rank's slice, ``/dh_partial`` summed over ranks, any other the same on every rank bit for bit and
    close to ``want`` (unless ``checked_above(key)``: near-ties of an argmax)."""
    assert all(set(r["outputs"]) == set(want) for r in ranks)
    for key, value in want.items():
        if key.endswith(("/dw", "/db")):
            for r in ranks:
                assert_close(r["outputs"][key], value[r["rows"]], f"{key} rank {r['rows']}")
        elif key.endswith("/dh_partial"):
            assert_close(sum(r["outputs"][key] for r in ranks), value, f"{key} summed over ranks")
            assert not torch.equal(ranks[0]["outputs"][key], value), f"{key}: rank 0 holds the whole gradient"
        else:
            for r in ranks:  # the same on every rank, bit for bit
                assert torch.equal(r["outputs"][key], ranks[0]["outputs"][key]), f"{key} differs across ranks"
            if not checked_above(key):
                assert_close(ranks[0]["outputs"][key], value, key)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """fp32 against fp32: a few ulps of the tensor's own magnitude."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(scale, 1e-3), msg=lambda m: f"{what}: {m}")
