"""Choose and run the solver for one linear layer from the recipe and the captured statistics."""
from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..analysis.layers import LinearLayer
from ..calibrate.attention_stats import AttentionStats
from ..errors import OnnxqError
from ..recipe import QuantRecipe
from ..solvers import (
    QuantResult, QuantSpec, centered_hessian, centered_residual, layer_loss, output_bias, refine_codes, refine_group_scales, solve_aespa, solve_boa,
    solve_gptq, solve_rtn, solve_turboboa,
)
from ..calibrate.stats import Covariance
from .heap import trim_heap


UP_ROWS_PER_BLOCK = 128  # up_proj under its MLP row Hessian (d_ff rows, one head)
ROW_PIECE = 4096  # rows solved at once where rows are independent (GPTQ, RTN): SmolLM2's 49152-row LM head in one
# piece held 650 MiB of solver temporaries (5.7x its float weight, measured); in 4096-row pieces the same codes cost
# about a tenth of that (9.6 s against 9.3 s for the whole head)


@dataclass
class BlockStats:
    """Everything captured for one decoder block: input covariances per tensor and attention statistics per layer."""

    cov: dict[str, Covariance] = field(default_factory=dict)
    attention: dict[str, tuple[str, AttentionStats]] = field(default_factory=dict)  # layer node -> (role, stats)
    v_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # V node -> W_O row factor [n_kv, d_h, d_h]
    acts: dict[str, Covariance] = field(default_factory=dict)  # gated-MLP activation tensor -> its second moment
    up_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # up node -> MLP row Hessian [1, d_ff, d_ff]


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """The column loop is launch-bound: on CPU one intra-op thread beats several (measured 3-15x on 2 cores).
    A no-op where torch already runs one thread (e.g. inside `solve_block`'s workers, which share the setting)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def solve_block(layers: list[LinearLayer], weights: list[torch.Tensor], stats: BlockStats | None,
                recipe: QuantRecipe) -> list[tuple[QuantResult, float]]:
    """`solve_layer` for layers that are independent given `stats` (a block's layers without true-sequential), in
    order. On CPU with n intra-op threads, n lanes take the layers largest first: this process and n-1 helper
    processes (`onnxq.solve.worker`), one torch thread each; the launch-bound column loops hold the GIL, so
    threads alone overlapped little (1.27x on 2 cores). Same results as one after another."""
    lanes = min(len(layers), torch.get_num_threads()) if weights and weights[0].device.type == "cpu" else 1
    if lanes <= 1:
        return [solve_layer(l, W, stats, recipe) for l, W in zip(layers, weights)]
    helpers = _helpers(lanes - 1)
    todo = deque(sorted(range(len(layers)), key=lambda i: -weights[i].numel()))
    results: dict[int, tuple[QuantResult, float]] = {}

    def lane(helper: _Helper | None) -> None:
        try:
            while todo:
                try:
                    i = todo.popleft()
                except IndexError:
                    return
                args = (layers[i], weights[i], stats, recipe)
                if helper is not None:
                    try:
                        ok, value = helper.solve(layers[i], weights[i], _for_layer(stats, layers[i]), recipe)
                    except (OSError, EOFError, pickle.PickleError, AttributeError, TypeError):
                        helper.proc.kill()  # it died or cannot take these arguments: replaced next block,
                        helper = None  # and this lane solves here
                    else:
                        if not ok:
                            raise value  # the solver's own error, as if it had run here
                        results[i] = value
                        continue
                results[i] = solve_layer(*args)
        except BaseException:
            todo.clear()  # the other lanes stop after their current layer
            raise

    with _one_thread(weights[0].device), ThreadPoolExecutor(max(1, len(helpers)), thread_name_prefix="onnxq-solve") as pool:
        futures = [pool.submit(lane, h) for h in helpers]  # threads that only feed the helper processes
        try:
            lane(None)  # here, not in a pool thread: a thread's own malloc arena fragments (+400 MB on SmolLM2)
            for f in futures:
                f.result()
        finally:
            todo.clear()
    return [results[i] for i in range(len(layers))]


def _for_layer(stats: BlockStats | None, layer: LinearLayer) -> BlockStats | None:
    """The part of a block's `stats` that `solve_layer` reads for `layer` (what a helper process is sent)."""
    if stats is None:
        return None
    pick = lambda d, key: {k: v for k, v in d.items() if k == key}  # noqa: E731
    return BlockStats(cov=pick(stats.cov, layer.input), attention=pick(stats.attention, layer.node),
                      v_rows=pick(stats.v_rows, layer.node), acts={}, up_rows=pick(stats.up_rows, layer.node))


class _Helper:
    """One solver process (`python -m onnxq.solve.worker`) that solves layers sent to it, one at a time."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the same onnxq as here
        self.proc = subprocess.Popen([sys.executable, "-m", "onnxq.solve.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)

    def solve(self, *args) -> tuple[bool, object]:
        """solve_layer(*args) in the helper: (True, its result) or (False, the exception it raised). Transport
        failures raise here: OSError/EOFError if the helper died, pickling errors for arguments it cannot take."""
        pickle.dump(args, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()
        return pickle.load(self.proc.stdout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.wait()


_HELPERS: list[_Helper] = []


def _helpers(n: int) -> list[_Helper]:
    """Up to n live helper processes, started on first use and kept for the next blocks (closed at exit); fewer
    where a process cannot be started (the lanes then run here)."""
    _HELPERS[:] = [h for h in _HELPERS if h.proc.poll() is None]
    while len(_HELPERS) < n:
        try:
            _HELPERS.append(_Helper())
        except OSError:
            break
    return _HELPERS[:n]


def helper_peak_rss_mb() -> float:
    """Largest peak resident set size (MiB) of the live helper processes since they started; 0 without any."""
    peaks = [0.0]
    for h in _HELPERS:
        with contextlib.suppress(OSError, ValueError, IndexError):
            status = Path(f"/proc/{h.proc.pid}/status").read_text()
            peaks.append(int(status.split("VmHWM:")[1].split()[0]) / 1024)
    return max(peaks)


@atexit.register
def _close_helpers() -> None:
    while _HELPERS:
        _HELPERS.pop().close()


def solve_layer(layer: LinearLayer, W: torch.Tensor, stats: BlockStats | None, recipe: QuantRecipe) -> tuple[QuantResult, float]:
    """Quantize W[d_out, d_in] of `layer`; returns the result and its layer loss tr(ΔW H ΔWᵀ) (nan without data; H
    centred when the recipe adds a mean-correcting output bias)."""
    with _one_thread(W.device):
        try:
            return _solve(layer, W, stats, recipe)
        except OnnxqError as err:
            raise OnnxqError(f"layer {layer.node}: {err}") from None
        finally:
            trim_heap()  # the solver's temporaries fragment the heap: +100-400 MB a block on SmolLM2 without this


def loss_hessian(cov: Covariance, recipe: QuantRecipe, device: torch.device) -> torch.Tensor:
    """The input Hessian a layer's loss tr(ΔW H ΔWᵀ) is measured under: centred where the recipe adds a
    mean-correcting output bias."""
    H = cov.hessian().to(device)
    return centered_hessian(H, cov.mean().to(device)) if recipe.bias_correction else H


@dataclass
class LayerProblem:
    """One layer's objective, tr(H_out ΔW H_in ΔWᵀ) − 2α tr(H_out W residual ΔWᵀ) per head, and what refines it."""

    spec: QuantSpec
    H: torch.Tensor  # input Hessian of the reported loss (centred under bias correction)
    H_in: torch.Tensor  # the solver's: H, or V's attention-weighted one per KV head [h, n, n]
    H_out: torch.Tensor | None  # per head [h, d_h, d_h]; None: rows independent
    heads: int
    residual: torch.Tensor | None  # TurboBoA's float-stream term dXXᵀ for this objective, else None
    dXXt: torch.Tensor | None  # the layer's dXXᵀ (centred under bias correction)
    mean: torch.Tensor
    mean_fp: torch.Tensor | None
    role: str | None  # q, k or v where attention statistics were captured
    coupled: bool  # TurboBoA --up-row-factor: up_proj's d_ff rows coupled through the MLP, one head


def _solve(layer: LinearLayer, W: torch.Tensor, stats: BlockStats | None, recipe: QuantRecipe) -> tuple[QuantResult, float]:
    """Build the layer problem, run the recipe's solver, refine, add the output bias; data-free RTN without stats."""
    role = stats.attention.get(layer.node, (None, None))[0] if stats else None
    int_zero = recipe.v_int_zero and (role == "v" or layer.role == "v_proj")
    bits, group = recipe.format_of(layer.node)
    spec = QuantSpec(bits=bits, group_size=group, sym=recipe.sym, float_zero=recipe.float_zero and not int_zero and bits < 8)
    cov = stats.cov.get(layer.input) if stats else None
    if cov is None:
        grid = "mse" if recipe.grid == "hessian" else recipe.grid
        return by_row_pieces(lambda w: solve_rtn(w, spec, grid=grid), W), float("nan")
    p = _problem(layer, W.device, cov, stats, recipe, spec)
    res, target = _run_solver(p, W, recipe)
    res = _refine(p, W, res, target, recipe)
    if recipe.bias_correction:
        fp = p.mean_fp if recipe.algo == "turboboa" else None  # only TurboBoA solves against the float stream
        res = replace(res, bias=output_bias(W, res.qweight, p.mean, fp, recipe.alpha))
    return res, float(layer_loss(W, res.qweight, p.H))


def _problem(layer: LinearLayer, dev: torch.device, cov: Covariance, stats: BlockStats, recipe: QuantRecipe,
             spec: QuantSpec) -> LayerProblem:
    """The objective of `layer` for the recipe's solver from the block's statistics."""
    role, att = stats.attention.get(layer.node, (None, None))
    H = loss_hessian(cov, recipe, dev)  # the output bias absorbs the mean error: solve on centred statistics
    dXXt = None if cov.residual() is None else cov.residual().to(dev)
    mean, mean_fp = cov.mean().to(dev), cov.mean_fp()
    if recipe.bias_correction and dXXt is not None and mean_fp is not None:
        dXXt = centered_residual(dXXt, mean, mean_fp.to(dev))
    turbo = recipe.algo == "turboboa"
    p = LayerProblem(spec, H, H, None, 1, dXXt if turbo else None, dXXt, mean, mean_fp, role, layer.node in stats.up_rows)
    attention = recipe.algo in ("aespa", "boa", "turboboa") and att is not None
    if p.coupled:
        p.H_out = stats.up_rows[layer.node].to(dev)  # one head of d_ff rows
    elif attention and role in ("q", "k"):
        h_q, h_k = att.row_hessians()
        p.H_out, p.heads = (h_q.to(dev), att.attn.n_heads) if role == "q" else (h_k.to(dev), att.attn.n_kv_heads)
    elif attention and role == "v" and att.value_hessian()[0] is not None:
        hv, dv = att.value_hessian()
        p.H_in, p.heads = hv.to(dev), att.attn.n_kv_heads
        p.residual = dv.to(dev) if dv is not None and turbo else None
        rows = stats.v_rows.get(layer.node)  # --v-row-factor (BoA, TurboBoA)
        p.H_out = None if rows is None else rows.to(dev)
    return p


def _run_solver(p: LayerProblem, W: torch.Tensor, recipe: QuantRecipe) -> tuple[QuantResult, torch.Tensor | None]:
    """The recipe's solver on `p`: its result, and the up_proj rows' targets where they were coupled."""
    algo, r = recipe.algo, recipe
    if algo == "rtn":
        return by_row_pieces(lambda w: solve_rtn(w, p.spec, grid=r.grid, H=p.H), W), None
    if algo == "aespa":  # spec §6: GPTQ, then code descent on the refined objective
        return solve_aespa(W, p.H_in, p.spec, H_out=p.H_out, n_heads=p.heads, damp=r.damp, act_order=r.act_order,
                           sweeps=max(r.refine_codes, 1)), None
    if algo == "gptq" or (algo == "boa" and p.role not in ("q", "k", "v")):
        return _gptq(W, p.H, p.spec, r, grid=r.grid if algo == "gptq" else "hessian"), None
    if p.coupled:  # grid searched once for the d_ff rows
        return solve_turboboa(W, p.H, p.H_out, p.spec, n_heads=1, rows_per_block=UP_ROWS_PER_BLOCK, damp=r.damp,
                              dXXt=p.residual, alpha=r.alpha, refine=False, act_order=r.act_order, with_target=True)
    if algo == "boa" and p.H_out is not None:
        return solve_boa(W, p.H_in, p.H_out, p.spec, n_heads=p.heads, damp=r.damp, act_order=r.act_order), None
    return solve_turboboa(W, p.H_in, p.H_out, p.spec, n_heads=p.heads, rows_per_block=r.rows_per_block, damp=r.damp,
                          dXXt=p.residual, alpha=r.alpha, refine=algo == "turboboa", act_order=r.act_order), None


def _refine(p: LayerProblem, W: torch.Tensor, res: QuantResult, target: torch.Tensor | None,
            recipe: QuantRecipe) -> QuantResult:
    """--refine-scales (gso stage 2) and --refine-codes (code descent) on the problem's own objective."""
    if recipe.refine_scales and p.role != "v" and not p.coupled:
        rows = p.H_out if p.role in ("q", "k") and recipe.algo in ("aespa", "boa", "turboboa") else None
        res = refine_group_scales(W, p.H, res, dXXt=p.dXXt if recipe.algo == "turboboa" else None, alpha=recipe.alpha,
                                  H_out=rows, n_heads=p.heads if rows is not None else 1)
    if recipe.refine_codes and p.coupled:  # rows one at a time under a d_ff-row H_out is too slow: each row descends
        res = refine_codes(target, p.H_in, res, dXXt=p.residual, alpha=recipe.alpha, sweeps=recipe.refine_codes)
    elif recipe.refine_codes and recipe.algo != "aespa":  # rtn: refused by validate(); aespa: its own sweeps
        res = refine_codes(W, p.H_in, res, dXXt=p.residual, alpha=recipe.alpha, H_out=p.H_out, n_heads=p.heads,
                           sweeps=recipe.refine_codes)
    return res


def _gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, recipe: QuantRecipe, *, grid: str) -> QuantResult:
    """GPTQ with the recipe's knobs; static groups when act-order or stage-1 grids need them."""
    return by_row_pieces(lambda w: solve_gptq(
        w, H, spec, damp=recipe.damp, block_size=recipe.block_size, act_order=recipe.act_order,
        static_groups=recipe.act_order or recipe.refine_scales, grid="hessian" if recipe.refine_scales else grid,
    ), W)


def by_row_pieces(solve, W: torch.Tensor, rows: int = ROW_PIECE) -> QuantResult:
    """`solve(W)` for a solver whose rows are independent, run on `rows` rows at a time into one result (the same
    codes and grids; bounded temporaries)."""
    if len(W) <= rows:
        return solve(W)
    first = solve(W[:rows])
    parts = {f: getattr(first, f) for f in ("qweight", "codes", "scales", "zeros")}
    out = {f: t.new_empty((len(W), *t.shape[1:])) for f, t in parts.items()}
    for r in range(0, len(W), rows):
        piece = first if r == 0 else solve(W[r:r + rows])
        for f, t in out.items():
            t[r:r + rows] = getattr(piece, f)
        del piece
    return replace(first, **out)
