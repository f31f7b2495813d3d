"""BatchRunner: slabs, packed prefill, device-side decode steps, dead rows, refills, graphs.

The oracle is independent of the runner's incremental state: the greedy next token of a
sequence is recomputed from scratch by prefilling the whole sequence into a scratch slab.
"""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache import KVArena
from engine.model import load_model
from engine.runner import BatchRunner, RowSampling, capacity_bucket

GREEDY = RowSampling(temperature=0.0, top_k=-1, top_p=1.0, seed=0, logprobs=False)
# Marks never-written cache slots: any read of one turns the output into NaN.
UNWRITTEN = float("nan")



@pytest.fixture(scope="module")
def model():
    return load_model("dummy:tiny", torch.float32, "cpu")


def _arena(model, tokens: int, device="cpu", dtype=torch.float32) -> KVArena:
    c = model.config
    arena = KVArena(c.num_layers, c.num_kv_heads, c.head_dim, tokens, dtype, device)
    arena.k.fill_(UNWRITTEN)
    arena.v.fill_(UNWRITTEN)
    return arena


@torch.no_grad()
def _recomputed_next(model, sequence: list[int]) -> tuple[int, float]:
    """Greedy next token (and its logprob) of ``sequence``, from a fresh full prefill."""
    n = len(sequence)
    scratch = _arena(model, n).slab(1, n)
    logits = model.prefill(torch.tensor(sequence), torch.arange(n, dtype=torch.int32),
                           torch.zeros(n, dtype=torch.int32),
                           torch.tensor([0, n], dtype=torch.int32), n, scratch)[0]
    token = int(logits.argmax())
    return token, float(torch.log_softmax(logits, -1)[token])


def _random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (n,), generator=g).tolist() for n in lengths]


def test_capacity_bucket():
    assert capacity_bucket(1, 16, 128) == 16
    assert capacity_bucket(16, 16, 128) == 16
    assert capacity_bucket(17, 16, 128) == 32
    assert capacity_bucket(100, 16, 128) == 128
    assert capacity_bucket(90, 16, 100) == 100  # capped at max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        capacity_bucket(129, 16, 128)


def test_decode_steps_match_recomputation_and_dead_rows_stay_untouched(model):
    arena = _arena(model, 4 * 32)
    runner = BatchRunner(model, arena)
    runner.begin(4, 32)
    prompts = _random_prompts([5, 11, 2], seed=1)
    rows = [0, 1, 3]  # row 2 stays dead (padding)
    sampling = [GREEDY, RowSampling(0.0, -1, 1.0, 0, logprobs=True), GREEDY]
    first, first_lp = runner.prefill(rows, prompts, sampling).result()
    sequences = [p + [t] for p, t in zip(prompts, first)]
    for seq, prompt in zip(sequences, prompts):
        assert seq[-1] == _recomputed_next(model, prompt)[0]
    # One step in flight: launch step t+1 before reading step t.
    in_flight = runner.decode()
    for _ in range(6):
        nxt = runner.decode()
        tokens, logprobs = in_flight.result()
        assert logprobs is not None  # one row asked for logprobs
        for i, row in enumerate(rows):
            want, want_lp = _recomputed_next(model, sequences[i])
            assert tokens[row] == want
            if i == 1:
                assert logprobs[row] == pytest.approx(want_lp, abs=1e-4)
            sequences[i].append(tokens[row])
        in_flight = nxt
    slab = arena.slab(4, 32)
    for layer in range(model.config.num_layers):
        assert slab.k[layer][2].isnan().all() and slab.v[layer][2].isnan().all()
        for i, row in enumerate(rows):
            # Every token read so far but the last was fed (written); so was the last, by
            # the step still in flight: slots 0 .. len(sequence) - 1.
            written = len(sequences[i])
            assert (~slab.k[layer][row, :written].isnan()).all()
            assert (~slab.v[layer][row, :written].isnan()).all()
            assert slab.k[layer][row, written:].isnan().all()


def test_retired_row_is_dead_and_refill_keeps_other_rows(model):
    arena = _arena(model, 2 * 32)
    runner = BatchRunner(model, arena)
    runner.begin(2, 32)
    a, b, c = _random_prompts([4, 6, 3], seed=2)
    first, _ = runner.prefill([0, 1], [a, b], [GREEDY, GREEDY]).result()
    seq_a, seq_b = a + [first[0]], b + [first[1]]
    for _ in range(2):
        tokens, _ = runner.decode().result()
        seq_a.append(tokens[0])
        seq_b.append(tokens[1])
    runner.retire([0])
    assert runner.live_rows() == [1]
    slot_after_a = len(seq_a) - 1  # where row 0's next token would have been written
    tokens, _ = runner.decode().result()
    seq_b.append(tokens[1])
    slab = arena.slab(2, 32)
    assert slab.k[0][0, slot_after_a].isnan().all(), "a dead row wrote its KV"
    # Refill row 0 with a new prompt while row 1 keeps its cache.
    first_c, _ = runner.prefill([0], [c], [GREEDY]).result()
    seq_c = c + first_c
    for _ in range(4):
        tokens, _ = runner.decode().result()
        seq_c.append(tokens[0])
        seq_b.append(tokens[1])
    for seq, prompt in ((seq_b, b), (seq_c, c)):
        for n in range(len(prompt), len(seq)):
            assert seq[n] == _recomputed_next(model, seq[:n])[0]


def test_prefill_packs_give_the_same_tokens(model):
    prompts = _random_prompts([3, 5, 2, 7], seed=3)
    results = []
    for max_prefill_tokens in (4, 16384):  # 4 forces four packs (a 5- and a 7-token prompt alone)
        runner = BatchRunner(model, _arena(model, 4 * 16), max_prefill_tokens=max_prefill_tokens)
        runner.begin(4, 16)
        first, _ = runner.prefill([3, 0, 2, 1], prompts, [GREEDY] * 4).result()
        steps = [runner.decode().result()[0] for _ in range(3)]
        results.append((first, steps))
    assert results[0] == results[1]
    assert results[0][0] == [_recomputed_next(model, p)[0] for p in prompts]


def test_sampled_tokens_do_not_depend_on_row_or_batch(model):
    prompt = _random_prompts([6], seed=4)[0]
    sampled = RowSampling(temperature=1.0, top_k=50, top_p=0.9, seed=1234, logprobs=False)
    alone = BatchRunner(model, _arena(model, 32))
    alone.begin(1, 32)
    ref = alone.prefill([0], [prompt], [sampled]).result()[0] + [
        alone.decode().result()[0][0] for _ in range(5)]
    crowd = BatchRunner(model, _arena(model, 4 * 32))
    crowd.begin(4, 32)
    others = _random_prompts([3, 9], seed=5)
    first, _ = crowd.prefill([0, 2, 3], [others[0], prompt, others[1]],
                             [GREEDY, sampled, RowSampling(0.7, -1, 1.0, 99, False)]).result()
    got = [first[1]] + [crowd.decode().result()[0][2] for _ in range(5)]
    assert got == ref
    greedy = BatchRunner(model, _arena(model, 32))
    greedy.begin(1, 32)
    ref_greedy = greedy.prefill([0], [prompt], [GREEDY]).result()[0] + [
        greedy.decode().result()[0][0] for _ in range(5)]
    assert ref != ref_greedy, "temperature 1 sampling reproduced greedy decoding"


def _greedy_alone(model, prompt: list[int], steps: int) -> list[int]:
    runner = BatchRunner(model, _arena(model, 32))
    runner.begin(1, 32)
    return runner.prefill([0], [prompt], [GREEDY]).result()[0] + [
        runner.decode().result()[0][0] for _ in range(steps)]


def test_a_refilled_row_does_not_inherit_penalties(model):
    """A row refilled with a request without penalties decodes as plain greedy, although the
    row's previous request had penalties and another live row still has them (so every step
    runs the penalised sampler)."""
    penalised = RowSampling(0.0, -1, 1.0, 0, False, presence_penalty=1.5,
                            frequency_penalty=1.0, repetition_penalty=3.0)
    first, second, refill = _random_prompts([4, 7, 5], seed=8)
    runner = BatchRunner(model, _arena(model, 2 * 32))
    runner.begin(2, 32)
    runner.prefill([0, 1], [first, second], [penalised, penalised]).result()
    for _ in range(3):
        runner.decode().result()
    runner.retire([0])
    got = [runner.prefill([0], [refill], [GREEDY]).result()[0][0]]
    got += [runner.decode().result()[0][0] for _ in range(6)]
    assert got == _greedy_alone(model, refill, 6)
    penalised_alone = BatchRunner(model, _arena(model, 32))
    penalised_alone.begin(1, 32)
    shown = penalised_alone.prefill([0], [refill], [penalised]).result()[0] + [
        penalised_alone.decode().result()[0][0] for _ in range(6)]
    assert shown != got, "the penalties do not change this prompt's tokens: nothing is shown"


def test_slab_and_prompt_limits_are_refused(model):
    runner = BatchRunner(model, _arena(model, 64))
    with pytest.raises(ValueError, match="exceeds the KV arena"):
        runner.begin(4, 32)
    runner.begin(2, 32)
    with pytest.raises(ValueError, match="does not fit"):
        runner.prefill([0], [list(range(33))], [GREEDY])
    runner.prefill([0], [[1, 2, 3]], [GREEDY])
    with pytest.raises(ValueError, match="still live"):
        runner.prefill([0], [[4, 5]], [GREEDY])


@pytest.mark.gpu
def test_cuda_graphs_give_the_same_tokens_as_eager():
    gpu_model = load_model("dummy:tiny", torch.float32, "cuda", backend="triton")
    prompts = _random_prompts([5, 17, 9], seed=6)
    # The sampled row has penalties too: their history is updated inside the graph.
    sampling = [GREEDY, RowSampling(0.8, 40, 0.95, 7, True, presence_penalty=0.5,
                                    frequency_penalty=0.3, repetition_penalty=1.2), GREEDY]
    results = []
    for eager in (True, False):
        runner = BatchRunner(gpu_model, _arena(gpu_model, 4 * 64, "cuda"), enforce_eager=eager)
        runner.begin(4, 64)
        first, _ = runner.prefill([0, 1, 3], prompts, sampling).result()
        steps, in_flight = [], runner.decode()
        for _ in range(20):
            nxt = runner.decode()
            steps.append(in_flight.result()[0])
            in_flight = nxt
        runner.retire([1])
        steps.append(runner.decode().result()[0])
        results.append((first, [[s[0], s[1], s[3]] for s in steps[:-1]], steps[-1][0]))
        if not eager:
            assert len(runner.graphs) == 2  # the sampled kind, then greedy after the retire
    assert results[0] == results[1]


@pytest.mark.gpu
def test_greedy_steps_pick_the_same_tokens_with_and_without_the_fused_head(monkeypatch):
    """bf16 greedy decode steps (B = 4, dummy:tiny's 512-token vocabulary, CUDA graphs) with
    the LM head's argmax fused (kernels.lm_head) and with fp32 logits then argmax."""
    from kernels import lm_head

    gpu_model = load_model("dummy:tiny", torch.bfloat16, "cuda", backend="triton")
    prompts = _random_prompts([5, 17, 9, 30], seed=8)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(lm_head, "FUSED_ARGMAX", fused)
        runner = BatchRunner(gpu_model, _arena(gpu_model, 4 * 64, "cuda", torch.bfloat16))
        runner.begin(4, 64)
        runner.prefill([0, 1, 2, 3], prompts, [GREEDY] * 4).result()
        results.append([runner.decode().result()[0] for _ in range(24)])
        assert len(runner.graphs) == 1
    assert results[0] == results[1]
