"""The quantize job: load → normalize → block-wise calibration on ORT → solve → rewrite → save."""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from . import __version__
from .analysis.attention import attention_blocks
from .analysis.layers import LinearLayer, linear_layers, partition
from .calibrate.stats import Covariance
from .errors import OnnxqError
from .graph.io import read_array
from .recipe import QuantRecipe
from .solve.dispatch import helper_peak_rss_mb
from .solve.heap import CALIB_MMAP, set_mmap_threshold, trim_heap
from .solve.loop import GROUP, BlockLoop, Kept, Solved, solve_kept


NODE_BYTES = 480  # graph bytes one MatMul -> MatMulNBits rewrite adds (node, attributes, three or four initializer
# headers; measured 6.7 KB for 14 layers of the tiny test Llama), for the --size-mb prediction


@dataclass
class QuantReport:
    """What a quantize run did and what it cost."""

    model: str
    output: str
    recipe: dict
    layers: int
    calib_tokens: int
    calib_seconds: float
    solve_seconds: float
    total_seconds: float
    peak_rss_mb: float  # this process
    layer_losses: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    deploy: dict = field(default_factory=dict)  # what the generation-ready folder holds (empty for a .onnx file)
    calib_generation_seconds: float = 0.0  # --calib self: sampling the windows from the float model (in total_seconds)
    allocation: dict = field(default_factory=dict)  # --size-mb / --bpw: budget, predicted size, formats chosen
    helper_rss_mb: float = 0.0  # the largest solver helper process (onnxq.solve.dispatch), peak since it started
    calib_text: str = ""  # --calib self: the sampled windows decoded, for reading (onnxq.calibrate.selfcalib.windows_text)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def select_layers(model: onnx.ModelProto, recipe: QuantRecipe) -> list[LinearLayer]:
    """Linear layers to quantize: every MatMul with a constant weight, minus `recipe.exclude` patterns."""
    pats = [re.compile(p) for p in recipe.exclude]
    chosen = [
        l for l in linear_layers(model)
        if l.role != "rotation" and not any(p.search(l.node) or p.search(l.role) for p in pats)
    ]  # the online rotations of --rotate stay float
    if not chosen:
        inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
        fed = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1:2] and n.input[1] in inputs]
        if fed:
            raise OnnxqError(f"MatMul weights are graph inputs, not constants (e.g. {fed[0]!r}): export the model "
                             "with its weights as initializers")
        raise OnnxqError("no quantizable MatMul with a constant weight found: check the model or relax --exclude")
    return chosen


def quantize(
    model: str | Path,
    recipe: QuantRecipe,
    output: str | Path,
    *,
    calib: str = "sotu-calib",
    ep: str = "cpu",
    progress: bool = True,
    windows: np.ndarray | None = None,
) -> QuantReport:
    """Quantize `model` (a .onnx file, HF folder or registry name) with `recipe`; write `output` atomically.

    `windows` ([n, seq_len] token ids) replaces tokenizing `calib`, e.g. for models without a tokenizer.
    """
    from .models.export import resolve_model

    output = Path(output)
    to_folder = output.suffix != ".onnx"  # a generation-ready folder (onnxruntime-genai) rather than one graph
    recipe = recipe.for_output(to_folder).validate()
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    set_mmap_threshold(CALIB_MMAP)  # freed weights and activations go back to the OS, not to a fragmenting heap
    build = _float_build(model, recipe, output) if to_folder else None  # before any calibration: fail fast
    path = resolve_model(str(model))
    proto, folder, rotation = _load_float(path, recipe, output, to_folder)
    sized = recipe.size_mb is not None or recipe.bpw is not None  # its size prediction reads the graph as it is now
    if not sized:
        proto = folder.release(proto)  # what normalize read leaves the proto too (back to the file where unchanged)
    layers = select_layers(proto, recipe)
    weights = {t.name: t for t in proto.graph.initializer}  # what `read` reads
    read = partial(_layer_weight, weights=weights, folder=folder)
    for l in layers:  # before any calibration: fail fast
        if l.weight not in weights:
            raise OnnxqError(f"weight of {l.node} is not a constant initializer: export the model with constant weights")
        _check_finite(l, read_array(weights[l.weight], folder))
    data_free = recipe.algo == "rtn" and recipe.grid != "hessian"  # nothing to calibrate
    in_blocks = [] if data_free else [l for l in layers if l.block is not None]  # calibrated block by block
    windows, gen_s, calib_text = _calibration_windows(model, path, recipe, calib, windows, data_free=data_free, ep=ep,
                                                      progress=progress)
    solved = Solved()
    if sized:  # choose each layer's format under the size budget, then let go of what normalize read
        recipe, proto = _choose_formats(proto, layers, in_blocks, windows, recipe, solved, build=build, weights=weights,
                                        read=read, folder=folder, ep=ep, progress=progress)
    _solve(proto, layers, in_blocks, windows, recipe, solved, to_folder=to_folder, read=read, folder=folder, ep=ep,
           progress=progress)
    info = _provenance(recipe, rotation, calib, windows, path)
    n_solved = len(solved.results)
    if to_folder:
        written = _write_folder(build, layers, solved.results, recipe, info, output, read)
    else:
        _write_file(proto, layers, solved.results, recipe, info, output, source=path, folder=folder)
        written = {}
    solved.results.clear()
    folder.memory.clear()
    return QuantReport(
        model=str(path),
        output=str(output),
        recipe=recipe.to_dict(),
        layers=n_solved,
        calib_tokens=int(windows.size),
        calib_seconds=round(solved.calib_s, 2),
        solve_seconds=round(solved.solve_s, 2),
        total_seconds=round(time.perf_counter() - t0, 2),
        peak_rss_mb=round(_peak_rss_mb(), 1),
        helper_rss_mb=round(helper_peak_rss_mb(), 1),
        layer_losses=solved.losses,
        notes=solved.notes,
        deploy=written,
        calib_generation_seconds=round(gen_s, 2),
        calib_text=calib_text,
        allocation=solved.allocation,
    )


def _load_float(path, recipe: QuantRecipe, output: Path, to_folder: bool):
    """The source graph, checked, normalized (and rotated with --rotate), its weights left on disk: the proto, the
    `folder` that says where each initializer's data is, and what was rotated (None)."""
    from .graph.io import check_external_data, check_graph, check_output_path, detach_weights, load_tensor_data
    from .graph.io import load_weightless
    from .graph.normalize import normalize

    # Weights stay on disk: each block's pieces, each solved layer and the final save read only what they need.
    proto, folder = load_weightless(path)
    check_graph(proto, Path(path).name, ops=True)  # it is going to run in ONNX Runtime: ops must be valid too
    check_external_data(proto, path)
    if not to_folder:
        check_output_path(output, path, proto)
    reads = _normalize_reads(proto, folder)
    load_tensor_data(reads, folder)
    keep, reads = [t.name for t in reads], None  # (a tensor wrapper would keep the whole loaded proto alive)
    proto, memory = detach_weights(proto, keep=keep)  # inline weights leave the proto too: it stays small
    for name in keep:  # normalize may change what it read: those tensors live in the proto for now
        if name in folder.memory:
            del folder.memory[name]
    folder.memory.update(memory)
    head_kept = any(re.search(p, "lm_head") for p in recipe.exclude)
    proto = normalize(proto, keep_tied=head_kept)  # a float tied head stays shared with the embedding
    rotation = None
    if recipe.rotate:
        proto, rotation = _rotate(proto, folder, recipe.seed)
    return proto, folder, rotation


def _calibration_windows(model, path, recipe: QuantRecipe, calib: str, windows: np.ndarray | None, *,
                         data_free: bool, ep: str, progress: bool) -> tuple[np.ndarray, float, str]:
    """The [n, seq_len] calibration ids (given, sampled by --calib self, or windows of the `calib` text), the seconds
    sampling took and the sampled text."""
    from .calibrate.textdata import load_text, token_windows
    from .models.export import load_tokenizer

    gen_s, calib_text = 0.0, ""
    if data_free:
        windows = np.zeros((0, 0), np.int64)
    elif windows is None and calib == "self":  # data-free: windows sampled from the float model itself
        from .calibrate.selfcalib import self_calibration

        windows, gen_s, calib_text = self_calibration(model, recipe, ep=ep, progress=progress)
    elif windows is None:
        text = load_text(calib)
        windows = token_windows(load_tokenizer(path), text, recipe.calib_seq_len, recipe.calib_windows, seed=recipe.seed,
                                random=True, special_tokens=recipe.special_tokens)
    elif windows.ndim != 2 or windows.size == 0:
        raise OnnxqError("calibration windows must be a non-empty [n, seq_len] array of token ids")
    trim_heap()  # tokenizing the calibration text leaves ~80 MB of freed heap on SmolLM2
    return windows, gen_s, calib_text


def _choose_formats(proto: onnx.ModelProto, layers: list[LinearLayer], in_blocks: list[LinearLayer],
                    windows: np.ndarray, recipe: QuantRecipe, solved: Solved, *, build, weights: dict, read, folder,
                    ep: str, progress: bool) -> tuple[QuantRecipe, onnx.ModelProto]:
    """--size-mb / --bpw: the recipe with each decoder layer's format, and the proto with what normalize read let go
    (`weights` updated to it)."""
    from .graph.io import load_model

    tc = time.perf_counter()
    to_folder = build is not None
    graph = load_model(build / "model.onnx", load_weights=False) if to_folder else proto
    formats, solved.allocation = _allocate(proto, graph, layers, in_blocks, windows, recipe, read=read, ep=ep,
                                           folder=folder, progress=progress, packed_qkv=to_folder)
    solved.calib_s += time.perf_counter() - tc
    proto = folder.release(proto)
    weights.clear()
    weights.update({t.name: t for t in proto.graph.initializer})
    return replace(recipe, layer_formats=formats), proto


def _solve(proto: onnx.ModelProto, layers: list[LinearLayer], in_blocks: list[LinearLayer], windows: np.ndarray,
           recipe: QuantRecipe, solved: Solved, *, to_folder: bool, read, folder, ep: str, progress: bool) -> None:
    """Every layer solved into `solved`: decoder blocks calibrated one by one, then the layers outside them (a
    folder's head after the last block's output, the rest uncalibrated)."""
    if in_blocks:
        head = [l for l in layers if l.block is None and to_folder]  # calibrated after the last block
        BlockLoop(proto, in_blocks, windows, recipe, solved, read=read, ep=ep, folder=folder).run(head, progress=progress)
    for l in layers:
        if l.node not in solved.results:  # outside decoder blocks (e.g. an included lm_head) or data-free RTN
            W = read(l)
            solved.results[l.node], solved.losses[l.node] = solve_kept(
                l, W, None, recipe.head_recipe() if to_folder and l.block is None else recipe)
            del W
            trim_heap()


def _write_file(proto: onnx.ModelProto, layers: list[LinearLayer], results: dict, recipe: QuantRecipe, info: dict,
                output: Path, *, source, folder) -> None:
    """The rewritten graph with its provenance, saved atomically; the float weights left (embeddings, norms, excluded
    layers) are copied from the source file or memory."""
    from .graph.io import save_model_atomic
    from .graph.metadata import add_provenance

    out = _rewrite(proto, layers, results, recipe)
    add_provenance(out, info)
    save_model_atomic(out, output, source=source, weights=folder)


def _allocate(proto: onnx.ModelProto, graph: onnx.ModelProto, layers: list[LinearLayer], in_blocks: list[LinearLayer],
              windows: np.ndarray, recipe: QuantRecipe, *, read, ep: str, folder, progress: bool,
              packed_qkv: bool) -> tuple[dict[str, list[int]], dict]:
    """Each decoder layer's [bits, group] under --size-mb / --bpw (sensitivities measured on the float stream, then the
    knapsack of solve/allocate.py) and what was predicted. `graph` is the one written (its other tensors count against
    --size-mb); layers one MatMul holds (the genai graph's packed QKV) share a format."""
    from .graph.io import stored_bytes
    from .solve.allocate import MB, Candidate, allocate, bpw_budget, candidates, matmulnbits_bytes

    every = candidates(target=recipe.target)  # sensitivities of all (cached); the choice goes no lower than --bits
    cands = [c for c in every if c.bits >= recipe.bits] or list(every)
    units: dict[tuple, list[LinearLayer]] = {}
    for l in in_blocks:
        qkv = packed_qkv and l.role in ("q_proj", "k_proj", "v_proj")
        units.setdefault((l.block, "qkv") if qkv else (l.node,), []).append(l)
    external = packed_qkv or any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    size = lambda ls, c: matmulnbits_bytes(ls[0].k, sum(l.n for l in ls), c, sym=recipe.sym,  # noqa: E731
                                           float_zero=recipe.float_zero and c.bits < 8, external=external)
    losses = _sensitivity(proto, in_blocks, windows, recipe, every, read=read, ep=ep, folder=folder, progress=progress)
    unit_losses = [{c: sum(losses[l.node][c] for l in ls) for c in cands} for ls in units.values()]
    unit_sizes = [{c: size(ls, c) for c in cands} for ls in units.values()]  # one MatMul per unit
    head = recipe.head_recipe() if packed_qkv else recipe  # layers outside the blocks: the head's format in a folder
    others = [l for l in layers if l.block is None]
    replaced = ({n.input[1] for n in graph.graph.node if n.op_type == "MatMul" and len(n.input) > 1} if packed_qkv
                else {l.weight for l in layers})  # a folder quantizes every MatMul of the builder's graph
    fixed = sum(stored_bytes(_tensor_bytes(t), external, was_external=t.data_location == onnx.TensorProto.EXTERNAL)
                for t in graph.graph.initializer if t.name not in replaced)
    fixed += graph.ByteSize() - sum(len(t.raw_data) for t in graph.graph.initializer)  # the graph itself, and
    fixed += NODE_BYTES * (len(units) + len(others))  # what each MatMulNBits node and its initializer headers add
    fixed += sum(matmulnbits_bytes(l.k, l.n, Candidate(head.bits, head.group_size), sym=recipe.sym, float_zero=False,
                                   external=external) for l in others)
    if recipe.bpw is not None:
        budget = bpw_budget(recipe.bpw, [(l.k, l.n) for l in in_blocks])
    else:
        budget = int(recipe.size_mb * MB) - fixed
        if budget <= 0:
            raise OnnxqError(f"--size-mb {recipe.size_mb:g} leaves nothing for the decoder layers: the rest of the model "
                             f"takes {fixed / MB:.1f} MB; raise the budget")
    chosen = allocate(unit_losses, unit_sizes, budget)
    layer_bytes = sum(sizes[c] for sizes, c in zip(unit_sizes, chosen))
    counts = {str(c): sum(len(ls) for ls, x in zip(units.values(), chosen) if x == c) for c in dict.fromkeys(chosen)}
    info = {"budget_mb": recipe.size_mb, "bpw": recipe.bpw, "predicted_mb": round((fixed + layer_bytes) / MB, 6),
            "decoder_layers_mb": round(layer_bytes / MB, 6), "formats": counts}
    return {l.node: [c.bits, c.group_size] for ls, c in zip(units.values(), chosen) for l in ls}, info


def _tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, whether inline or external (from its type and dims)."""
    return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _sensitivity(proto: onnx.ModelProto, in_blocks: list[LinearLayer], windows: np.ndarray, recipe: QuantRecipe, cands,
                 *, read, ep: str, folder, progress: bool) -> dict[str, dict]:
    """Layer node -> {candidate: the GPTQ loss tr(ΔW H ΔWᵀ) it reaches}, H from the float stream, block by block;
    cached under $ONNXQ_CACHE/sensitivity by everything it depends on, so other budgets reuse it."""
    import hashlib
    import pickle

    from .calibrate.runner import BlockRunner
    from .models.registry import cache_dir
    from .solve.allocate import candidate_losses

    key = hashlib.sha256(pickle.dumps((proto.SerializeToString(), windows.tobytes(), windows.shape, cands, recipe.sym,
                                       recipe.float_zero, recipe.damp, [l.node for l in in_blocks]))).hexdigest()[:24]
    cached = cache_dir() / "sensitivity" / f"{key}.pkl"
    if cached.is_file():
        return pickle.loads(cached.read_bytes())
    runner = BlockRunner(proto, partition(proto), ep=ep, folder=folder)
    envs = runner.start([windows[i : i + 1] for i in range(len(windows))])
    losses = {}
    for b in tqdm(range(len(runner.blocks)), desc="sensitivity", disable=not progress, unit="block"):
        todo = [l for l in in_blocks if l.block == b]
        cov = {l.input: Covariance(l.k, device=recipe.device) for l in todo}
        for cap in runner.run(b, envs, capture=list(cov), group=GROUP):
            for name, c in cov.items():
                c.add(cap[name])
        for l in todo:
            losses[l.node] = candidate_losses(read(l).to(recipe.device), cov[l.input].hessian(), cands,
                                              sym=recipe.sym, float_zero=recipe.float_zero, damp=recipe.damp)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(losses))
    os.replace(tmp, cached)
    return losses


def _provenance(recipe: QuantRecipe, rotation: str | None, calib, windows: np.ndarray, path) -> dict:
    """The model's `onnxq.*` metadata: the full recipe, what was rotated, the calibration and the source."""
    info = {"version": __version__, **{k: v for k, v in recipe.to_dict().items() if k not in ("device", "seed")}}
    info.update(rotation=rotation, source=Path(path).name,
                calibration={"text": str(calib), "windows": int(len(windows)),
                             "seq_len": int(windows.shape[1]) if windows.ndim == 2 else 0, "seed": recipe.seed})
    if str(calib) == "self":  # data-free: the sampler's settings
        from .calibrate.selfcalib import TEMPERATURE, TOP_K

        info["calibration"] |= {"temperature": TEMPERATURE, "top_k": TOP_K}
    info["algorithm"] = info.pop("algo")
    return info


def _float_build(model, recipe: QuantRecipe, output: Path) -> Path:
    """The onnxruntime-genai builder's float graph for a Hugging Face folder or registry name (the deploy front-end)."""
    from .deploy.builder import float_build
    from .deploy.genai import check_folder_output
    from .models.export import hf_folder
    from .models.registry import REGISTRY

    if recipe.rotate:
        raise OnnxqError("--rotate changes the graph around the weights, which the generation-ready folder does not "
                         "carry yet: write a .onnx file (-o FILE.onnx) or drop --rotate")
    if recipe.format != "nbits":
        raise OnnxqError("a generation-ready folder holds MatMulNBits: drop --format qdq or write a .onnx file")
    if recipe.v_int_zero:
        raise OnnxqError("the genai graph packs Q, K and V into one MatMulNBits, so V cannot keep integer zero points "
                         "beside float ones: drop --v-int-zero or write a .onnx file")
    spec = Path(str(model))
    check_folder_output(output)
    if spec.is_dir() and (spec / "config.json").is_file():
        return float_build(spec)
    if str(model) in REGISTRY:
        return float_build(hf_folder(str(model)))
    raise OnnxqError(f"a generation-ready folder is built from a Hugging Face folder or a registry name, not {model}: "
                     "give one of those, or an output path ending in .onnx")


def _write_folder(build: Path, layers: list[LinearLayer], results: dict, recipe: QuantRecipe, info: dict,
                  output: Path, read) -> dict:
    """The builder's graph with the solved weights (matched layer by layer) as an onnxruntime-genai folder; `results`
    are used up."""
    from .deploy.genai import match_layers, packed_weight, write_folder
    from .graph.io import load_model as load

    graph = load(build / "model.onnx", load_weights=False)
    matched = match_layers(graph, build, layers, lambda l: read(l).T.numpy())
    missing = sorted({l.node for l in layers} - {p.node for parts in matched.values() for p in parts})
    if missing:
        raise OnnxqError(f"the builder's graph has no MatMul holding {missing[0]} ({len(missing)} layers unmatched): "
                         "write a .onnx file instead (-o FILE.onnx)")
    biases = {}
    for name, parts in matched.items():
        if any(results[p.node].bias is not None for p in parts):
            biases[name] = np.concatenate([results[p.node].bias.numpy() if results[p.node].bias is not None
                                           else np.zeros(p.n, np.float32) for p in parts]).astype(np.float32)
    packed = {}
    for name, parts in matched.items():  # one builder MatMul at a time, letting go of its layers' results
        packed[name] = packed_weight([_quantized_weight(results.pop(p.node)) for p in parts], name)
    written = write_folder(build, graph, packed, biases, accuracy_level=recipe.accuracy_level, provenance=info,
                           out=output)
    return {"front_end": "onnxruntime-genai model builder (fp32 CPU graph)", "float_build": str(build), **written}


def _quantized_weight(r: Kept):
    """A solved layer as the rewrite's QuantizedWeight (rows = output channels)."""
    from .formats.rewrite import QuantizedWeight

    return QuantizedWeight(codes=r.unpacked().numpy(), scales=r.scales.float().cpu().numpy(),
                           zeros=None if r.sym else r.zeros.cpu().numpy(), bits=r.bits, group_size=r.group_size)


def _layer_weight(layer: LinearLayer, *, weights: dict, folder) -> torch.Tensor:
    """W[d_out, d_in] float32 of `layer`, read from its initializer (or the source's data file) on demand."""
    return torch.from_numpy(read_array(weights[layer.weight], folder).astype(np.float32, copy=False)).T.contiguous()


def _rotate(proto: onnx.ModelProto, folder, seed: int) -> tuple[onnx.ModelProto, str]:
    """`preprocess.rotate` on a weightless proto (R1, R2 and R4): load the weights it rewrites, rotate, put them into
    `folder`'s memory. Returns the rotated proto and what was rotated, in words."""
    from .graph.io import detach_weights, load_tensor_data
    from .preprocess.rotate import head_tensors, is_hadamard_order, residual_plan, rotate_residual

    plan = residual_plan(proto)
    weight = {l.node: l.weight for l in linear_layers(proto)}
    heads = [(weight[b.v], weight[b.o], b.head_dim) for b in attention_blocks(proto)
             if b.kind == "unfused" and b.v in weight and b.o in weight and b.head_dim]
    names = set(plan.tensors()) | set(head_tensors(proto, heads))
    o_proj = {o for _, o, _ in heads}  # R2 already rotates their inputs; the other writers (MLP down) get R4
    online = [w for w, _ in plan.writers if w not in o_proj]
    rows = {t.name: t.dims[0] for t in proto.graph.initializer if t.name in online}
    load_tensor_data([t for t in proto.graph.initializer if t.name in names], folder)
    proto = rotate_residual(proto, plan, seed=seed, heads=heads, online=online)
    proto, rotated = detach_weights(proto)
    folder.memory.update(rotated)
    r4 = sum(is_hadamard_order(rows[w]) for w in online)
    skipped = "; the others' widths have no Hadamard matrix" if r4 < len(online) else ""
    return proto, (f"R1 (residual stream of width {plan.hidden}), R2 ({len(heads)} attention blocks), "
                   f"R4 ({r4} of {len(online)} MLP down projections{skipped})")


def _normalize_reads(model: onnx.ModelProto, folder) -> list[onnx.TensorProto]:
    """Initializers normalize may rewrite (weights of Gemm, Transpose-fed weights, likely copies of one weight, read
    from the model's `folder`): loaded before it runs."""
    from .graph.normalize import duplicate_candidates

    names = {t for n in model.graph.node if n.op_type in ("Gemm", "Transpose")
             for t in (n.input[1:3] if n.op_type == "Gemm" else n.input[:1])}
    names |= duplicate_candidates(model, folder)
    return [t for t in model.graph.initializer if t.name in names]


def _check_finite(layer: LinearLayer, w: np.ndarray) -> None:
    """NaN/Inf weights would poison every solver: name the layer instead."""
    if not np.isfinite(w).all():
        bad = int(w.size - np.isfinite(w).sum())
        raise OnnxqError(f"weight of layer {layer.node} has {bad} NaN/Inf values: fix the model (or --exclude the layer)")


def _rewrite(proto: onnx.ModelProto, layers: list[LinearLayer], results: dict, recipe: QuantRecipe) -> onnx.ModelProto:
    """Write the solved layers as MatMulNBits or DequantizeLinear→MatMul (+ Add of their output bias, if any)."""
    from .formats.rewrite import add_output_bias, to_matmulnbits, to_qdq

    dtypes = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in proto.graph.initializer}
    biases = {l.node: results[l.node].bias.numpy().astype(dtypes[l.weight]) for l in layers
              if results[l.node].bias is not None}
    qw = {l.node: _quantized_weight(results[l.node]) for l in layers}
    if recipe.format == "nbits":
        out = to_matmulnbits(proto, qw, accuracy_level=recipe.accuracy_level)
    else:
        out = to_qdq(proto, qw)
    return add_output_bias(out, biases) if biases else out


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
