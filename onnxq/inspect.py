"""`onnxq inspect`: ops, parameters by precision, quantized layers and their bits per weight, attention map,
provenance, target lint and a side-by-side diff. Sizes come from dims, data types and external-data metadata:
weight data is never read. The JSON layout is documented in docs/inspect.md (bump SCHEMA_VERSION on changes).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto, helper
from rich.console import Console
from rich.table import Table

from .formats import targets
from .analysis.layers import block_index, block_numbers, linear_layers
from .analysis.attention import attention_blocks
from .graph.io import load_model
from .graph.metadata import read_provenance

SCHEMA_VERSION = 1
MS_DOMAIN = "com.microsoft"
_SUBBYTE = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT2: 2, TensorProto.UINT2: 2, TensorProto.FLOAT4E2M1: 4}
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_EMBED = re.compile(r"embed|wte|wpe|word_embeddings|tok_emb", re.IGNORECASE)
_TARGET_FORMAT = {"MatMulNBits": "nbits", "GatherBlockQuantized": "gather", "DQ→MatMul": "qdq", "DQ→Gemm": "qdq"}
_ATTENTION_KEYS = ("block", "kind", "q", "k", "v", "o", "fused_qkv", "n_heads", "n_kv_heads", "head_dim", "rope", "causal")
_DIFF_KEYS = ("format", "bits", "block_size", "sym", "bpw", "bytes")


@dataclass
class Layer:
    """One weight matrix (linear layer or embedding table): how it is stored and what it costs."""

    name: str  # the node using the weight (MatMul / MatMulNBits / Gather / ...), as linear_layers names it
    op: str  # that node's op type
    format: str  # "MatMulNBits", "DQ→MatMul", "GatherBlockQuantized", "DQ→Gather", ... or "float"
    dtype: str  # storage type of the weight initializer
    bits: int  # storage bits per weight (3-bit grids are stored as 4)
    block_size: int | None  # elements per scale along K; -1 per channel, 0 per tensor, None for float
    sym: bool | None  # no zero point stored (the op's default applies)
    zero_point: str | None  # "uint4 packed", "uint4", "float16", ... or None
    scale_dtype: str | None
    accuracy_level: int | None  # MatMulNBits only (0 = unset)
    bias: bool  # MatMulNBits g_idx or bias input present
    k: int  # rows of the [K, N] weight (vocabulary for embeddings)
    n: int
    bytes: int  # stored bytes: weight + scales + zero points (+ g_idx)
    bpw: float  # bytes * 8 / (K * N), padding included
    bpw_nominal: float  # bits + (scale bits + zero-point bits) / elements per scale
    weight: str  # initializer holding the weight (shared by tied layers)
    role: str = "linear"
    attention: str | None = None  # "q", "k", "v", "o" or "qkv" from the attention analysis
    block: int | None = None
    tensors: tuple[str, ...] = field(default=(), repr=False)  # every initializer the layer owns

    @property
    def bytes_fp32(self) -> int:
        """Size of the same weight in fp32."""
        return self.k * self.n * 4

    def to_dict(self) -> dict:
        """JSON-ready dict (without the internal tensor list)."""
        d = asdict(self)
        del d["tensors"]
        d["bytes_fp32"] = self.bytes_fp32
        return d


def inspect_model(path: str | Path, *, target: str | None = None, diff: str | Path | None = None) -> dict:
    """A JSON-ready description of the model at `path` (see docs/inspect.md); weight data is not loaded."""
    if target is not None:
        targets.support(target)  # an unknown target fails before any loading
    model = load_model(path, load_weights=False)
    layers = find_layers(model)
    info = _summary(model, Path(path), layers)
    if target is not None:
        info["target"] = _lint(layers, target)
    if diff is not None:
        other_model = load_model(diff, load_weights=False)
        other = _summary(other_model, Path(diff), find_layers(other_model))
        info["diff"] = _diff(info, other)
        if other["weights"]["float_params"] > info["weights"]["float_params"]:  # OTHER is the (more) float source
            info["compression"] = _ratio(str(diff), other["parameters"]["bytes"], info["parameters"]["bytes"])
    return info


# ---- sizes ------------------------------------------------------------------------------------------------------


def dtype_name(data_type: int) -> str:
    """"float32", "float16", "int4", "uint8", ... for an ONNX TensorProto data type."""
    name = TensorProto.DataType.Name(data_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def dtype_bits(data_type: int) -> int:
    """Bits per element of an ONNX data type."""
    if data_type in _SUBBYTE:
        return _SUBBYTE[data_type]
    try:
        return helper.tensor_dtype_to_np_dtype(data_type).itemsize * 8
    except (KeyError, TypeError, ValueError):
        return 8


def tensor_bytes(t: TensorProto) -> int:
    """Stored bytes of an initializer from its external-data length, else dims and data type (data is not read)."""
    length = _external(t).get("length")
    if length is not None:
        return int(length)
    if t.data_type == TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    return -(-math.prod(t.dims) * dtype_bits(t.data_type) // 8)


def _external(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data} if t.data_location == TensorProto.EXTERNAL else {}


# ---- weight layers ----------------------------------------------------------------------------------------------


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Every weight matrix in graph order: MatMulNBits, DequantizeLinear -> MatMul/Gemm/Gather,
    GatherBlockQuantized, and float MatMul/Gemm/Gather on a 2-D initializer (directly or through a Transpose)."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output if o}
    layers = []
    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.domain == MS_DOMAIN and node.op_type == "MatMulNBits" and node.input[1] in inits:
            layers.append(_nbits_layer(node, name, inits))
        elif node.domain == MS_DOMAIN and node.op_type == "GatherBlockQuantized" and node.input[0] in inits:
            layers.append(_gather_layer(node, name, inits))
        elif node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm", "Gather") and len(node.input) > 1:
            w = node.input[0 if node.op_type == "Gather" else 1]
            src = producer.get(w)
            if src is not None and src.op_type == "DequantizeLinear" and len(inits.get(src.input[0], TensorProto()).dims) >= 2:
                layers.append(_dq_layer(node, name, src, inits))
            elif (layer := _float_layer(node, name, w, src, inits)) is not None:
                layers.append(layer)
    return layers


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _zp_type(zp: str, bits: int, inits: dict[str, TensorProto]) -> str | None:
    """Zero-point storage: "uint4 packed" (MatMulNBits-style uint8), its data type, "computed" (not a constant) or None."""
    if not zp:
        return None
    if zp not in inits:
        return "computed"
    return f"uint{bits} packed" if inits[zp].data_type == TensorProto.UINT8 and bits < 8 else dtype_name(inits[zp].data_type)


def _quantized(
    node: onnx.NodeProto, name: str, fmt: str, inits: dict[str, TensorProto], *, weight: str, scale: str, zp: str,
    bits: int, k: int, n: int, per_scale: float, block_size: int, extra: tuple[str, ...] = (),
    accuracy_level: int | None = None, bias: bool = False, role: str = "linear",
) -> Layer:
    """A quantized layer's sizes from its initializers (weight, scale, zero point and `extra` ones such as g_idx)."""
    tensors = tuple(x for x in (weight, scale, zp, *extra) if x and x in inits)
    stored = sum(tensor_bytes(inits[x]) for x in tensors)
    zp_type = _zp_type(zp, bits, inits)
    scale_t = inits.get(scale)
    scale_bits = dtype_bits(scale_t.data_type) if scale_t is not None else 0
    zp_bits = 0 if zp not in inits else bits if zp_type.endswith("packed") else dtype_bits(inits[zp].data_type)
    return Layer(
        name, node.op_type, fmt, dtype_name(inits[weight].data_type), bits, block_size, not zp, zp_type,
        dtype_name(scale_t.data_type) if scale_t is not None else None, accuracy_level, bias, k, n, stored,
        round(stored * 8 / max(k * n, 1), 6), round(bits + (scale_bits + zp_bits) / per_scale, 6), weight, role=role,
        tensors=tensors,
    )


def _nbits_layer(node: onnx.NodeProto, name: str, inits: dict[str, TensorProto]) -> Layer:
    a = _attrs(node)
    ins = list(node.input) + [""] * (6 - len(node.input))
    bits, block = a.get("bits", 4), a["block_size"]
    return _quantized(
        node, name, "MatMulNBits", inits, weight=ins[1], scale=ins[2], zp=ins[3], bits=bits, k=a["K"], n=a["N"],
        per_scale=block, block_size=block, extra=(ins[4],), accuracy_level=a.get("accuracy_level", 0),
        bias=bool(ins[4] or ins[5]),
    )


def _gather_layer(node: onnx.NodeProto, name: str, inits: dict[str, TensorProto]) -> Layer:
    a = _attrs(node)
    data = inits[node.input[0]]
    bits, block = a.get("bits", 4), a.get("block_size", 128)
    dims = list(data.dims)
    if data.data_type == TensorProto.UINT8:
        dims[-1] = dims[-1] * 8 // bits  # packed along the last axis
    else:
        bits = dtype_bits(data.data_type)
    return _quantized(
        node, name, "GatherBlockQuantized", inits, weight=node.input[0], scale=node.input[2],
        zp=node.input[3] if len(node.input) > 3 else "", bits=bits, k=math.prod(dims[:-1]), n=dims[-1],
        per_scale=block, block_size=block, role=_lookup_role(name),
    )


def _dq_layer(node: onnx.NodeProto, name: str, dq: onnx.NodeProto, inits: dict[str, TensorProto]) -> Layer:
    x = inits[dq.input[0]]
    dims = list(x.dims)
    if node.op_type == "Gemm" and _attrs(node).get("transB", 0):
        dims = dims[::-1]
    scale = dq.input[1]
    scales = math.prod(inits[scale].dims) if scale in inits else 1
    block = _attrs(dq).get("block_size", 0)
    return _quantized(
        node, name, f"DQ→{node.op_type}", inits, weight=x.name, scale=scale, zp=dq.input[2] if len(dq.input) > 2 else "",
        bits=dtype_bits(x.data_type), k=math.prod(dims[:-1]), n=dims[-1], per_scale=math.prod(dims) / scales,
        block_size=block if block > 0 else 0 if scales == 1 else -1,
        role=_lookup_role(name) if node.op_type == "Gather" else "linear",
    )


def _float_layer(
    node: onnx.NodeProto, name: str, w: str, src: onnx.NodeProto | None, inits: dict[str, TensorProto]
) -> Layer | None:
    """A float weight read directly or through a Transpose (tied lm_head); None if `w` is not a 2-D float constant."""
    t, transposed = inits.get(w), False
    if t is None and src is not None and src.op_type == "Transpose" and src.input[0] in inits:
        t, transposed = inits[src.input[0]], True
    if t is None or len(t.dims) != 2 or t.data_type not in _FLOATS:
        return None
    if node.op_type == "Gather" and (transposed or _attrs(node).get("axis", 0) != 0):
        return None
    k, n = t.dims
    if transposed != bool(node.op_type == "Gemm" and _attrs(node).get("transB", 0)):
        k, n = n, k
    bits = dtype_bits(t.data_type)
    return Layer(name, node.op_type, "float", dtype_name(t.data_type), bits, None, None, None, None, None, False,
                 k, n, tensor_bytes(t), float(bits), float(bits), t.name, tensors=(t.name,),
                 role=_lookup_role(name) if node.op_type == "Gather" else "linear")


def _lookup_role(name: str) -> str:
    return "embed" if _EMBED.search(name) else "gather"


# ---- structure: roles, blocks, attention --------------------------------------------------------------------------


def float_view(model: onnx.ModelProto, layers: list[Layer]) -> onnx.ModelProto:
    """A data-free copy in which each layer reads a float stub [K, N]: MatMul(x, W) or Gather(W, ids).

    `linear_layers` and `attention_blocks` (written for float graphs) then see quantized layers too; every
    initializer keeps its name, dims and type but no data, so the copy is small whatever the model size.
    """
    by_name = {l.name: l for l in layers}
    inits = [_stub(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer]
    nodes = []
    for node in model.graph.node:
        layer = by_name.get(node.name or node.output[0])
        if layer is None:
            nodes.append(node)
            continue
        w = f"{layer.name}::weight"
        inits.append(_stub(w, TensorProto.FLOAT, [layer.k, layer.n]))
        if layer.op in ("Gather", "GatherBlockQuantized"):
            nodes.append(helper.make_node("Gather", [w, node.input[1]], node.output[:1], name=node.name))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], w], node.output[:1], name=node.name))
    g = model.graph
    graph = helper.make_graph(nodes, g.name, g.input, g.output, inits, value_info=g.value_info)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _stub(name: str, data_type: int, dims: list[int]) -> TensorProto:
    t = TensorProto(name=name, data_type=data_type)
    t.dims.extend(dims)
    return t


def _structure(model: onnx.ModelProto, layers: list[Layer]) -> dict:
    """Fill in each layer's role, block and attention role; return the decoder blocks and attention map."""
    view = float_view(model, layers)
    linear = {l.node: l for l in linear_layers(view)}
    attention = attention_blocks(view)
    roles = {getattr(a, r): r for a in attention for r in ("q", "k", "v", "o") if getattr(a, r)}
    roles.update({a.fused_qkv: "qkv" for a in attention if a.fused_qkv})
    for layer in layers:
        found = linear.get(layer.name)
        layer.block = found.block if found else block_index(layer.name)
        layer.role = found.role if found else layer.role
        layer.attention = roles.get(layer.name)
    blocks = block_numbers(model)
    per_block = Counter(l.block for l in layers if l.block is not None and l.role != "rotation")
    return {
        "count": len(blocks),
        "layers_per_block": max(per_block.values()) if per_block else 0,
        "attention": [{k: v for k, v in a.to_dict().items() if k in _ATTENTION_KEYS} for a in attention],
    }


# ---- summary ------------------------------------------------------------------------------------------------------


def _summary(model: onnx.ModelProto, path: Path, layers: list[Layer]) -> dict:
    g = model.graph
    init_names = {t.name for t in g.initializer}
    ops: dict[str, Counter] = {}
    for n in g.node:
        ops.setdefault(n.domain or "ai.onnx", Counter())[n.op_type] += 1
    structure = _structure(model, layers)
    params = _parameters(model, layers)
    external = _external_files(model, path)
    return {
        "schema_version": SCHEMA_VERSION,
        "path": str(path),
        "file_bytes": path.stat().st_size + sum(f["file_bytes"] for f in external),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "inputs": [_value(v) for v in g.input if v.name not in init_names],
        "outputs": [_value(v) for v in g.output],
        "nodes": len(g.node),
        "ops": {d: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for d, c in sorted(ops.items())},
        "parameters": params,
        "external_data": external,
        "weights": _weights(layers),
        "compression": _ratio("fp32 estimate", params["fp32_bytes"], params["bytes"]),
        "blocks": structure,
        "layers": [l.to_dict() for l in layers],
        "provenance": read_provenance(model),
        "problems": _requirements(model),
        "target": None,
        "diff": None,
    }


def _value(v: onnx.ValueInfoProto) -> dict:
    t = v.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in t.shape.dim] if t.HasField("shape") else None
    return {"name": v.name, "dtype": dtype_name(t.elem_type) if t.elem_type else "?", "shape": shape}


def _parameters(model: onnx.ModelProto, layers: list[Layer]) -> dict:
    """Parameters and bytes by precision: quantized weights as "int<bits>" (logical count), their scales and zero
    points as "scales/zero points" (bytes only), every other initializer by data type; plus the fp32 estimate."""
    codes = {l.weight: l for l in layers if l.format != "float"}
    meta = {t for l in codes.values() for t in l.tensors if t != l.weight}
    rows: dict[str, list[int]] = {}
    fp32 = 0
    for t in model.graph.initializer:
        size, count = tensor_bytes(t), math.prod(t.dims)
        if t.name in codes:
            label, params = f"int{codes[t.name].bits}", codes[t.name].k * codes[t.name].n
            fp32 += params * 4
        elif t.name in meta:
            label, params = "scales/zero points", 0
        else:
            label, params = dtype_name(t.data_type), count
            fp32 += count * 4 if t.data_type in _FLOATS else size
        row = rows.setdefault(label, [0, 0, 0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + params, row[2] + size
    return {
        "total": sum(r[1] for r in rows.values()),
        "bytes": sum(r[2] for r in rows.values()),
        "fp32_bytes": fp32,
        "by_precision": [
            {"precision": k, "tensors": r[0], "params": r[1], "bytes": r[2]}
            for k, r in sorted(rows.items(), key=lambda kv: -kv[1][2])
        ],
    }


def _external_files(model: onnx.ModelProto, path: Path) -> list[dict]:
    """Each external-data file: tensors and bytes it holds (from metadata), and whether it sits next to the model."""
    files: dict[str, dict] = {}
    for t in model.graph.initializer:
        ext = _external(t)
        if ext:
            f = files.setdefault(ext.get("location", "?"), {"file": ext.get("location", "?"), "tensors": 0, "bytes": 0})
            f["tensors"] += 1
            f["bytes"] += tensor_bytes(t)
    for f in files.values():
        p = path.parent / f["file"]
        f["present"] = p.is_file()
        f["file_bytes"] = p.stat().st_size if f["present"] else 0
    return sorted(files.values(), key=lambda f: f["file"])


def _weights(layers: list[Layer]) -> dict:
    """Quantized vs float weight matrices; shared (tied) weights are counted once in params and bytes."""
    unique = list({l.weight: l for l in reversed(layers)}.values())
    params = sum(l.k * l.n for l in unique)
    floats = [l for l in unique if l.format == "float"]
    stored = sum(l.bytes for l in unique)
    weight_users = Counter(l.weight for l in layers)
    return {
        "layers": len(layers),
        "quantized": sum(l.format != "float" for l in layers),
        "float": sum(l.format == "float" for l in layers),
        "params": params,
        "float_params": sum(l.k * l.n for l in floats),
        "float_param_share": round(sum(l.k * l.n for l in floats) / params, 4) if params else 0.0,
        "float_byte_share": round(sum(l.bytes for l in floats) / stored, 4) if stored else 0.0,
        "float_by_role": dict(Counter(l.role for l in layers if l.format == "float")),
        "tied": sorted(l.name for l in layers if weight_users[l.weight] > 1),
    }


def _ratio(source: str, source_bytes: int, model_bytes: int) -> dict:
    return {"source": source, "source_bytes": source_bytes, "bytes": model_bytes,
            "ratio": round(source_bytes / model_bytes, 4) if model_bytes else None}


def _requirements(model: onnx.ModelProto) -> list[str]:
    """What the model needs but does not declare (opset, IR version, domain imports)."""
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx", 0)
    types = {t.data_type for t in model.graph.initializer}
    problems = []
    min_ir = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if model.ir_version < min_ir:
        problems.append(f"IR version {model.ir_version} is below {min_ir}, the minimum for its opset imports")
    if types & {TensorProto.INT4, TensorProto.UINT4} and model.ir_version < 10:
        problems.append(f"int4/uint4 tensors need IR version >= 10 (model has {model.ir_version})")
    if types & {TensorProto.INT2, TensorProto.UINT2} and opset < 25:
        problems.append(f"int2/uint2 DequantizeLinear needs opset >= 25 (model has {opset})")
    if opset < 21 and any(n.op_type == "DequantizeLinear" and "block_size" in _attrs(n) for n in model.graph.node):
        problems.append(f"blocked DequantizeLinear needs opset >= 21 (model has {opset})")
    missing = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx") and n.domain not in opsets})
    problems += [f"nodes of domain {d!r} but no opset import for it" for d in missing]
    return problems


# ---- target lint and diff -----------------------------------------------------------------------------------------


def _lint(layers: list[Layer], target: str) -> dict:
    """Errors and warnings of `onnxq.formats.targets` for every layer, grouped by message."""
    t = targets.support(target)
    found: dict[tuple[str, str], list[str]] = {}
    for l in layers:
        fmt = _TARGET_FORMAT.get(l.format)
        if fmt is None:
            continue
        kw = dict(k=l.k, act_dtype=l.scale_dtype or l.dtype, accuracy_level=l.accuracy_level, bias=l.bias)
        block = l.block_size if l.block_size is not None else -1
        for severity, messages in (("error", targets.check), ("warning", targets.advise)):
            for message in messages(t.name, l.bits, fmt, block, **kw):
                found.setdefault((severity, message), []).append(l.name)
    findings = [
        {"severity": s, "message": m, "layers": len(names), "examples": names[:3]}
        for (s, m), names in sorted(found.items(), key=lambda kv: (kv[0][0] != "error", kv[0][1]))
    ]
    return {"name": t.name, "provider": t.provider, "errors": sum(f["severity"] == "error" for f in findings),
            "warnings": sum(f["severity"] == "warning" for f in findings), "findings": findings}


def _diff(a: dict, b: dict) -> dict:
    """Side by side: sizes, op counts and each layer's storage in MODEL (a) and OTHER (b), matched by node name."""
    ops_a, ops_b = _flat_ops(a), _flat_ops(b)
    la, lb = {l["name"]: l for l in a["layers"]}, {l["name"]: l for l in b["layers"]}
    pick = lambda l: {k: l[k] for k in _DIFF_KEYS} if l else None  # noqa: E731
    layers = [
        {"name": n, "role": (la.get(n) or lb[n])["role"], "model": pick(la.get(n)), "other": pick(lb.get(n))}
        for n in [*la, *(n for n in lb if n not in la)]
    ]
    return {
        "other": b["path"],
        "bytes": {"model": a["parameters"]["bytes"], "other": b["parameters"]["bytes"]},
        "params": {"model": a["parameters"]["total"], "other": b["parameters"]["total"]},
        "ops": [{"op": op, "model": ops_a.get(op, 0), "other": ops_b.get(op, 0)} for op in sorted({*ops_a, *ops_b})],
        "layers": layers,
        "changed_layers": sum(x["model"] != x["other"] for x in layers),
    }


def _flat_ops(info: dict) -> dict[str, int]:
    return {f"{d}::{op}": c for d, ops in info["ops"].items() for op, c in ops.items()}


# ---- rendering ----------------------------------------------------------------------------------------------------


def render(info: dict, console: Console, *, layers: bool = False) -> None:
    """Print `inspect_model`'s result as rich tables (`layers`: one row per weight instead of a format summary)."""
    console.print(_overview(info))
    io = Table("", "name", "dtype", "shape", title="inputs / outputs")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            io.add_row(kind[:-1], v["name"], v["dtype"], str(v["shape"]))
    console.print(io)
    ops = Table("domain", "op", "count", title=f"ops ({info['nodes']} nodes)")
    for domain, counts in info["ops"].items():
        for op, c in counts.items():
            ops.add_row(domain, op, str(c))
    console.print(ops)
    params = Table("precision", "tensors", "params", "bytes", title="parameters by precision")
    for r in info["parameters"]["by_precision"]:
        params.add_row(r["precision"], str(r["tensors"]), f"{r['params']:,}", _size(r["bytes"]))
    console.print(params)
    if info["external_data"]:
        ext = Table("file", "tensors", "bytes", "on disk", title="external data")
        for f in info["external_data"]:
            ext.add_row(f["file"], str(f["tensors"]), _size(f["bytes"]), _size(f["file_bytes"]) if f["present"] else "[red]missing[/red]")
        console.print(ext)
    if info["blocks"]["attention"]:
        console.print(_attention_table(info))
    console.print(_layers_table(info["layers"]) if layers else _formats_table(info["layers"]))
    if info["provenance"]:
        prov = Table("key", "value", title="provenance")
        for k, v in info["provenance"].items():
            prov.add_row(k, str(v))
        console.print(prov)
    for p in info["problems"]:
        console.print(f"[red]problem:[/red] {p}", highlight=False)
    if info["target"] and info["target"]["findings"]:
        console.print(_target_table(info["target"]))
    elif info["target"]:
        console.print(f"target {info['target']['name']} ({info['target']['provider']}): no problems found", highlight=False)
    if info["diff"]:
        _render_diff(info, console)


def _overview(info: dict) -> Table:
    w, c = info["weights"], info["compression"]
    t = Table(show_header=False, title=Path(info["path"]).name)
    rows = [
        ("path", info["path"]),
        ("file size", _size(info["file_bytes"])),
        ("IR / opsets", f"{info['ir_version']} / " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items())),
        ("producer", info["producer"] or "-"),
        ("parameters", f"{info['parameters']['total']:,} ({_size(info['parameters']['bytes'])})"),
        ("weight layers", f"{w['layers']}: {w['quantized']} quantized, {w['float']} float"
                          + (f" ({', '.join(f'{k} {v}' for k, v in w['float_by_role'].items())})" if w["float"] else "")),
        ("still float", f"{w['float_param_share']:.1%} of weight params, {w['float_byte_share']:.1%} of weight bytes"),
        ("compression", f"{c['ratio']:.2f}x vs {c['source']} ({_size(c['source_bytes'])})" if c["ratio"] else "-"),
        ("decoder blocks", f"{info['blocks']['count']} ({info['blocks']['layers_per_block']} weight layers each)"),
    ]
    if w["tied"]:
        rows.append(("tied weights", ", ".join(_short(n) for n in w["tied"])))
    for k, v in rows:
        t.add_row(k, v)
    return t


def _attention_table(info: dict) -> Table:
    t = Table("block", "kind", "Q K V O", "heads / kv", "head dim", "RoPE", "causal", title="attention")
    for a in info["blocks"]["attention"]:
        qkv = f"{_leaf(a['fused_qkv'])} (fused)" if a["fused_qkv"] else " ".join(_leaf(a[r]) for r in "qkv")
        t.add_row(*map(str, (a["block"], a["kind"], f"{qkv} {_leaf(a['o'])}", f"{a['n_heads']} / {a['n_kv_heads']}",
                             a["head_dim"], a["rope"] or "-", a["causal"])))
    return t


def _formats_table(layers: list[dict]) -> Table:
    groups: dict[tuple, list[dict]] = {}
    for l in layers:
        key = (l["format"], l["dtype"] if l["format"] == "float" else l["bits"], l["block_size"], _zp(l),
               l["scale_dtype"], l["accuracy_level"])
        groups.setdefault(key, []).append(l)
    t = Table("format", "bits", "block", "zero point", "scales", "acc", "layers", "params", "bytes", "bpw",
              title="weight layers by format (--layers: one row each)")
    for key, ls in groups.items():
        unique = {l["weight"]: l for l in ls}.values()  # a tied weight counts once
        params, size = sum(l["k"] * l["n"] for l in unique), sum(l["bytes"] for l in unique)
        t.add_row(*(_cell(x) for x in key), str(len(ls)), f"{params:,}", _size(size), f"{size * 8 / params:.3f}")
    return t


def _layers_table(layers: list[dict]) -> Table:
    t = Table("layer", "role", "format", "bits", "block", "zero point", "acc", "K×N", "bpw", "fp32", "stored",
              title="weight layers")
    for l in layers:
        role = l["role"] + (f" ({l['attention']})" if l["attention"] else "")
        t.add_row(_short(l["name"]), role, l["format"], str(l["bits"]), _cell(l["block_size"]), _zp(l),
                  _cell(l["accuracy_level"]), f"{l['k']}×{l['n']}", f"{l['bpw']:.3f}", _size(l["bytes_fp32"]),
                  _size(l["bytes"]))
    return t


def _zp(layer: dict) -> str:
    """Zero-point column: its storage, "sym" when none is stored, "-" for float."""
    return "-" if layer["sym"] is None else "sym" if layer["sym"] else layer["zero_point"]


def _target_table(target: dict) -> Table:
    title = f"target {target['name']} ({target['provider']}): {target['errors']} errors, {target['warnings']} warnings"
    t = Table("severity", "message", "layers", "e.g.", title=title)
    for f in target["findings"]:
        color = "red" if f["severity"] == "error" else "yellow"
        t.add_row(f"[{color}]{f['severity']}[/{color}]", f["message"], str(f["layers"]), ", ".join(_short(n) for n in f["examples"]))
    return t


def _render_diff(info: dict, console: Console) -> None:
    d = info["diff"]
    a, b = Path(info["path"]).name, Path(d["other"]).name
    if a == b:
        a, b = (str(Path(*Path(p).parts[-2:])) for p in (info["path"], d["other"]))
    size = Table("", a, b, title=f"diff: {a} vs {b}")
    size.add_row("parameters", f"{d['params']['model']:,}", f"{d['params']['other']:,}")
    size.add_row("weight bytes", _size(d["bytes"]["model"]), _size(d["bytes"]["other"]))
    console.print(size)
    ops = Table("op", a, b, title="op counts that differ")
    for o in d["ops"]:
        if o["model"] != o["other"]:
            ops.add_row(o["op"], str(o["model"]), str(o["other"]))
    console.print(ops)
    layers = Table("layer", "role", a, b, title=f"layers ({d['changed_layers']} differ)")
    for l in d["layers"]:
        layers.add_row(_short(l["name"]), l["role"], _storage(l["model"]), _storage(l["other"]))
    console.print(layers)


def _storage(l: dict | None) -> str:
    if l is None:
        return "-"
    if l["format"] == "float":
        return f"float {l['bits']} bit, {_size(l['bytes'])}"
    return f"{l['format']} {l['bits']} bit b{l['block_size']}, {l['bpw']:.3f} bpw, {_size(l['bytes'])}"


def _short(name: str) -> str:
    """A node name without the exporter's "/model/" prefix and the op suffix ("layers.0/self_attn/q_proj")."""
    return re.sub(r"/(MatMul|Gemm|Gather|MatMulNBits|GatherBlockQuantized)(_\d+)?$", "", re.sub(r"^/(model/)?", "", name)) or name


def _leaf(name: str | None) -> str:
    """The last part of a short node name ("q_proj"), or "-"."""
    return _short(name).rsplit("/", 1)[-1] if name else "-"


def _cell(x) -> str:
    return "-" if x is None else str(x)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
