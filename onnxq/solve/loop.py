"""The block loop: calibrate and solve a model block by block on ORT, block ℓ+1 seeing block ℓ quantized."""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import torch
from tqdm import tqdm

from ..analysis.attention import attention_blocks
from ..analysis.layers import LinearLayer, linear_layers, partition
from ..analysis.mlp import GatedMlp, gated_mlps, product_map
from ..calibrate.attention_stats import AttentionStats
from ..calibrate.runner import BlockRunner, with_output_bias
from ..calibrate.stats import Covariance
from ..errors import OnnxqError
from ..graph.io import read_array
from ..recipe import QuantRecipe
from ..solvers import QuantResult, layer_loss, up_row_hessian, value_row_hessian
from .block_tune import tune_block
from .dispatch import ROW_PIECE, BlockStats, loss_hessian, solve_block, solve_layer
from .heap import CALIB_MMAP, SOLVE_MMAP, set_mmap_threshold, trim_heap
from .torch_graph import TorchGraph

GROUP = 4  # calibration windows per statistics update (ORT runs one window at a time: memory, not results)
_MMAP = {"calib": CALIB_MMAP, "solve": SOLVE_MMAP}  # by phase (`_phase`)


@dataclass
class Solved:
    """What the solve produces: compact results and layer losses by node, and where the time went."""

    results: dict[str, Kept] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    calib_s: float = 0.0
    solve_s: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the run could not do as asked, for the user
    allocation: dict = field(default_factory=dict)  # --size-mb / --bpw: the budget, the prediction, formats chosen


@dataclass
class _Block:
    """One decoder block in the loop: its layers, their statistics and what the solved layers became."""

    index: int
    layers: list[LinearLayer]
    stats: BlockStats | None = None
    full: dict[str, QuantResult] = field(default_factory=dict)  # node -> result (tuning starts from these)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # weight name -> fake-quant W.T, for the block's runs
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # node -> output bias


class BlockLoop:
    """Calibrate and solve the decoder blocks in order, then the head layers.

    Two streams of per-batch environments run through the blocks: `quant`, through the blocks as quantized, and
    `float`, through the float blocks, kept only where TurboBoA's residual terms or block tuning's target read it.
    The float stream leaves each block once: in the statistics run when those read it and no true-sequential
    re-collection needs it at the block's inputs, else right after the block's layers are solved.
    """

    def __init__(self, proto: onnx.ModelProto, layers: list[LinearLayer], windows: np.ndarray, recipe: QuantRecipe,
                 solved: Solved, *, read: Callable[[LinearLayer], torch.Tensor], ep: str, folder):
        self.proto, self.layers, self.recipe, self.solved = proto, layers, recipe, solved
        self.read, self.folder = read, folder
        self.runner = BlockRunner(proto, partition(proto), ep=ep, folder=folder)
        self.attention = _attention_by_block(proto, recipe, solved.notes)
        self.mlps = _mlps_by_block(proto) if recipe.up_row_factor else {}
        self.residual = recipe.algo == "turboboa" and recipe.error_correction  # statistics read the float stream
        tuned = recipe.block_tune > 0 and recipe.block_tune_alpha > 0  # block tuning's target reads it
        set_mmap_threshold(_MMAP["calib"])
        self.quant = self.runner.start([windows[i : i + 1] for i in range(len(windows))])  # one window each
        self.float = [dict(e) for e in self.quant] if self.residual or tuned else None
        self.float_at = 0  # the block whose inputs the float stream holds
        self.bar = None
        self._inner: list[tuple[str, float]] = []  # open phases: kind, time spent in phases nested in it

    def run(self, head: list[LinearLayer] = (), *, progress: bool = True) -> None:
        """Every block (collect, solve, float stream, tune, advance), then the `head` layers with the head recipe."""
        self.bar = tqdm(range(len(self.runner.blocks)), desc="blocks", disable=not progress, unit="block")
        for b in self.bar:
            block = _Block(b, [l for l in self.layers if l.block == b])
            self.collect(block)
            self.solve(block)
            self.advance_float(b)
            if self.recipe.block_tune and block.layers:
                self.tune(block)
            self.advance(block)
            del block
            trim_heap()  # this block's statistics, weights and sessions are gone: hand the memory back
        if head:
            self.solve_head(head)

    def collect(self, block: _Block) -> None:
        """The block's statistics on the quantized stream (float weights), with the row factors its solvers use."""
        with self._phase("calib"):
            names = {l.node for l in block.layers}
            attn = self.attention.get(block.index, [])
            mlps = [m for m in self.mlps.get(block.index, []) if m.up in names]
            block.stats = stats = self._statistics(block.index, block.layers, attn, mlps)
            if self.recipe.v_row_factor:
                stats.v_rows = _value_rows(block.layers, attn, self.read)
            if mlps:
                stats.up_rows, stats.acts = _up_rows(self.proto, mlps, stats, self.read, self.folder), {}

    def solve(self, block: _Block) -> None:
        """Solve the block's layers: in lanes, or one after another on re-collected inputs (true-sequential)."""
        recipe = self.recipe
        with self._phase("solve"):
            if recipe.true_sequential:
                self._solve_in_order(block)
                return
            self.bar.set_postfix_str(f"solving {len(block.layers)} layers")
            weights = [self.read(l).to(recipe.device) for l in block.layers]
            for l, (res, loss) in zip(block.layers, solve_block(block.layers, weights, block.stats, recipe)):
                self._keep(block, l, res, loss)

    def _solve_in_order(self, block: _Block) -> None:
        """Each layer group sees the block's earlier layers quantized: its inputs are captured again first."""
        recollected = {block.layers[0].input} if block.layers else set()
        for l in block.layers:
            self.bar.set_postfix_str(l.role)
            if block.weights and l.input not in recollected:
                with self._phase("calib"):
                    again = self._statistics(block.index, [l], weights=block.weights, biases=block.biases)
                block.stats.cov[l.input] = again.cov[l.input]
                recollected.add(l.input)
            self._keep(block, l, *solve_layer(l, self.read(l).to(self.recipe.device), block.stats, self.recipe))

    def advance_float(self, b: int) -> None:
        """Move the float stream to block `b`'s outputs (tuning's target, the next block's inputs) if still before."""
        if self.float is None or self.float_at > b:
            return
        with self._phase("calib"):
            for _ in self.runner.run(b, self.float):
                pass
        self.float_at = b + 1

    def tune(self, block: _Block) -> None:
        """`tune_block` on the solved block: inputs from the quantized stream; target the float block on them,
        blended by `block_tune_alpha` toward the float stream's outputs. Keeps the tuned results with their losses."""
        recipe = self.recipe
        with self._phase("solve"):
            self.bar.set_postfix_str("block tuning")
            piece = self.runner.piece(block.index)
            reference = TorchGraph(piece)  # the float block has no mean-correcting biases (TorchGraph copies weights)
            graph = TorchGraph(with_output_bias(piece, block.biases)) if block.biases else reference
            feeds = self.runner.stacked(self.quant, graph.inputs, GROUP)
            target = ([[g[k] for k in graph.outputs] for g in self.runner.stacked(self.float, graph.outputs, GROUP)]
                      if recipe.block_tune_alpha else None)
            tuned, _, _ = tune_block(graph, feeds, {l.weight: block.full[l.node] for l in block.layers},
                                     reference=reference, float_outputs=target, alpha=recipe.block_tune_alpha,
                                     epochs=recipe.block_tune, seed=recipe.seed)
            for l in block.layers:
                res = tuned[l.weight]
                H = loss_hessian(block.stats.cov[l.input], recipe, res.qweight.device)
                self._keep(block, l, res, float(layer_loss(self.read(l).to(H.device), res.qweight, H)))

    def advance(self, block: _Block) -> None:
        """Run the now-quantized block on the quantized stream: the next block's inputs."""
        with self._phase("calib"):
            for _ in self.runner.run(block.index, self.quant, weights=block.weights, biases=block.biases):
                pass

    def solve_head(self, head: list[LinearLayer]) -> None:
        """Capture the head layers' inputs on the quantized stream past the last block; solve with the head recipe."""
        recipe = self.recipe.head_recipe()
        with self._phase("calib"):
            stats = BlockStats()
            stats.cov = {l.input: Covariance(l.k, device=recipe.device) for l in head}
            for cap in self.runner.run_head(self.quant, list(stats.cov), group=GROUP):
                for name, cov in stats.cov.items():
                    cov.add(cap[name])
        with self._phase("solve"):
            for l in head:
                kept, self.solved.losses[l.node] = solve_kept(l, self.read(l).to(recipe.device), stats, recipe)
                self.solved.results[l.node] = kept

    def _keep(self, block: _Block, l: LinearLayer, res: QuantResult, loss: float) -> None:
        """Record a solved layer: compact result and loss for the rewrite, fake-quant weight and bias for the runs."""
        block.full[l.node] = res
        self.solved.results[l.node] = compact(res)
        self.solved.losses[l.node] = loss
        block.weights[l.weight] = res.qweight.T.cpu().numpy()
        if res.bias is not None:
            block.biases[l.node] = res.bias.cpu().numpy()

    def _statistics(self, b: int, todo: list[LinearLayer], attn: list = (), mlps: list[GatedMlp] = (), *,
                    weights: dict | None = None, biases: dict | None = None) -> BlockStats:
        """Run block `b` on the quantized stream (float weights, or `weights` and `biases` of layers already solved);
        accumulate input covariances, attention statistics and, on the float stream, the residual terms dXXᵀ."""
        stats, accs = _empty_stats(todo, attn, mlps, self.recipe.device, self.residual)
        wanted = list(stats.cov) + [n for acc in accs for n in acc.capture_names()] + list(stats.acts)
        capture = list(dict.fromkeys(wanted))
        rows = {k: v for acc in accs for k, v in acc.capture_rows().items()}
        q_iter = self.runner.run(b, self.quant, capture=capture, weights=weights, biases=biases, advance=False,
                                 group=GROUP, rows=rows)
        f_iter = None
        if self.residual:
            move = not self.recipe.true_sequential  # re-collections would need the float stream at the block's inputs
            f_iter = self.runner.run(b, self.float, capture=capture, advance=move, group=GROUP, rows=rows)
            self.float_at = b + 1 if move else self.float_at
        for cap in q_iter:
            cap_fp = next(f_iter) if f_iter is not None else {}
            _accumulate(stats, accs, cap, cap_fp, b, todo)
            del cap, cap_fp  # not alive during the next batch's runs
        for _ in f_iter or ():
            pass
        return stats

    @contextmanager
    def _phase(self, kind: str):
        """A calibration ("calib": ORT runs) or solver ("solve") phase: its time, less nested phases', goes to
        `solved.calib_s` or `solve_s`; freed blocks from 2 MB up (calibration) or 8 MB up (solvers, whose many
        smaller temporaries are faster on the heap) go back to the OS at once, and the heap is trimmed after it."""
        start = time.perf_counter()
        self._inner.append((kind, 0.0))
        set_mmap_threshold(_MMAP[kind])
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            own = spent - self._inner.pop()[1]
            if self._inner:
                outer, inner = self._inner[-1]
                self._inner[-1] = (outer, inner + spent)
                set_mmap_threshold(_MMAP[outer])
            setattr(self.solved, f"{kind}_s", getattr(self.solved, f"{kind}_s") + own)
            trim_heap()


def _empty_stats(todo: list[LinearLayer], attn: list, mlps: list[GatedMlp], device: str,
                 residual: bool) -> tuple[BlockStats, list[AttentionStats]]:
    """Zeroed statistics for `todo`'s inputs, their attention blocks and gated-MLP activations; the attention
    accumulators, one per attention block."""
    stats = BlockStats()
    dims = {l.input: l.k for l in todo}
    stats.cov = {n: Covariance(d, device=device, residual=residual) for n, d in dims.items()}
    names = {l.node for l in todo}
    for a in attn:
        acc = AttentionStats(a, device=device, residual=residual)
        for role in ("q", "k", "v"):
            if getattr(a, role) in names:
                stats.attention[getattr(a, role)] = (role, acc)
    accs = list({id(acc): acc for _, acc in stats.attention.values()}.values())
    d_ff = {l.node: l.n for l in todo}
    stats.acts = {m.act: Covariance(d_ff[m.up], device=device) for m in mlps}
    return stats, accs


def _accumulate(stats: BlockStats, accs: list[AttentionStats], cap: dict, cap_fp: dict, b: int,
                todo: list[LinearLayer]) -> None:
    """Add one batch's captured tensors (and the float stream's, for residual terms) to the block's statistics."""
    for n, cov in stats.cov.items():
        try:
            cov.add(cap[n], cap_fp.get(n))
        except OnnxqError as err:
            readers = ", ".join(l.node for l in todo if l.input == n)
            raise OnnxqError(f"block {b}, input of {readers}: {err}") from None
    for acc in accs:
        acc.add(cap, cap_fp or None)
    for n, cov in stats.acts.items():
        cov.add(cap[n])


def _attention_by_block(proto: onnx.ModelProto, recipe: QuantRecipe, notes: list[str]) -> dict[int, list]:
    """Unfused attention blocks by decoder block, for the solvers with per-head statistics; notes the fused ones."""
    if recipe.algo not in ("aespa", "boa", "turboboa"):
        return {}
    found: dict[int, list] = {}
    plain = []  # fused attention ops, or one packed QKV projection: no per-head Q/K/V layers to solve
    for a in attention_blocks(proto):
        if a.kind == "unfused" and a.n_heads and a.block is not None:
            found.setdefault(a.block, []).append(a)
        if a.block is not None and (a.kind != "unfused" or a.fused_qkv):
            plain.append(a)
    if plain:
        how = plain[0].kind if plain[0].kind != "unfused" else "one packed QKV projection"
        notes.append(f"{recipe.algo}: {len(plain)} attention blocks are fused ({how}): their Q/K/V "
                     "projections were solved as plain layers, without per-head attention statistics")
    return found


def _mlps_by_block(proto: onnx.ModelProto) -> dict[int, list[GatedMlp]]:
    """Gated MLPs by decoder block (--up-row-factor)."""
    found: dict[int, list[GatedMlp]] = {}
    for m in gated_mlps(proto):
        found.setdefault(m.block, []).append(m)
    return found


def _value_rows(todo: list[LinearLayer], attn: list, read: Callable[[LinearLayer], torch.Tensor]) -> dict:
    """V node -> BoA's row factor from the block's float W_O, for attention blocks whose V and O are both solved here."""
    by_node = {l.node: l for l in todo}
    return {a.v: value_row_hessian(read(by_node[a.o]), a.n_heads, a.n_kv_heads)
            for a in attn if a.v in by_node and a.o in by_node}


def _up_rows(proto: onnx.ModelProto, mlps: list[GatedMlp], stats: BlockStats, read, folder) -> dict:
    """Up node -> its row Hessian (J Jᵀ) ⊙ E[a aᵀ], J the float map from the gated product to the MLP output."""
    layers = {l.node: l for l in linear_layers(proto) if l.node in {m.down for m in mlps}}
    out = {}
    for m in mlps:
        down = read(layers[m.down]).T  # [d_ff, d_model], ONNX orientation
        P = product_map(proto, m, down.shape[0], lambda t: read_array(t, folder))
        J = down if P is None else torch.from_numpy(P).to(down) @ down
        out[m.up] = up_row_hessian(J.to(stats.acts[m.act].device), stats.acts[m.act].hessian())
    return out


@dataclass
class Kept:
    """A solved layer as kept for the rewrite: its codes two to a byte where they fit in 4 bits, grids, output bias."""

    codes: torch.Tensor  # uint8 [N, ceil(K/2)], column 2j in the low nibble (bits <= 4); else [N, K]
    k: int
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    bias: torch.Tensor | None

    def unpacked(self) -> torch.Tensor:
        """The codes [N, K] as uint8."""
        if self.bits > 4:
            return self.codes
        return torch.stack((self.codes & 15, self.codes >> 4), -1).flatten(1)[:, : self.k]


def solve_kept(layer: LinearLayer, W: torch.Tensor, stats: BlockStats | None, recipe: QuantRecipe) -> tuple[Kept, float]:
    """`solve_layer` for a layer that is only written, not run: compacted, and solved ROW_PIECE rows at a time where
    the recipe's rows are independent (GPTQ, RTN), so no whole fake-quant weight of a large layer (an LM head) is held."""
    if recipe.algo not in ("gptq", "rtn") or len(W) <= ROW_PIECE:
        res, loss = solve_layer(layer, W, stats, recipe)
        return compact(res), loss
    parts, loss = [], 0.0
    for r in range(0, len(W), ROW_PIECE):
        res, piece_loss = solve_layer(layer, W[r:r + ROW_PIECE], stats, recipe)
        parts.append(compact(res))
        loss += piece_loss
        del res
    cat = lambda f: torch.cat([getattr(p, f) for p in parts])  # noqa: E731
    return replace(parts[0], codes=cat("codes"), scales=cat("scales"), zeros=cat("zeros"),
                   bias=None if parts[0].bias is None else cat("bias")), loss


def compact(res: QuantResult) -> Kept:
    """What the rewrite needs of `res`, small and on the CPU: no fake-quant weight, codes two to a byte (bits <= 4;
    the codes of 4-bit SmolLM2 are 101 MiB as bytes)."""
    codes = res.codes.to(torch.uint8).cpu()
    if res.bits <= 4:
        codes = torch.cat([codes, codes.new_zeros(len(codes), codes.shape[1] % 2)], 1)
        codes = codes[:, 0::2] | codes[:, 1::2] << 4
    return Kept(codes, res.codes.shape[1], res.scales.cpu(), res.zeros.cpu(), res.bits, res.group_size, res.sym,
                None if res.bias is None else res.bias.cpu())
