"""Split-KV decode attention against the plain-torch reference.

CPU runs go through Triton's interpreter, so shapes are tiny; bf16 and the canonical
benchmark shapes are checked on the GPU.
"""

import os

import pytest
import torch
import triton
import triton.language as tl

from kernels import decode_attention as da
from kernels import reference
from tests.kernels.numerics import rel_l2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_inputs(B, C, H_q, H_kv, D, seq_lens, dtype, seed=0):
    """Random q and caches; cache slots at or past each row's length hold NaN, so any read of
    a dead position (or any use of one) shows up in the output."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H_q, D, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(B, C, H_kv, D, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(B, C, H_kv, D, generator=g).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    dead = torch.arange(C, device=DEVICE)[None, :] >= lens.clamp(min=0)[:, None]  # [B, C]
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[dead] = float("nan")
    v_poisoned[dead] = float("nan")
    return q, k, v, k_poisoned, v_poisoned, lens


def run_and_check(B, C, H_q, H_kv, D, seq_lens, dtype, config=None, scale=None):
    q, k, v, k_poisoned, v_poisoned, lens = make_inputs(B, C, H_q, H_kv, D, seq_lens, dtype)
    out = torch.full((B, H_q, D), float("nan"), dtype=dtype, device=DEVICE)
    result = da.decode_attention(q, k_poisoned, v_poisoned, lens, scale, out=out, config=config)
    expected = reference.decode_attention(q, k, v, lens, scale)
    assert result is out
    assert not out.isnan().any(), "unwritten or NaN-polluted output elements"
    live = lens > 0
    if live.any():
        err = rel_l2(out[live], expected[live])
        assert err < TOLERANCE[dtype], f"relative L2 error {err:.2e}"
    assert (out[~live] == 0).all(), "dead rows must be exactly zero"
    return out


# (B, C, H_q, H_kv, D, seq_lens): C is never a multiple of a block size unless noted.
CASES = {
    "gqa2-mixed-lengths": (4, 37, 4, 2, 64, [1, 37, 0, 20]),  # length 1, full slab, dead row
    "gqa7-qwen-heads": (2, 45, 14, 2, 64, [45, 17]),
    "mha-group1": (2, 29, 2, 2, 64, [29, 3]),
    "mqa-d128": (2, 40, 8, 1, 128, [33, 40]),
    "gqa4-d80": (2, 21, 4, 1, 80, [21, 9]),
    "gqa2-d96": (1, 19, 2, 1, 96, [19]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference_with_default_config(case, dtype):
    run_and_check(*CASES[case], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_head_dim_256(dtype):
    run_and_check(2, 20, 2, 1, 256, [20, 7], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_one_row_many_splits_merges(dtype):
    """B=1 over several splits: the merge kernel combines partials, and with seq_len well
    below C some splits are empty (their partials are never written)."""
    config = da.DecodeConfig(block_n=16, num_splits=8, num_warps=4, num_stages=2)
    run_and_check(1, 150, 4, 2, 64, [150], dtype, config=config)
    run_and_check(1, 150, 4, 2, 64, [40], dtype, config=config)


def test_short_row_layout_at_d128_matches_reference():
    """The layout of short D = 128 rows (32-position tiles, two warps, three stages): a partial
    last tile, a row of one position, a dead row."""
    config = da.DecodeConfig(block_n=32, num_splits=1, num_warps=2, num_stages=3)
    run_and_check(4, 75, 8, 2, 128, [75, 1, 0, 40], torch.float16, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", [80, 256])
def test_merge_drops_unwritten_partials_of_empty_splits(monkeypatch, D, dtype):
    """The merge loads every split's partial output with its weight and drops the empty
    splits' (never written) by their -inf weight: partial buffers poisoned with NaN, short
    rows leaving most of 8 splits empty, a dead row, head dims over several merge blocks."""
    alloc = da._alloc_partials
    monkeypatch.setattr(da, "_alloc_partials",
                        lambda *a: tuple(t.fill_(float("nan")) for t in alloc(*a)))
    config = da.DecodeConfig(block_n=16, num_splits=8, num_warps=4, num_stages=2)
    assert da.merge_launch_meta(config, D)["BLOCK_D"] < D
    run_and_check(3, 150, 4, 2, D, [40, 0, 150], dtype, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_path_mixed_and_dead_rows(dtype):
    config = da.DecodeConfig(block_n=16, num_splits=4, num_warps=4, num_stages=2)
    run_and_check(4, 70, 14, 2, 64, [70, 0, 1, 33], dtype, config=config)


NEW_TOKEN_CASES = {
    # (B, C, H_q, H_kv, D, seq_lens, config): the new token at slot seq_lens - 1
    "gqa2-dead-and-first-slot": (4, 37, 4, 2, 64, [1, 37, 0, 20], None),
    "gqa7-splits": (3, 45, 14, 2, 64, [45, 17, 30],
                    da.DecodeConfig(block_n=16, num_splits=3, num_warps=4, num_stages=2)),
    "d80-short-splits": (2, 64, 8, 2, 80, [64, 33],
                         da.DecodeConfig(block_n=16, num_splits=4, num_warps=2, num_stages=1,
                                         merge_pdl=True, evict_first=True)),
    "mqa-d128-sorted": (3, 40, 8, 1, 128, [12, 40, 39],
                        da.DecodeConfig(block_n=16, num_splits=1, num_warps=4, num_stages=2,
                                        longest_first=True)),
    # the split paths with a dead row and a row whose only position is the new token
    "gqa7-splits-dead-and-first-slot": (4, 45, 14, 2, 64, [0, 1, 45, 20],
                                        da.DecodeConfig(block_n=16, num_splits=4, num_warps=4,
                                                        num_stages=2)),
    "mqa-sorted-splits-dead-and-first-slot": (4, 40, 7, 1, 64, [1, 0, 40, 26],
                                              da.DecodeConfig(block_n=16, num_splits=3,
                                                              num_warps=4, num_stages=2,
                                                              longest_first=True)),
}


@pytest.mark.parametrize("deferred_norm", [False, True], ids=["normed", "deferred-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(NEW_TOKEN_CASES), ids=list(NEW_TOKEN_CASES))
def test_new_token_matches_rope_write_then_attention(case, dtype, deferred_norm):
    """RoPE and the slab write inside the kernel (NewToken) against the reference's
    rope_kv_write then decode_attention: the same output, the same slab — the new token's slot
    of each live row written, every other slot (poisoned with NaN past the length) untouched."""
    from kernels.rope_table import rope_cos_sin

    B, C, H_q, H_kv, D, seq_lens, config = NEW_TOKEN_CASES[case]
    q, k_slab, v_slab, k_poisoned, v_poisoned, lens = make_inputs(B, C, H_q, H_kv, D, seq_lens,
                                                                  dtype)
    g = torch.Generator().manual_seed(1)
    k_new, v_new = (torch.randn(B, H_kv, D, generator=g).to(dtype).to(DEVICE) for _ in "kv")
    x = (torch.randn(B, 96, generator=g) * 3).to(dtype).to(DEVICE) if deferred_norm else None
    cos, sin = (t.to(DEVICE) for t in rope_cos_sin(D, C + 3, 10000.0))

    expected_k, expected_v, q_rotated = k_poisoned.clone(), v_poisoned.clone(), q.clone()
    reference.rope_kv_write(q_rotated, k_new.clone(), v_new.clone(), expected_k, expected_v,
                            lens - 1, cos, sin, norm_input=x, eps=1e-5)
    expected = reference.decode_attention(q_rotated, expected_k.nan_to_num(),
                                          expected_v.nan_to_num(), lens)

    out = torch.full((B, H_q, D), float("nan"), dtype=dtype, device=DEVICE)
    new_token = da.NewToken(k_new, v_new, cos, sin, x, 1e-5)
    q_before = q.clone()
    da.decode_attention(q, k_poisoned, v_poisoned, lens, out=out, config=config,
                        new_token=new_token)
    assert torch.equal(q, q_before), "the caller's q was rotated in place"
    live = lens > 0
    assert not out.isnan().any()
    assert rel_l2(out[live], expected[live]) < TOLERANCE[dtype]
    assert (out[~live] == 0).all()
    for got, want in ((k_poisoned, expected_k), (v_poisoned, expected_v)):
        same = (got == want) | (got.isnan() & want.isnan())
        written = torch.zeros_like(same)
        written[live.nonzero()[:, 0], (lens - 1)[live].long()] = True
        assert same[~written].all(), "a slot other than the new token's changed"
        assert torch.allclose(got[written].float(), want[written].float(), rtol=1e-6, atol=1e-6)


def test_new_token_rejects_mismatched_inputs():
    q, k, v, _, _, lens = make_inputs(2, 16, 4, 2, 64, [16, 3], torch.float32)
    cos = sin = torch.zeros(20, 32, device=DEVICE)
    k_new = torch.zeros(2, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="k and v must both be"):
        da.decode_attention(q, k, v, lens, new_token=da.NewToken(k_new, k_new[:, :1], cos, sin))
    with pytest.raises(ValueError, match="cos must be a contiguous fp32"):
        da.decode_attention(q, k, v, lens, new_token=da.NewToken(k_new, k_new, cos[:, :16], sin))
    with pytest.raises(ValueError, match="norm_input"):
        da.decode_attention(q, k, v, lens,
                            new_token=da.NewToken(k_new, k_new, cos, sin, torch.zeros(3, 8)))


def test_unpipelined_evict_first_loads_match_reference():
    """The short-split layout (one stage, evict-first K/V loads): two tiles per split, a
    partial last tile, a dead row."""
    config = da.DecodeConfig(block_n=16, num_splits=4, num_warps=2, num_stages=1,
                             merge_pdl=True, evict_first=True)
    run_and_check(3, 128, 8, 2, 64, [128, 0, 77], torch.float16, config=config)


@pytest.mark.parametrize("B,C,D,dtype,short", [
    (1, 8192, 128, torch.bfloat16, True),  # 512 splits of two 64-position tiles
    (8, 1024, 128, torch.bfloat16, True),
    (2, 8192, 128, torch.float16, True),  # big tiles, still two per split
    (1, 8192, 64, torch.bfloat16, True),
    (1, 1024, 128, torch.bfloat16, False),  # 64 programs: too few to fill the GPU
    (64, 2048, 128, torch.bfloat16, False),  # no splits
    (16, 2048, 128, torch.bfloat16, False),  # splits of four tiles
    (1, 8192, 128, torch.float32, False),  # parity caches keep their layout
])
def test_many_short_splits_load_unpipelined_with_evict_first(B, C, D, dtype, short):
    c = da.decode_config(B, C, 32, 8, D, dtype, 132)
    assert c.evict_first == short
    if short:
        assert c.num_stages == 1 and c.num_splits > 1 and C <= 2 * c.block_n * c.num_splits
        assert B * 8 * c.num_splits >= da.PROGRAMS_PER_SM_TARGET * 132
    else:
        assert c.num_stages > 1 or dtype == torch.float32


def test_merge_never_reads_unwritten_partials(monkeypatch):
    """Partials of empty splits stay unwritten; poisoning them proves the merge skips them."""
    def nan_partials(B, H_q, splits, D, device):
        return (torch.full((B, H_q, splits, D), float("nan"), device=device),
                torch.full((B, H_q, splits), float("nan"), device=device))

    monkeypatch.setattr(da, "_alloc_partials", nan_partials)
    config = da.DecodeConfig(block_n=16, num_splits=8, num_warps=4, num_stages=2)
    run_and_check(3, 64, 4, 2, 64, [5, 0, 64], torch.float32, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("splits", [1, 3])
def test_longest_first_matches_reference(splits, dtype):
    """Rows run in sorted order (ties, dead rows, a row longer than the slab clamps to C) and
    every (row, head, split) still lands in its own output."""
    config = da.DecodeConfig(block_n=16, num_splits=splits, num_warps=4, num_stages=2,
                             longest_first=True)
    run_and_check(6, 40, 4, 2, 64, [7, 40, 0, 7, 1, 33], dtype, config=config)


@triton.jit
def _ranked_rows_kernel(seq_lens_ptr, ranks_ptr, rows_ptr, batch, capacity,
                        ROWS_PAD: tl.constexpr):
    rank = tl.load(ranks_ptr + tl.program_id(0))
    tl.store(rows_ptr + tl.program_id(0),
             da._row_of_rank(seq_lens_ptr, rank, batch, capacity, ROWS_PAD))


@pytest.mark.parametrize("B,rows_pad", [(5, 64), (64, 64), (30, 32)])
def test_row_of_rank_is_the_longest_first_permutation(B, rows_pad):
    """Rank r gets the r-th longest row (lengths clamped to [0, C]; ties: lower row first).
    The interpreter sorts slowly, so a few ranks of each end and the middle are checked."""
    C = 50
    lens = torch.randint(-3, 70, (B,), generator=torch.Generator().manual_seed(B))
    lens[:2] = lens[2]  # a tie
    ranks = sorted({*range(min(B, 6)), *range(max(0, B - 6), B), B // 2})
    rows = torch.full((len(ranks),), -1, dtype=torch.int32, device=DEVICE)
    _ranked_rows_kernel[(len(ranks),)](lens.to(torch.int32).to(DEVICE),
                                       torch.tensor(ranks, dtype=torch.int32, device=DEVICE),
                                       rows, B, C, ROWS_PAD=rows_pad)
    clamped = lens.clamp(0, C).tolist()
    expected = sorted(range(B), key=lambda b: (-clamped[b], b))
    assert rows.tolist() == [expected[r] for r in ranks]


def test_all_rows_dead_give_zeros():
    for splits in (1, 4):
        config = da.DecodeConfig(block_n=16, num_splits=splits, num_warps=4, num_stages=2)
        out = run_and_check(2, 32, 4, 2, 64, [0, 0], torch.float32, config=config)
        assert (out == 0).all()


def test_seq_lens_outside_slab_are_clamped():
    """A length past C reads the whole slab (no out-of-bounds read); a negative one is dead."""
    q, k, v, _, _, _ = make_inputs(2, 24, 4, 2, 64, [24, 0], torch.float32)
    lens = torch.tensor([1000, -1], dtype=torch.int32, device=DEVICE)
    out = da.decode_attention(q, k, v, lens, out=torch.full_like(q, float("nan")))
    expected = reference.decode_attention(q, k, v, torch.tensor([24, 0], dtype=torch.int32,
                                                                device=DEVICE))
    assert rel_l2(out[:1], expected[:1]) < 1e-4
    assert (out[1] == 0).all()


def test_custom_scale():
    run_and_check(2, 30, 4, 2, 64, [30, 11], torch.float32, scale=0.37)


def test_strided_query_and_output_views():
    """q sliced out of a fused qkv projection output, out a slice of a larger buffer."""
    B, C, H_q, H_kv, D = 2, 26, 4, 2, 64
    _, k, v, _, _, lens = make_inputs(B, C, H_q, H_kv, D, [26, 10], torch.float16)
    qkv = torch.randn(B, (H_q + 2 * H_kv) * D, dtype=torch.float16, device=DEVICE)
    q = qkv[:, : H_q * D].view(B, H_q, D)
    assert not q.is_contiguous()
    big_out = torch.full((B, H_q + 3, D), float("nan"), dtype=torch.float16, device=DEVICE)
    out = big_out[:, 1:H_q + 1]
    da.decode_attention(q, k, v, lens, out=out)
    expected = reference.decode_attention(q, k, v, lens)
    assert rel_l2(out, expected) < 5e-3
    assert big_out[:, 0].isnan().all() and big_out[:, H_q + 1:].isnan().all()


class _RecordingLauncher:
    """Stands in for a Triton kernel: records the grid and constexprs, then launches."""

    def __init__(self, name, kernel, calls):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls.append((self.name, grid, tuple(sorted(meta.items()))))
            return self.kernel[grid](*args, **meta)
        return launch


def test_launch_grid_does_not_depend_on_seq_lens(monkeypatch):
    """Two batches of the same (B, C) with different lengths launch identical grids and
    constexprs: one CUDA graph serves the whole bin."""
    calls = []
    for name in ("_decode_split_kernel", "_merge_splits_kernel"):
        monkeypatch.setattr(da, name, _RecordingLauncher(name, getattr(da, name), calls))
    B, C, H_q, H_kv, D = 2, 300, 4, 2, 64
    default = da.decode_config(B, C, H_q, H_kv, D, torch.float32, da.H100_NUM_SMS)
    assert default.num_splits > 1  # the interesting case: two kernels, split work
    launches = []
    for lens in ([300, 5], [0, 171]):
        calls.clear()
        q, k, v, _, _, seq_lens = make_inputs(B, C, H_q, H_kv, D, lens, torch.float32)
        out = da.decode_attention(q, k, v, seq_lens, out=torch.full_like(q, float("nan")))
        live = seq_lens > 0
        expected = reference.decode_attention(q, k, v, seq_lens)
        assert rel_l2(out[live], expected[live]) < 1e-4
        assert (out[~live] == 0).all()
        launches.append(list(calls))
    assert len(launches[0]) == 2
    assert launches[0] == launches[1]


def test_decode_config_fills_the_machine():
    cfg = lambda B, C, H_kv=8: da.decode_config(B, C, 32, H_kv, 128, torch.bfloat16, 132)
    # One row, 8 KV heads: must split to use more than 8 of 132 SMs.
    assert cfg(1, 8192).num_splits * 8 >= 2 * 132
    # A B = 1 decode step of a short slab: splits of 64 positions (16 at C = 1024).
    assert cfg(1, 1024).num_splits == 16 and cfg(1, 768).num_splits == 8
    # Enough (row, head) pairs already: no split, no merge pass.
    assert cfg(256, 1024).num_splits == 1
    for B in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for C in (256, 1024, 4096, 32768):
            c = cfg(B, C)
            assert c.num_splits & (c.num_splits - 1) == 0 and 1 <= c.num_splits <= da.MAX_SPLITS
            # A full-length split spans min_split_positions(C) and a tile (or it is the only
            # one): 64 positions in short slabs, 128 in longer ones.
            min_split = da.min_split_positions(C)
            assert min_split == (64 if C <= da.SHORT_SLAB else da.MIN_SPLIT_POSITIONS)
            assert c.num_splits == 1 or C // c.num_splits >= max(min_split, c.block_n)
            assert c == cfg(B, C)  # pure
            # One row has nothing to order; past MAX_SORTED_ROWS the sort costs more than it saves.
            assert not c.longest_first or 2 <= B <= da.MAX_SORTED_ROWS
            assert c.merge_pdl == (c.num_splits > 1)


@pytest.mark.parametrize("B,C", [(1, 768), (1, 8192), (64, 768), (256, 1024)])
def test_head_dim_does_not_change_the_split_count(B, C):
    """D = 64 and D = 128 cut a (B, C) slab into the same splits; 16-bit tiles stay within
    32 KB (128 x 128); short D = 64 slabs take 32-position tiles on one warp."""
    c64 = da.decode_config(B, C, 32, 8, 64, torch.bfloat16, 132)
    c128 = da.decode_config(B, C, 32, 8, 128, torch.bfloat16, 132)
    assert c64.num_splits == c128.num_splits
    short = C <= da.SHORT_SLAB
    assert (c64.block_n, c64.num_warps) == ((32, 1) if short else (128, 2))
    assert c128.block_n in (32, 64, 128)


# (B, C) -> (block_n, num_warps, num_stages, longest_first) at D = 128, bf16, 132 SMs.
D128_LAYOUTS = {
    (1, 8192): (64, 2, 1, False),  # one row: all splits, short ones unpipelined
    (8, 1024): (64, 2, 1, False),  # 512 programs of a short slab: one wave of small tiles
    (32, 1024): (64, 2, 2, False),  # split in two
    (64, 1024): (32, 2, 3, False),  # short rows, one program per row and head: one wave
    (64, 768): (32, 2, 3, False),
    (128, 1024): (32, 2, 3, False),  # two waves; too many rows to sort
    (64, 2048): (128, 4, 2, True),  # a long slab: two waves of big tiles, longest rows first
    (16, 2048): (128, 4, 2, True),
    (256, 1024): (128, 4, 2, False),  # four or more waves: big tiles
}


@pytest.mark.parametrize("B,C", list(D128_LAYOUTS), ids=[f"B{b}-C{c}" for b, c in D128_LAYOUTS])
def test_d128_tile_layout_follows_waves_and_slab_length(B, C):
    c = da.decode_config(B, C, 32, 8, 128, torch.bfloat16, 132)
    assert (c.block_n, c.num_warps, c.num_stages, c.longest_first) == D128_LAYOUTS[B, C]
    if c.block_n == 32:  # fp16 too; fp32 parity caches keep their layout
        assert da.decode_config(B, C, 32, 8, 128, torch.float16, 132) == c
        assert da.decode_config(B, C, 32, 8, 128, torch.float32, 132).num_warps == 4


def test_bad_inputs_raise_clear_errors():
    q, k, v, _, _, lens = make_inputs(2, 16, 4, 2, 64, [16, 3], torch.float32)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        da.decode_attention(q, k, v, lens.long())
    with pytest.raises(ValueError, match="multiple of H_kv"):
        da.decode_attention(q[:, :3], k, v, lens)
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        da.decode_attention(q, k, v[:, :8], lens)
    with pytest.raises(ValueError, match="dtypes differ"):
        da.decode_attention(q, k, v.half(), lens)
    with pytest.raises(ValueError, match="out must be"):
        da.decode_attention(q, k, v, lens, out=torch.empty(2, 4, 32))
    with pytest.raises(ValueError, match="contiguous last dim"):
        da.decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, lens)
    with pytest.raises(ValueError, match="block_n a power of two"):
        da.decode_attention(q, k, v, lens, config=da.DecodeConfig(24, 1, 4, 2))
    with pytest.raises(ValueError, match="head_dim"):
        da.decode_config(1, 16, 4, 2, 512, torch.float16)
    with pytest.raises(ValueError, match="longest_first sorts at most"):
        big = make_inputs(da.MAX_SORTED_ROWS + 1, 16, 2, 1, 16, [1] * (da.MAX_SORTED_ROWS + 1),
                          torch.float32)
        da.decode_attention(big[0], big[1], big[2], big[5],
                            config=da.DecodeConfig(16, 1, 4, 2, longest_first=True))


# ----------------------------------------------------------------------------- GPU only

CANONICAL_GRID = [(1, 8192), (16, 2048), (64, 2048), (256, 1024), (64, 8192), (8, 32768)]


@pytest.mark.gpu
@pytest.mark.parametrize("skewed", [False, True], ids=["uniform", "skewed"])
@pytest.mark.parametrize("B,L", CANONICAL_GRID, ids=[f"B{b}-L{l}" for b, l in CANONICAL_GRID])
def test_bf16_canonical_shapes(B, L, skewed):
    g = torch.Generator().manual_seed(1)
    lens = (torch.randint(L // 8, L + 1, (B,), generator=g) if skewed
            else torch.full((B,), L)).to(torch.int32).cuda()
    q = torch.randn(B, 32, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(B, L, 8, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(B, L, 8, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.full_like(q, float("nan"))
    da.decode_attention(q, k, v, lens, out=out)
    expected = reference.decode_attention(q, k, v, lens)
    assert not out.isnan().any()
    assert rel_l2(out, expected) < 1e-2


@pytest.mark.gpu
def test_runs_compiled_on_cuda():
    from triton.runtime.jit import JITFunction

    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    config = da.DecodeConfig(block_n=64, num_splits=4, num_warps=4, num_stages=3)
    run_and_check(2, 1000, 8, 2, 128, [1000, 300], torch.float16, config=config)
    device = torch.cuda.current_device()
    for kernel in (da._decode_split_kernel, da._merge_splits_kernel):
        assert isinstance(kernel, JITFunction), f"{kernel} is not a compiled Triton kernel"
        compiled = kernel.device_caches[device][0]
        assert len(compiled) >= 1
        assert all(c.n_regs > 0 and c.n_spills == 0 for c in compiled.values())


@pytest.mark.gpu
def test_cuda_graph_replays_with_new_lengths():
    """Capture once, change seq_lens in place, replay: the output follows the new lengths."""
    B, C, H_q, H_kv, D = 3, 4096, 32, 8, 128
    q = torch.randn(B, H_q, D, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(B, C, H_kv, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(B, C, H_kv, D, dtype=torch.bfloat16, device="cuda")
    lens = torch.tensor([4096, 100, 0], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert da.decode_config(B, C, H_q, H_kv, D, torch.bfloat16, num_sms).num_splits > 1
    da.decode_attention(q, k, v, lens, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        da.decode_attention(q, k, v, lens, out=out)
    for new_lens in ([7, 0, 3000], [4096, 4096, 1]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.decode_attention(q, k, v, lens)
        assert not out.isnan().any()
        live = lens > 0
        assert rel_l2(out[live], expected[live]) < 1e-2
        assert (out[~live] == 0).all()


# (B, C, D, hidden): the 1B and 8B heads at the engine's slab shapes (one wave of small tiles,
# short splits at B = 8 / D = 128, big tiles at B = 256; the 1B head past 64 rows, where the
# engine rotates in attention), with the norm deferred to the kernel.
NEW_TOKEN_GPU = [(64, 1024, 64, 2048), (8, 1024, 128, 4096), (256, 1024, 128, 4096),
                 (16, 2048, 128, 0), (128, 1024, 64, 2048), (256, 1024, 64, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("B,C,D,hidden", NEW_TOKEN_GPU,
                         ids=[f"B{b}-C{c}-D{d}-H{h}" for b, c, d, h in NEW_TOKEN_GPU])
def test_bf16_new_token_matches_rope_kernel_then_attention(B, C, D, hidden):
    """Compiled, bf16: RoPE and the slab write inside the attention kernel against our
    rope_kv_write kernel followed by the attention kernel — the same slab, bit for bit outside
    the new slots, and the same output."""
    from kernels.rope_kv_write import rope_kv_write
    from kernels.rope_table import rope_cos_sin

    g = torch.Generator().manual_seed(B)
    lens = torch.randint(C // 8, C // 2 + 1, (B,), generator=g).to(torch.int32).cuda()
    lens[0] = 0  # a dead row
    bf16 = torch.bfloat16
    q, k_new, v_new = (torch.randn(B, h, D, dtype=bf16, device="cuda") for h in (32, 8, 8))
    k = torch.randn(B, C, 8, D, dtype=bf16, device="cuda")
    v = torch.randn(B, C, 8, D, dtype=bf16, device="cuda")
    x = torch.randn(B, hidden, dtype=bf16, device="cuda") * 3 if hidden else None
    cos, sin = (t.cuda() for t in rope_cos_sin(D, C, 500000.0))
    k_ref, v_ref, q_ref = k.clone(), v.clone(), q.clone()
    rope_kv_write(q_ref, k_new, v_new, k_ref, v_ref, lens - 1, cos, sin, norm_input=x, eps=1e-5)
    expected = da.decode_attention(q_ref, k_ref, v_ref, lens)
    out = torch.full_like(q, float("nan"))
    da.decode_attention(q, k, v, lens, out=out,
                        new_token=da.NewToken(k_new, v_new, cos, sin, x, 1e-5))
    assert not out.isnan().any()
    assert rel_l2(out, expected) < 2e-3
    for got, want in ((k, k_ref), (v, v_ref)):
        assert rel_l2(got, want) < 1e-3
        slots = torch.arange(C, device="cuda")[None, :] != (lens - 1)[:, None]
        assert torch.equal(got[slots], want[slots])

