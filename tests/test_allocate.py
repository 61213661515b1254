"""Size-budgeted mixed precision: exact MatMulNBits byte counts, per-candidate layer losses, the knapsack allocation."""
import itertools
import time

import numpy as np
import pytest
from onnx import numpy_helper

from onnxq.errors import OnnxqError
from onnxq.formats.rewrite import QuantizedWeight, to_matmulnbits
from onnxq.solve.allocate import (
    CANDIDATES, Candidate, allocate, bpw_budget, candidate_losses, candidates, matmulnbits_bytes,
)
from tests.problems import problem
from tests.tiny import matmul_model

ZERO_KINDS = {"sym": (True, False), "int": (False, False), "float": (False, True)}  # -> (sym, float_zero)
ALL = [Candidate(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1)]


def layer_sizes(k, n, cands=CANDIDATES, *, sym, float_zero) -> dict:
    """matmulnbits_bytes of each candidate for one [K, N] MatMul."""
    return {c: matmulnbits_bytes(k, n, c, sym=sym, float_zero=float_zero) for c in cands}


def random_weight(k, n, cand, zeros, rng) -> QuantizedWeight:
    """Random codes, scales and zero points (None, ints or floats) of one candidate for a weight [K, N]."""
    groups = 1 if cand.group_size == -1 else -(-k // cand.group_size)
    top = 1 << cand.bits
    zp = {"sym": None, "int": rng.integers(0, top, (n, groups)), "float": rng.random((n, groups)) * (top - 1)}[zeros]
    scales = (rng.random((n, groups)) * 0.1 + 0.01).astype(np.float32)
    return QuantizedWeight(rng.integers(0, top, (n, k)), scales, zp, cand.bits, cand.group_size)


def written_bytes(k, n, cand, zeros, dtype, rng) -> int:
    """Bytes of the initializers `to_matmulnbits` adds for one [K, N] MatMul whose weight has `dtype`."""
    model = matmul_model((k, n))
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).astype(dtype), weight.name))
    before = {t.name for t in model.graph.initializer}
    to_matmulnbits(model, {"/layers.0/MatMul": random_weight(k, n, cand, zeros, rng)})
    assert model.graph.node[0].op_type == "MatMulNBits" and weight.name not in {t.name for t in model.graph.initializer}
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name not in before)


@pytest.mark.parametrize("k, n", [(200, 24), (40, 8), (576, 3)])  # ragged K; K=40 gives a 64-block per channel
def test_bytes_equal_what_matmulnbits_writes(k, n):
    rng = np.random.default_rng(k)
    for cand, zeros, dtype in itertools.product(ALL, ZERO_KINDS, (np.float32, np.float16)):
        sym, float_zero = ZERO_KINDS[zeros]
        if cand.bits == 8 and float_zero:
            with pytest.raises(OnnxqError, match="8-bit"):
                matmulnbits_bytes(k, n, cand, sym=sym, float_zero=float_zero)
            continue
        expected = written_bytes(k, n, cand, zeros, dtype, rng)
        size = matmulnbits_bytes(k, n, cand, sym=sym, float_zero=float_zero, scale_bytes=np.dtype(dtype).itemsize)
        assert size == expected, (cand, zeros, dtype)


def test_three_bits_cost_four_and_are_left_out():
    for g, zeros in itertools.product((32, 128, -1), ZERO_KINDS.values()):
        sizes = layer_sizes(200, 24, [Candidate(3, g), Candidate(4, g)], sym=zeros[0], float_zero=zeros[1])
        assert sizes[Candidate(3, g)] == sizes[Candidate(4, g)]
    assert {c.bits for c in CANDIDATES} == {2, 4, 8}


def test_candidates_keep_what_runs():
    assert candidates() == CANDIDATES
    assert all(c.bits != 8 for c in candidates(float_zero=True))
    assert {c.group_size for c in candidates(target="qnn")} == {32, 64} and {c.bits for c in candidates(target="cuda")} == {4, 8}
    with pytest.raises(OnnxqError, match="float zero"):
        candidates(target="cuda", float_zero=True)
    with pytest.raises(OnnxqError, match="group_size=16"):
        Candidate(4, 16)


def test_bpw_budget_is_the_bytes_of_that_many_bits():
    shapes = [(128, 128), (256, 64)]
    w4 = [Candidate(4, 128)] * 2  # sym: 4 bits + one fp32 scale per 128 weights = 4.25 bits per weight
    budget = bpw_budget(4.25, shapes)
    assert budget == sum(matmulnbits_bytes(k, n, c, sym=True, float_zero=False) for (k, n), c in zip(shapes, w4))


@pytest.mark.parametrize("sym", [True, False])
def test_losses_fall_with_bits_and_gptq_beats_rtn(sym):
    W, H, _ = problem(3, rows=24, n=96)
    cands = [Candidate(b, g) for b in (2, 3, 4, 8) for g in (32, -1)]
    gptq = candidate_losses(W, H, cands, sym=sym)
    rtn = candidate_losses(W, H, cands, solver="rtn", sym=sym)
    for g in (32, -1):
        assert gptq[Candidate(2, g)] > gptq[Candidate(3, g)] > gptq[Candidate(4, g)] > gptq[Candidate(8, g)] > 0
        assert rtn[Candidate(2, g)] > rtn[Candidate(3, g)] > rtn[Candidate(4, g)] > rtn[Candidate(8, g)] > 0
    assert all(gptq[c] <= rtn[c] for c in cands), {str(c): (gptq[c], rtn[c]) for c in cands}
    with pytest.raises(OnnxqError, match="solver"):
        candidate_losses(W, H, cands, solver="boa")


def brute_force(losses, sizes, budget) -> float:
    """Least summed loss over every assignment within the budget (inf if none fits)."""
    keys = [list(loss) for loss in losses]
    best = np.inf
    for choice in itertools.product(*keys):
        if sum(s[c] for s, c in zip(sizes, choice)) <= budget:
            best = min(best, sum(loss[c] for loss, c in zip(losses, choice)))
    return best


def random_problem(rng, layers=5, scale=1):
    cands = rng.choice(ALL, 4, replace=False)
    sizes = [{c: int(rng.integers(10, 1000)) * scale for c in cands} for _ in range(layers)]
    losses = [{c: float(rng.random()) for c in cands} for _ in range(layers)]
    return losses, sizes


def total(sizes_or_losses, choice):
    return sum(x[c] for x, c in zip(sizes_or_losses, choice))


@pytest.mark.parametrize("seed", range(6))
def test_allocate_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    losses, sizes = random_problem(rng)
    low, high = sum(min(s.values()) for s in sizes), sum(max(s.values()) for s in sizes)
    for budget in np.linspace(low, high + 50, 7).astype(int):
        choice = allocate(losses, sizes, int(budget))
        assert len(choice) == 5 and total(sizes, choice) <= budget
        assert total(losses, choice) == pytest.approx(brute_force(losses, sizes, budget), rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_allocate_in_units_loses_at_most_one_unit_per_layer(seed):
    """Budgets of millions of bytes round sizes up to units: never over budget, never worse than the exact
    optimum with one unit per layer less."""
    rng = np.random.default_rng(seed)
    losses, sizes = random_problem(rng, scale=100_003)
    low, high = sum(min(s.values()) for s in sizes), sum(max(s.values()) for s in sizes)
    for budget in np.linspace(low, high, 6).astype(int):
        choice = allocate(losses, sizes, int(budget))
        unit = int(budget) // 200_000
        assert unit > 1 and total(sizes, choice) <= budget
        assert total(losses, choice) <= brute_force(losses, sizes, budget - 5 * unit) + 1e-12


def test_allocate_refuses_a_budget_below_the_smallest_choice():
    rng = np.random.default_rng(0)
    losses, sizes = random_problem(rng, scale=1000)
    smallest = sum(min(s.values()) for s in sizes)
    assert total(sizes, allocate(losses, sizes, smallest)) == smallest
    with pytest.raises(OnnxqError, match=r"below the smallest choice, [0-9.]+ MB"):
        allocate(losses, sizes, smallest - 1)


def test_allocate_is_fast_on_a_whole_model():
    """~250 layers x 12 candidates at an 86 MB budget (SmolLM2-135M's shapes)."""
    rng = np.random.default_rng(0)
    shapes = ([(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)] * 36)[:250]
    sizes = [layer_sizes(k, n, sym=False, float_zero=False) for k, n in shapes]
    losses = [{c: rng.random() * k * n * 4.0 ** -c.bits * (1 + c.group_size % 97 / 97) for c in CANDIDATES}
              for k, n in shapes]
    start = time.perf_counter()
    choice = allocate(losses, sizes, 86_000_000)
    assert time.perf_counter() - start < 5
    assert 85_000_000 < total(sizes, choice) <= 86_000_000
