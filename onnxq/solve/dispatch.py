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


UP_ROWS_PER_BLOCK = 128  # up_proj under its MLP row Hessian (d_ff rows, one head)


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
                        ok, value = helper.solve(*args)
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

    with _one_thread(weights[0].device), ThreadPoolExecutor(lanes, thread_name_prefix="onnxq-solve") as pool:
        futures = [pool.submit(lane, None)] + [pool.submit(lane, h) for h in helpers]
        try:
            for f in futures:
                f.result()
        finally:
            todo.clear()
    return [results[i] for i in range(len(layers))]


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


def loss_hessian(cov: Covariance, recipe: QuantRecipe, device: torch.device) -> torch.Tensor:
    """The input Hessian a layer's loss tr(ΔW H ΔWᵀ) is measured under: centred where the recipe adds a
    mean-correcting output bias."""
    H = cov.hessian().to(device)
    return centered_hessian(H, cov.mean().to(device)) if recipe.bias_correction else H


def _solve(layer: LinearLayer, W: torch.Tensor, stats: BlockStats | None, recipe: QuantRecipe) -> tuple[QuantResult, float]:
    role, att = stats.attention.get(layer.node, (None, None)) if stats else (None, None)
    int_zero = recipe.v_int_zero and (role == "v" or layer.role == "v_proj")
    bits, group = recipe.format_of(layer.node)
    spec = QuantSpec(bits=bits, group_size=group, sym=recipe.sym, float_zero=recipe.float_zero and not int_zero and bits < 8)
    cov = stats.cov.get(layer.input) if stats else None
    if cov is None:
        return solve_rtn(W, spec, grid="mse" if recipe.grid == "hessian" else recipe.grid), float("nan")
    H = loss_hessian(cov, recipe, W.device)  # the output bias absorbs the mean error: solve on centred statistics
    dXXt = cov.residual()
    dXXt = None if dXXt is None else dXXt.to(W.device)
    mean, mean_fp = cov.mean().to(W.device), cov.mean_fp()
    if recipe.bias_correction and dXXt is not None and mean_fp is not None:
        dXXt = centered_residual(dXXt, mean, mean_fp.to(W.device))
    turbo = recipe.algo == "turboboa"
    coupled = layer.node in stats.up_rows  # filled for TurboBoA's --up-row-factor only
    H_in, d_in, H_out, heads = H, dXXt if turbo else None, None, 1  # the objective the solver minimised
    if recipe.algo == "rtn":
        res = solve_rtn(W, spec, grid=recipe.grid, H=H)
    elif recipe.algo == "aespa":
        res, H_in, H_out, heads = _aespa(W, H, spec, role, att, recipe)
    elif recipe.algo == "gptq" or (recipe.algo == "boa" and role not in ("q", "k", "v")):
        res = _gptq(W, H, spec, recipe, grid=recipe.grid if recipe.algo == "gptq" else "hessian")
    elif coupled:
        H_out = stats.up_rows[layer.node].to(W.device)  # one head of d_ff rows, grid searched once
        res, target = solve_turboboa(W, H, H_out, spec, n_heads=1, rows_per_block=UP_ROWS_PER_BLOCK, damp=recipe.damp,
                                     dXXt=dXXt, alpha=recipe.alpha, refine=False, act_order=recipe.act_order,
                                     with_target=True)
    elif role in ("q", "k"):
        h_q, h_k = att.row_hessians()
        H_out = (h_q if role == "q" else h_k).to(W.device)
        heads = att.attn.n_heads if role == "q" else att.attn.n_kv_heads
        if recipe.algo == "boa":
            res = solve_boa(W, H, H_out, spec, n_heads=heads, damp=recipe.damp, act_order=recipe.act_order)
        else:
            res = solve_turboboa(
                W, H, H_out, spec, n_heads=heads, rows_per_block=recipe.rows_per_block, damp=recipe.damp,
                dXXt=dXXt, alpha=recipe.alpha, refine=True, act_order=recipe.act_order,
            )
    else:
        if role == "v" and att is not None:
            hv, dv = att.value_hessian()
            if hv is not None:
                H_in, d_in, heads = hv.to(W.device), (None if dv is None or not turbo else dv.to(W.device)), att.attn.n_kv_heads
                H_out = stats.v_rows.get(layer.node)
                H_out = None if H_out is None else H_out.to(W.device)
        if H_out is not None and not turbo:
            res = solve_boa(W, H_in, H_out, spec, n_heads=heads, damp=recipe.damp, act_order=recipe.act_order)
        else:
            res = solve_turboboa(
                W, H_in, H_out, spec, n_heads=heads, rows_per_block=recipe.rows_per_block, damp=recipe.damp,
                dXXt=d_in, alpha=recipe.alpha, refine=turbo, act_order=recipe.act_order,
            )
    if recipe.refine_scales and role != "v" and not coupled:
        rows = H_out if role in ("q", "k") and recipe.algo in ("aespa", "boa", "turboboa") else None
        res = refine_group_scales(
            W, H, res, dXXt=dXXt if turbo else None, alpha=recipe.alpha,
            H_out=rows, n_heads=heads if rows is not None else 1,
        )
    if recipe.refine_codes and coupled:  # rows one at a time under a d_ff-row H_out is too slow: each row descends
        res = refine_codes(target, H_in, res, dXXt=d_in, alpha=recipe.alpha, sweeps=recipe.refine_codes)  # on its target
    elif recipe.refine_codes and recipe.algo != "aespa":  # rtn: refused by validate(); aespa: its sweeps
        res = refine_codes(W, H_in, res, dXXt=d_in, alpha=recipe.alpha, H_out=H_out, n_heads=heads,
                           sweeps=recipe.refine_codes)
    if recipe.bias_correction:
        fp = mean_fp if turbo else None  # only TurboBoA solves against the float stream
        res = replace(res, bias=output_bias(W, res.qweight, mean, fp, recipe.alpha))
    return res, float(layer_loss(W, res.qweight, H))


def _aespa(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, role: str | None, att: AttentionStats | None,
           recipe: QuantRecipe) -> tuple[QuantResult, torch.Tensor, torch.Tensor | None, int]:
    """aespa (spec §6) with its refined objectives: Q under E[KᵀK], K under E[QᵀQ] per head, V under the attention-
    weighted input Hessian per KV head, the rest under E[XXᵀ]; returns the result and the objective it minimised."""
    H_in, H_out, heads = H, None, 1
    if role in ("q", "k"):
        h_q, h_k = att.row_hessians()
        H_out = (h_q if role == "q" else h_k).to(W.device)
        heads = att.attn.n_heads if role == "q" else att.attn.n_kv_heads
    elif role == "v" and att is not None and att.value_hessian()[0] is not None:
        H_in, heads = att.value_hessian()[0].to(W.device), att.attn.n_kv_heads
    res = solve_aespa(W, H_in, spec, H_out=H_out, n_heads=heads, damp=recipe.damp, act_order=recipe.act_order,
                      sweeps=max(recipe.refine_codes, 1))
    return res, H_in, H_out, heads


def _gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, recipe: QuantRecipe, *, grid: str) -> QuantResult:
    """GPTQ with the recipe's knobs; static groups when act-order or stage-1 grids need them."""
    return solve_gptq(
        W, H, spec, damp=recipe.damp, block_size=recipe.block_size, act_order=recipe.act_order,
        static_groups=recipe.act_order or recipe.refine_scales, grid="hessian" if recipe.refine_scales else grid,
    )
