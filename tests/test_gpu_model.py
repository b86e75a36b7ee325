"""The GPU cost model's arithmetic on tiny cases computed by hand here (the model's numbers are estimates; these tests
check that it counts what its docstring says it counts, from the kernels' actual tile constants)."""
import pytest
import torch

from fastalign import gpu_model as gm
from fastalign.kernels.logprobs_backward import logit_grad_config, logprobs_backward_config
from fastalign.kernels.lse_forward import lse_forward_config
from fastalign.kernels.matmul import is_aligned, matmul_config

BIG_L2 = gm.GPU(sms=4, l2_bytes=10**12)


def test_traffic_shares_blocks_within_a_wave_and_keeps_them_in_l2_when_they_fit():
    # Four programs of one visit each, two per wave: (a0, b0), (a1, b0) | (a0, b1), (a1, b1); a = 10 B, b = 100 B.
    programs = [[(("a", 0), ("b", 0))], [(("a", 1), ("b", 0))], [(("a", 0), ("b", 1))], [(("a", 1), ("b", 1))]]
    size = {"a": 10, "b": 100}
    # L2: every block of every visit, 4 * 110. HBM, wave 1: {a0, a1, b0} = 120; wave 2: {a0, a1, b1} = 120, of
    # which only b1 (100) is new when the previous 120 bytes fit in half the L2.
    fits = gm.traffic(programs, lambda k: size[k[0]], gm.GPU(sms=2, l2_bytes=240))
    spills = gm.traffic(programs, lambda k: size[k[0]], gm.GPU(sms=2, l2_bytes=239))
    assert fits == (220, 440)
    assert spills == (240, 440)


def test_lockstep_steps_within_one_program():
    # One program, three visits: (a0), (a0), (a1): a0 reused across steps when it fits, 10 + 0 + 10 bytes.
    programs = [[(("a", 0),), (("a", 0),), (("a", 1),)]]
    assert gm.traffic(programs, lambda k: 10, gm.GPU(sms=1, l2_bytes=40)) == (20, 30)
    assert gm.traffic(programs, lambda k: 10, gm.GPU(sms=1, l2_bytes=19)) == (30, 30)


def test_swizzle2d_matches_grouped_ordering():
    # 3 x 2 grid, groups of 2 rows: (0,0) (1,0) (0,1) (1,1), then the last lone row (2,0) (2,1).
    order = [gm.swizzle2d(pid // 2, pid % 2, 3, 2, 2) for pid in range(6)]
    assert order == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (2, 1)]


def test_estimate_picks_the_slowest_resource():
    gpu = gm.GPU()
    cost = gm.LaunchCost("p", "k", flops=989e9, hbm_bytes=2 * 3.35e9, l2_bytes=0, atomics=0)
    times = cost.times(gpu, torch.bfloat16)
    assert times["compute"] == pytest.approx(1e-3) and times["HBM"] == pytest.approx(2e-3)
    assert cost.estimate(gpu, torch.bfloat16) == (pytest.approx(2e-3), "HBM")
    # fp32 inputs: 3xTF32, a third of the TF32 rate: 495e12 / 3 FLOP/s.
    assert cost.times(gpu, torch.float32)["compute"] == pytest.approx(989e9 * 3 / 495e12)


def test_lse_forward_grouped_order_by_hand():
    """N=2048, H=64, V=128, bf16, 16 SMs, 400 kB of L2: 16 token blocks of 128 rows, 2 vocab tiles of 64. The
    default split gives 2 splits of one tile (2 programs per SM wanted: 32 programs). Grouped order, 8 token blocks
    per group: wave 1 is token blocks 0-7 against both splits (147 kB, fits in half the L2), wave 2 blocks 8-15, so
    each hidden block is fetched once. Token blocks fastest, a wave would be all 16 blocks against one split
    (270 kB, does not fit) and each hidden block would be fetched twice."""
    cfg = lse_forward_config(torch.bfloat16, h=64)
    assert (cfg.BLOCK_N, cfg.BLOCK_V, cfg.GROUP_N) == (128, 64, 8), "the hand numbers below assume these tiles"
    c = gm.lse_forward_cost(gm.Problem(2048, 64, 128), gm.GPU(sms=16, l2_bytes=400_000), deterministic=False,
                            pass_name="f")
    hidden_block, weight_tile, partials = 128 * 64 * 2, 64 * 64 * 2, 4 * 4 * 2 * 2048
    assert c.kernel == "lse_forward (2 vocab splits)"
    assert c.hbm_bytes == 16 * hidden_block + 2 * weight_tile + partials
    assert c.l2_bytes == 32 * (hidden_block + weight_tile) + partials
    assert c.flops == 2 * 2048 * 128 * 64


def test_atomic_backward_by_hand():
    """N=256, H=64, V=128, bf16: the 16-bit backward tile is 128 x 64 (x 32 of H), so 2 x 2 = 4 tiles."""
    cfg = logprobs_backward_config(torch.bfloat16, h=64, arch=BIG_L2.arch)
    assert (cfg.BLOCK_N, cfg.BLOCK_V, cfg.BLOCK_H) == (128, 64, 32), "the hand numbers below assume these tiles"
    c = gm.atomic_backward_cost(gm.Problem(256, 64, 128), BIG_L2, pass_name="b")
    assert c.flops == 3 * 4 * 2 * 128 * 64 * 64  # 3 tile matmuls per tile
    assert c.atomics == 4 * (128 + 64) * 64  # one per d hidden and d weight element of each tile
    # One wave of 4: hidden blocks 2 x 128*64*2 B, weight tiles 2 x 64*64*2 B, d hidden 2 x 8*128*64 B (fp32 read
    # and write), d weight 2 x 8*64*64 B.
    assert c.hbm_bytes == 2 * 16384 + 2 * 8192 + 2 * 65536 + 2 * 32768
    assert c.l2_bytes == 2 * 4 * (16384 + 8192)  # both blocks, twice per tile (logits, then the products)


def test_atomic_free_backward_by_hand():
    """N=256, H=128, V=128, bf16: the same 3 matmuls of 2*N*V*H FLOPs each, in three launches, and no atomic; the
    16-bit logit-gradient and (aligned) matmul tiles are 128 x 128."""
    lg, mm = logit_grad_config(torch.bfloat16, h=128), matmul_config(torch.bfloat16, arch=BIG_L2.arch, p=128)
    assert (lg.BLOCK_N, lg.BLOCK_V, mm.BLOCK_M, mm.BLOCK_P, mm.BLOCK_K) == (128, 128, 128, 128, 32)
    costs = gm.atomic_free_backward_cost(gm.Problem(256, 128, 128), BIG_L2, pass_name="b")
    assert [c.flops for c in costs] == [2 * 256 * 128 * 128] * 3
    assert all(c.atomics == 0 for c in costs)
    # logit_grad: hidden blocks 2 x 128*128*2 B, one weight tile 128*128*2 B, all in one wave; dz written 256*128*2 B.
    assert costs[0].hbm_bytes == 2 * 32768 + 32768 + 256 * 128 * 2
    # d hidden [256, 128] = dz [256, 128] @ W [128, 128]: A rows 2 x 128*128*2 B, B columns 1 x 128*128*2 B, written
    # fp32 4 * 256 * 128 B. d weight [128, 128] += dz.T @ h [256, 128]: A 1 x 128*256*2, B 1 x 128*256*2, fp32
    # read and written 8 * 128 * 128 B.
    assert costs[1].hbm_bytes == 2 * 32768 + 32768 + 4 * 256 * 128
    assert costs[2].hbm_bytes == 65536 + 65536 + 8 * 128 * 128
    # L2: each program's blocks once (d hidden: 2 programs of A + B; d weight: 1 program).
    assert costs[1].l2_bytes == 2 * (32768 + 32768) + 4 * 256 * 128


def test_matmul_tiles_follow_the_runtime_alignment():
    """128 x 128 16-bit tiles only where Triton specializes the strides (1 or multiples of 16) and pointers; the
    cost model takes the same tiles for H and V multiples of 16."""
    x = torch.empty(64, 48)
    assert is_aligned(x, x.T, x[16:32])
    assert not is_aligned(torch.empty(64, 47)) and not is_aligned(x[:, 1:])  # 4-byte offset
    assert matmul_config(torch.bfloat16, arch=90, p=4096, aligned=False).BLOCK_P == 64
    odd = gm.atomic_free_backward_cost(gm.Problem(256, 128, 127), BIG_L2, pass_name="b")
    assert odd[1].l2_bytes == 2 * 2 * (128 * 127 * 2 + 64 * 127 * 2) + 4 * 256 * 128  # 2 x 2 programs of 128 x 64


def test_wide_outputs_take_128_x_256_matmul_tiles():
    """16-bit aligned products with at least 256 output columns take 128 x 256 tiles (sm_90: BLOCK_K 64, sm_80: 32);
    narrower ones (d bias: 1 column) keep 128 x 128. N=256, H=256, V=128, bf16: d hidden [256, 256] = dz [256, 128]
    @ W [128, 256] is 2 programs, each loading its A rows 128*128*2 B and all of B 128*256*2 B."""
    tiles = {arch: matmul_config(torch.bfloat16, arch=arch, p=256) for arch in (80, 90)}
    assert [(c.BLOCK_M, c.BLOCK_P, c.BLOCK_K) for c in tiles.values()] == [(128, 256, 32), (128, 256, 64)]
    assert (matmul_config(torch.bfloat16, arch=90, p=1).BLOCK_P, matmul_config(torch.float32, arch=90, p=256).BLOCK_P) \
        == (128, 64)
    costs = gm.atomic_free_backward_cost(gm.Problem(256, 256, 128), BIG_L2, pass_name="b")
    assert costs[1].l2_bytes == 2 * (128 * 128 * 2 + 128 * 256 * 2) + 4 * 256 * 256
    assert costs[1].flops == 2 * 256 * 256 * 128


def test_render_labels_estimates():
    table = gm.render(gm.Problem(256, 64, 128))
    assert "ESTIMATES" in table and "(assumed)" in table
    assert "backward, atomics" in table and "backward, atomic-free" in table


def test_bench_gpu_model_command(capsys):
    from fastalign.cli import main

    assert main(["bench", "--gpu-model", "--tokens", "256", "--hidden", "64", "--vocab", "128"]) == 0
    out = capsys.readouterr().out
    assert "N=256, H=64, V=128, bfloat16" in out and "| log-prob backward |" in out
