"""Split-KV decode attention against the plain-torch reference.

CPU runs go through Triton's interpreter, so shapes are tiny; bf16 and the canonical
benchmark shapes are checked on the GPU.
"""

import os

import pytest
import torch

from kernels import decode_attention as da
from kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


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
        err = relative_l2(out[live], expected[live])
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


def expected_pieces(seq_lens: list[int], capacity: int, config: da.DecodeConfig) -> list[int]:
    """How many pieces the kernel cuts each row into (its rule, restated on the host): a row of
    the batch's mean length gets fill_splits pieces, longer rows pieces of the same size, at
    most num_splits of them; whole tiles only."""
    lens = [min(max(n, 0), capacity) for n in seq_lens]
    fill_len = -(-(-(-sum(lens) // len(lens))) // config.fill_splits)
    pieces = []
    for n in lens:
        wanted = max(fill_len, -(-n // config.num_splits))
        piece_len = max(-(-wanted // config.block_n), 1) * config.block_n
        pieces.append(-(-n // piece_len))
    return pieces


def recording_partials(monkeypatch) -> list:
    """Make the partial buffers NaN (so reading an unwritten one shows) and keep them."""
    made = []

    def nan_partials(B, H_q, splits, D, device):
        made.append((torch.full((B, H_q, splits, D), float("nan"), device=device),
                     torch.full((B, H_q, splits), float("nan"), device=device)))
        return made[-1]

    monkeypatch.setattr(da, "_alloc_partials", nan_partials)
    return made


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_one_row_many_pieces_merge(dtype):
    """B=1 over several pieces, merged by the last one; with seq_len well below C the last
    splits hold no positions (they neither write nor count)."""
    config = da.DecodeConfig(block_n=16, num_splits=8, fill_splits=8, num_warps=4, num_stages=2)
    assert expected_pieces([150], 150, config) == [5]
    assert expected_pieces([40], 150, config) == [3]
    run_and_check(1, 150, 4, 2, 64, [150], dtype, config=config)
    run_and_check(1, 150, 4, 2, 64, [40], dtype, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_path_mixed_and_dead_rows(dtype):
    config = da.DecodeConfig(block_n=16, num_splits=4, fill_splits=4, num_warps=4, num_stages=2)
    run_and_check(4, 70, 14, 2, 64, [70, 0, 1, 33], dtype, config=config)


def test_skewed_rows_are_cut_by_length(monkeypatch):
    """Rows longer than the mean get more pieces (merged through the partials), rows of one
    piece are written directly (no partials), dead rows and splits past a row's end write
    nothing; only written partials are read (they start as NaN)."""
    made = recording_partials(monkeypatch)
    config = da.DecodeConfig(block_n=16, num_splits=8, fill_splits=2, num_warps=4, num_stages=2)
    lens = [200, 12, 0, 90, 33, 200]
    pieces = expected_pieces(lens, 200, config)
    assert pieces == [5, 1, 0, 2, 1, 5]  # mean 90: pieces of 45 -> 48 positions
    run_and_check(6, 200, 4, 2, 64, lens, torch.float32, config=config)
    (partial_out, partial_lse), = made
    written = ~partial_lse.isnan()  # [B, H_q, S]
    for b, n in enumerate(pieces):
        merged = n if n > 1 else 0
        assert written[b, :, :merged].all() and not written[b, :, merged:].any(), (b, n)
        assert not partial_out[b, :, :merged].isnan().any()


def test_counters_are_reset_for_the_next_call():
    """Three calls in a row share one counter buffer, with lengths that change which rows are
    cut and how often; each is right, and each leaves every counter at zero."""
    config = da.DecodeConfig(block_n=16, num_splits=4, fill_splits=2, num_warps=4, num_stages=2)
    B, C, H_q, H_kv, D = 3, 96, 4, 2, 64
    counters = da._split_counters(torch.device(DEVICE), B * H_kv)
    for seed, lens in enumerate(([96, 5, 60], [0, 96, 96], [17, 80, 1])):
        q, k, v, k_poisoned, v_poisoned, seq_lens = make_inputs(B, C, H_q, H_kv, D, lens,
                                                                torch.float32, seed=seed)
        assert max(expected_pieces(lens, C, config)) > 1
        out = torch.full((B, H_q, D), float("nan"), device=DEVICE)
        da.decode_attention(q, k_poisoned, v_poisoned, seq_lens, out=out, config=config)
        expected = reference.decode_attention(q, k, v, seq_lens)
        live = seq_lens > 0
        assert not out.isnan().any()
        assert relative_l2(out[live], expected[live]) < 1e-4
        assert (out[~live] == 0).all()
        assert da._split_counters(torch.device(DEVICE), B * H_kv) is counters
        assert (counters == 0).all(), "the last piece must reset its counter"


def test_counter_buffer_is_reused_and_grown():
    device = torch.device(DEVICE)
    current = da._split_counters(device, 10)
    assert current.dtype == torch.int32 and current.numel() >= 4096
    assert da._split_counters(device, current.numel()) is current  # never reallocated
    larger = da._split_counters(device, current.numel() + 1)
    assert larger is not current and larger.numel() > current.numel()
    assert (larger == 0).all()
    assert da._split_counters(device, 10) is larger  # the largest serves every batch after
    assert any(b is current for b in da._counter_buffers[device])  # kept for captured graphs


def test_merge_never_reads_unwritten_partials(monkeypatch):
    """Partials of empty splits stay unwritten; poisoning them proves the merge skips them."""
    recording_partials(monkeypatch)
    config = da.DecodeConfig(block_n=16, num_splits=8, fill_splits=8, num_warps=4, num_stages=2)
    run_and_check(3, 64, 4, 2, 64, [5, 0, 64], torch.float32, config=config)


def test_all_rows_dead_give_zeros():
    for splits in (1, 4):
        config = da.DecodeConfig(block_n=16, num_splits=splits, fill_splits=1, num_warps=4,
                                 num_stages=2)
        out = run_and_check(2, 32, 4, 2, 64, [0, 0], torch.float32, config=config)
        assert (out == 0).all()


def test_seq_lens_outside_slab_are_clamped():
    """A length past C reads the whole slab (no out-of-bounds read); a negative one is dead."""
    q, k, v, _, _, _ = make_inputs(2, 24, 4, 2, 64, [24, 0], torch.float32)
    lens = torch.tensor([1000, -1], dtype=torch.int32, device=DEVICE)
    out = da.decode_attention(q, k, v, lens)
    expected = reference.decode_attention(q, k, v, torch.tensor([24, 0], dtype=torch.int32,
                                                                device=DEVICE))
    assert relative_l2(out[:1], expected[:1]) < 1e-4
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
    assert relative_l2(out, expected) < 5e-3
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
    monkeypatch.setattr(da, "_decode_kernel",
                        _RecordingLauncher("_decode_kernel", da._decode_kernel, calls))
    B, C, H_q, H_kv, D = 2, 300, 4, 2, 64
    default = da.decode_config(B, C, H_q, H_kv, D, torch.float32, da.H100_NUM_SMS)
    assert default.num_splits > 1  # the interesting case: pieces, partials and counters
    launches = []
    for lens in ([300, 5], [0, 171]):
        calls.clear()
        q, k, v, _, _, seq_lens = make_inputs(B, C, H_q, H_kv, D, lens, torch.float32)
        out = da.decode_attention(q, k, v, seq_lens)
        live = seq_lens > 0
        expected = reference.decode_attention(q, k, v, seq_lens)
        assert relative_l2(out[live], expected[live]) < 1e-4
        launches.append(list(calls))
    assert len(launches[0]) == 1  # no second (merge) kernel
    assert launches[0] == launches[1]


def test_decode_config_fills_the_machine():
    cfg = lambda B, C, H_kv=8: da.decode_config(B, C, 32, H_kv, 128, torch.bfloat16, 132)
    # One row, 8 KV heads: must cut rows to use more than 8 of 132 SMs, as far as pieces of
    # MIN_TILES_PER_SPLIT tiles allow.
    one_row = cfg(1, 8192)
    assert one_row.fill_splits == 8192 // (da.MIN_TILES_PER_SPLIT * one_row.block_n)
    assert one_row.fill_splits * 8 >= 132
    # Enough (row, head) pairs already: a mean-length row stays one piece (no merge), but
    # longer rows of a skewed batch may be cut.
    assert cfg(256, 1024).fill_splits == 1
    assert cfg(256, 1024).num_splits == da.BALANCE_SPLITS
    # Too short to cut at all: the kernel without partials or counters.
    assert cfg(64, 256).num_splits == 1
    for B in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for C in (256, 1024, 4096, 32768):
            c = cfg(B, C)
            for n in (c.num_splits, c.fill_splits):
                assert n & (n - 1) == 0 and 1 <= n <= da.MAX_SPLITS
            assert c.fill_splits <= c.num_splits <= da.BALANCE_SPLITS * c.fill_splits
            # The machine is filled by mean-length rows, or rows cannot be cut finer.
            max_cut = C // (da.MIN_TILES_PER_SPLIT * c.block_n)
            assert B * 8 * c.fill_splits >= 2 * 132 or 2 * c.fill_splits > max_cut
            # A full-length piece spans at least MIN_TILES_PER_SPLIT tiles (or there is one).
            assert c.num_splits == 1 or C // c.num_splits >= da.MIN_TILES_PER_SPLIT * c.block_n
            assert c == cfg(B, C)  # pure


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
        da.decode_attention(q, k, v, lens, config=da.DecodeConfig(24, 1, 1, 4, 2))
    with pytest.raises(ValueError, match="fill_splits <= num_splits"):
        da.decode_attention(q, k, v, lens, config=da.DecodeConfig(16, 2, 4, 4, 2))
    with pytest.raises(ValueError, match="head_dim"):
        da.decode_config(1, 16, 4, 2, 512, torch.float16)


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
    assert relative_l2(out, expected) < 1e-2


@pytest.mark.gpu
def test_runs_compiled_on_cuda():
    from triton.runtime.jit import JITFunction

    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    config = da.DecodeConfig(block_n=64, num_splits=4, fill_splits=2, num_warps=4, num_stages=3)
    run_and_check(2, 1000, 8, 2, 128, [1000, 300], torch.float16, config=config)
    kernel = da._decode_kernel
    assert isinstance(kernel, JITFunction), f"{kernel} is not a compiled Triton kernel"
    compiled = kernel.device_caches[torch.cuda.current_device()][0]
    assert len(compiled) >= 1
    assert all(c.n_regs > 0 and c.n_spills == 0 for c in compiled.values())


def _graph_case(B, C, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 32, 128, generator=g).to(torch.bfloat16).cuda()
    k = torch.randn(B, C, 8, 128, generator=g).to(torch.bfloat16).cuda()
    v = torch.randn(B, C, 8, 128, generator=g).to(torch.bfloat16).cuda()
    return q, k, v


@pytest.mark.gpu
@pytest.mark.parametrize("B,C", [(3, 4096), (64, 2048)], ids=["B3-C4096", "B64-C2048"])
def test_cuda_graph_replays_with_new_lengths(B, C):
    """Capture once, change seq_lens in place, replay many times: each output follows the new
    lengths (some rows cut into many pieces, some into one, some dead), and every replay leaves
    the counters at zero for the next."""
    q, k, v = _graph_case(B, C, seed=2)
    lens = torch.full((B,), C, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert da.decode_config(B, C, 32, 8, 128, torch.bfloat16, num_sms).num_splits > 1
    da.decode_attention(q, k, v, lens, out=out)  # compile and make the counters outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        da.decode_attention(q, k, v, lens, out=out)
    counters = da._split_counters(q.device, B * 8)
    g = torch.Generator().manual_seed(3)
    for replay in range(6):
        new_lens = torch.randint(0, C + 1, (B,), generator=g)
        new_lens[replay % B] = 0  # a dead row
        if replay % 2:
            new_lens[(replay + 1) % B] = C  # and a full one, far above the mean
        lens.copy_(new_lens.to(torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.decode_attention(q, k, v, lens)
        assert not out.isnan().any(), f"replay {replay}"
        live = lens > 0
        assert relative_l2(out[live], expected[live]) < 1e-2, f"replay {replay}"
        assert (out[~live] == 0).all()
        assert (counters == 0).all(), f"replay {replay} left counters set"


@pytest.mark.gpu
def test_merge_sees_every_piece_across_sms(monkeypatch):
    """Many pieces per row, merged by whichever program arrives last, on fresh NaN partials
    each call: a partial read before its writer's stores are visible would show as NaN or as
    a different result (the merge order is fixed, so results are bitwise repeatable)."""
    def nan_partials(B, H_q, splits, D, device):
        return (torch.full((B, H_q, splits, D), float("nan"), device=device),
                torch.full((B, H_q, splits), float("nan"), device=device))

    monkeypatch.setattr(da, "_alloc_partials", nan_partials)
    B, C = 16, 4096
    q, k, v = _graph_case(B, C, seed=4)
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(1, C + 1, (B,), generator=g).to(torch.int32).cuda()
    config = da.DecodeConfig(block_n=64, num_splits=32, fill_splits=8, num_warps=2, num_stages=2)
    first = da.decode_attention(q, k, v, lens, config=config)
    expected = reference.decode_attention(q, k, v, lens)
    assert relative_l2(first, expected) < 1e-2
    for _ in range(30):
        again = da.decode_attention(q, k, v, lens, config=config)
        assert torch.equal(again, first)
    assert (da._split_counters(q.device, B * 8) == 0).all()


@pytest.mark.gpu
def test_capture_before_any_call_names_the_fix():
    """Counters cannot be zeroed inside a capture: a clear error, not a silently wrong graph."""
    B, C, H_kv = 600, 64, 8  # 4800 (row, KV head) pairs: more than other tests need
    q, k, v = _graph_case(B, C, seed=6)
    lens = torch.full((B,), C, dtype=torch.int32, device="cuda")
    config = da.DecodeConfig(block_n=16, num_splits=2, fill_splits=1, num_warps=2, num_stages=2)
    if any(b.numel() >= B * H_kv for b in da._counter_buffers.get(q.device, [])):
        pytest.skip("counters this large already exist in this process")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before capturing"):
        with torch.cuda.graph(graph):
            da.decode_attention(q, k, v, lens, config=config)
