"""Normalize linear layers: each becomes MatMul(X, W[K, N]) with W a constant initializer."""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from onnxq.errors import OnnxqError
from onnxq.graph.io import Weights, restore_weights, strip_weights

LINEAR_OPS = ("MatMul", "Gemm")
_DEDUP_MIN_BYTES = 1024  # smaller 2-D constants are not worth comparing
_PROBES = 64  # elements compared before two candidate copies are read in full


def normalize(model: onnx.ModelProto, *, keep_tied: bool = False) -> onnx.ModelProto:
    """Make every linear layer MatMul(X, initializer W[K, N]), in place (weights must be loaded); returns `model`.

    Constant/Transpose-fed weights become initializers under the name of the tensor they replace. Gemm (transA=0)
    becomes MatMul (+ Add for C), transB/alpha folded into W and beta into a constant C, named "…/Gemm" -> "…/MatMul".
    Other Gemms (transA=1, non-constant B, non-constant C with beta != 1) stay. Node names are kept (unnamed linear
    nodes get one); unused initializers are dropped; shape inference runs once. Copies of one weight are made one
    first (`dedupe_weights`). With `keep_tied`, a weight that is a Transpose of an initializer other nodes also read
    (a tied LM head) stays shared instead of being copied.
    """
    graph = model.graph
    names = Names(graph)
    dedupe_weights(graph, names)
    inits = {t.name: t for t in graph.initializer}
    _materialize_weights(graph, inits, keep_tied)
    nodes = []
    for node in graph.node:
        if node.op_type in LINEAR_OPS and not node.name:
            node.name = names.unique(f"/{node.op_type}")
        nodes.extend(_gemm_to_matmul(graph, node, inits, names) if node.op_type == "Gemm" else [node])
    del graph.node[:]
    graph.node.extend(nodes)
    remove_unused(graph)
    return infer_shapes(model)


def dedupe_weights(graph: onnx.GraphProto, names: Names | None = None) -> list[tuple[str, str, bool]]:
    """Make loaded copies of one 2-D weight one tensor, in place; returns (copy, kept, transposed) per copy removed.

    A byte-identical copy's readers read the kept tensor; an exact transpose becomes `Transpose(kept)` under its own
    name, as a tied LM head next to its embedding (optimum's form). At most one tensor of a group is a MatMul/Gemm
    weight, so no two layers share one. Tensors whose data is not loaded are left alone."""
    names = names or Names(graph)
    done = _copies(graph, _loaded_probe, _same)
    inits = {t.name: t for t in graph.initializer}
    for copy, kept, transposed in done:
        if transposed:
            _insert_before_readers(graph, helper.make_node(
                "Transpose", [kept], [copy], name=names.unique(_transpose_name(graph, copy)), perm=[1, 0]))
        else:
            for node in all_nodes(graph):
                node.input[:] = [kept if t == copy else t for t in node.input]
        graph.initializer.remove(inits.pop(copy))
    return done


def duplicate_candidates(model: onnx.ModelProto, folder: str | os.PathLike | Weights) -> set[str]:
    """Initializers `dedupe_weights` would compare in full, found from a few elements each (inline data, external
    files under `folder`, the model's folder, or `Weights`), so a caller can load just those before `normalize`."""
    store = folder if isinstance(folder, Weights) else Weights(folder)
    probe = lambda t, flat: _file_probe(t, flat, store)  # noqa: E731
    return {name for copy, kept, _ in _copies(model.graph, probe, lambda *_: True) for name in (copy, kept)}


def _copies(graph: onnx.GraphProto, probe: Callable, same: Callable) -> list[tuple[str, str, bool]]:
    """(copy, kept, transposed) for 2-D initializers equal to an earlier kept one or to its transpose: candidates
    match on dtype, dims and `_PROBES` elements read by `probe`, then `same(copy, kept, transposed)` decides."""
    linear = {n.input[1] for n in all_nodes(graph) if n.op_type in LINEAR_OPS and len(n.input) > 1}
    fixed = {v.name for v in graph.input} | {v.name for v in graph.output}
    tensors = [t for t in graph.initializer if len(t.dims) == 2 and t.name not in fixed and _dedup_size(t)]
    tensors = _shape_partnered(tensors, linear)
    kept: dict[tuple, list[onnx.TensorProto]] = {}
    weight_taken: set[str] = set()  # kept tensors whose group already holds a linear layer's weight
    found = []
    for t in sorted(tensors, key=lambda t: t.name in linear):  # a Gather table is kept before a layer's weight
        direct = _probe_key(t, probe, False)
        if direct is None:
            continue
        matches = [(k, False) for k in kept.get(direct, [])]
        matches += [(k, True) for k in kept.get(_probe_key(t, probe, True), [])]
        hit = next((m for m in matches if not (t.name in linear and m[0].name in weight_taken) and same(t, *m)), None)
        if hit is None:
            kept.setdefault(direct, []).append(t)
            hit = (t, False)
        else:
            found.append((t.name, hit[0].name, hit[1]))
        if t.name in linear:
            weight_taken.add(hit[0].name)
    return found


def _shape_partnered(tensors: list[onnx.TensorProto], linear: set[str]) -> list[onnx.TensorProto]:
    """The tensors that could be a copy of another by dtype and dims (same or transposed), in a pair where at least
    one is not a layer weight: only these are probed."""
    shape = lambda t, flip=False: (t.data_type, tuple(t.dims)[::-1] if flip else tuple(t.dims))  # noqa: E731
    count = Counter(shape(t) for t in tensors)
    free = {shape(t) for t in tensors if t.name not in linear}

    def partnered(t: onnx.TensorProto) -> bool:
        if t.name in linear:
            return shape(t) in free or shape(t, True) in free
        return count[shape(t)] > 1 or (shape(t, True) != shape(t) and count[shape(t, True)] > 0)

    return [t for t in tensors if partnered(t)]


def _dedup_size(t: onnx.TensorProto) -> bool:
    """Whether `t` is large enough to compare and of a type with whole-byte elements."""
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return dtype.kind in "biuf" and int(np.prod(t.dims)) * dtype.itemsize >= _DEDUP_MIN_BYTES


def _probe_key(t: onnx.TensorProto, probe: Callable, transposed: bool) -> tuple | None:
    """(dtype, dims, bytes of `_PROBES` spread elements) of `t`, or of `t.T`; None when `t`'s data is not at hand."""
    rows, cols = t.dims
    flat = np.unique(np.linspace(0, rows * cols - 1, _PROBES).astype(np.int64))
    dims = (rows, cols)
    if transposed:  # element f of t.T ([cols, rows]) is t[f % rows, f // rows]
        flat, dims = (flat % rows) * cols + flat // rows, (cols, rows)
    data = probe(t, flat)
    return None if data is None else (t.data_type, dims, data)


def _loaded_probe(t: onnx.TensorProto, flat: np.ndarray) -> bytes | None:
    """Elements `flat` of a tensor whose data is in the proto; None if it is not (external or detached)."""
    return None if not _loaded(t) else _bits(t).reshape(-1)[flat].tobytes()


def _file_probe(t: onnx.TensorProto, flat: np.ndarray, store: Weights) -> bytes | None:
    """Elements `flat` of a tensor, from the proto, from `store` (detached) or from its external data file."""
    size = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    if store.detached(t):
        return b"".join(store.read(t.name, int(i) * size, size) for i in flat)
    if not uses_external_data(t):
        return _loaded_probe(t, flat)
    info = ExternalDataInfo(t)
    out = bytearray()
    with open(store.folder / info.location, "rb") as f:
        for i in flat:
            f.seek((info.offset or 0) + int(i) * size)
            out += f.read(size)
    return bytes(out)


def _loaded(t: onnx.TensorProto) -> bool:
    """Whether the data of initializer `t` (non-empty) is in the proto."""
    if uses_external_data(t):
        return False
    return t.HasField("raw_data") or any(len(getattr(t, f)) for f in (
        "float_data", "int32_data", "int64_data", "double_data", "uint64_data"))


def _bits(t: onnx.TensorProto) -> np.ndarray:
    """The data of loaded `t` as unsigned integers of its element width (bit-exact compares), a view where possible."""
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    data = np.frombuffer(t.raw_data, dtype) if t.HasField("raw_data") else numpy_helper.to_array(t).reshape(-1)
    return data.view(f"u{dtype.itemsize}").reshape(tuple(t.dims))


def _same(t: onnx.TensorProto, kept: onnx.TensorProto, transposed: bool) -> bool:
    """Whether `t` holds the same bytes as `kept` (or as `kept.T`), compared a slab of rows at a time."""
    a, b = _bits(kept), _bits(t)
    step = max(1, (64 << 20) // max(1, b.shape[1] * b.itemsize))
    for i in range(0, b.shape[0], step):
        ref = a[:, i:i + step].T if transposed else a[i:i + step]
        if not np.array_equal(ref, b[i:i + step]):
            return False
    return True


def _transpose_name(graph: onnx.GraphProto, tensor: str) -> str:
    """A node name for Transpose -> `tensor` after its first reader's: "/lm_head/MatMul" -> "/lm_head/Transpose"."""
    reader = next((n for n in graph.node if tensor in n.input and n.name), None)
    return "/Transpose" if reader is None else renamed(reader.name, "Transpose", reader.op_type)


def _insert_before_readers(graph: onnx.GraphProto, node: onnx.NodeProto) -> None:
    """Put `node` just before the first main-graph node reading its output (first of all if none does)."""
    at = next((i for i, n in enumerate(graph.node) if node.output[0] in n.input), 0)
    graph.node.insert(at, node)


def remove_unused(graph: onnx.GraphProto) -> None:
    """Drop initializers and Constant nodes nobody reads, with their graph-input and value_info entries."""
    used = set(_used_names(graph))
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    gone = {t.name for t in graph.initializer if t.name not in used}
    for field in (graph.initializer, graph.input, graph.value_info):
        for item in [x for x in field if x.name in gone]:
            field.remove(item)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run ONNX shape inference and store its value_info in `model` (weights detached, so any size works)."""
    payloads = strip_weights(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        restore_weights(model, payloads)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _materialize_weights(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], keep_tied: bool) -> None:
    """Turn constant MatMul/Gemm inputs B and C that a Constant or Transpose node produces into initializers."""
    producers = {out: n for n in graph.node for out in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    for node in list(graph.node):
        if node.op_type not in LINEAR_OPS:
            continue
        for name in node.input[1:3]:
            src = producers.get(name)
            if keep_tied and src is not None and src.op_type == "Transpose" and readers.get(src.input[0], 0) > 1:
                continue
            value = None if not name or name in inits else _constant(name, inits, producers)
            if value is not None:
                graph.node.remove(producers.pop(name))
                _add_initializer(graph, inits, name, value)


def _constant(
    name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
) -> np.ndarray | None:
    """The value of tensor `name` if it is an initializer, a Constant, or a Transpose of one; else None."""
    if name in inits:
        return _array(inits[name])
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Constant" and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    if node.op_type == "Transpose":
        value = _constant(node.input[0], inits, producers)
        perm = _attrs(node).get("perm")
        return None if value is None else np.ascontiguousarray(np.transpose(value, perm))
    return None


def _gemm_to_matmul(
    graph: onnx.GraphProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], names: Names
) -> list[onnx.NodeProto]:
    """[MatMul] or [MatMul, Add] equal to Gemm `node`; [node] when it is not a linear layer we can rewrite."""
    a = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0} | _attrs(node)
    b_name, c_name = node.input[1], node.input[2] if len(node.input) > 2 else ""
    dynamic_scaled_c = c_name and a["beta"] != 1 and c_name not in inits
    if a["transA"] or b_name not in inits or len(inits[b_name].dims) != 2 or dynamic_scaled_c:
        return [node]
    mm_name = names.unique(renamed(node.name, "MatMul"))
    weight = b_name
    if a["transB"] or a["alpha"] != 1:
        w = _array(inits[b_name])
        w = np.ascontiguousarray(w.T if a["transB"] else w) * np.asarray(a["alpha"], w.dtype)
        weight = _add_initializer(graph, inits, names.unique(f"{mm_name}.weight"), w)
    if not c_name:
        return [helper.make_node("MatMul", [node.input[0], weight], list(node.output), name=mm_name)]
    if a["beta"] != 1:
        c = _array(inits[c_name])
        c_name = _add_initializer(graph, inits, names.unique(f"{mm_name}.bias"), c * np.asarray(a["beta"], c.dtype))
    mm_out = names.unique(f"{mm_name}_output_0")
    return [
        helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=mm_name),
        helper.make_node("Add", [mm_out, c_name], list(node.output), name=names.unique(renamed(node.name, "Add"))),
    ]


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    if uses_external_data(tensor):
        raise OnnxqError(f"weight {tensor.name!r} is not loaded: load the model with load_weights=True to normalize it")
    return numpy_helper.to_array(tensor)


def _add_initializer(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> str:
    """`value` as initializer `name`; `inits` keeps the graph's copy (appending copies the tensor: holding the made one
    too would keep an untied LM head twice, 113 MiB more on SmolLM2)."""
    graph.initializer.append(numpy_helper.from_array(value, name))
    inits[name] = graph.initializer[-1]
    return name


def renamed(name: str, op: str, old: str = "Gemm") -> str:
    """A node name for `op` derived from node `name` of op `old`: "/x/Gemm_1" -> "/x/MatMul_1", "w" -> "w/MatMul"."""
    head, _, last = name.rpartition("/")
    return f"{head}/{op}{last[len(old):]}" if last.startswith(old) else f"{name}/{op}"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes and, recursively, those of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from all_nodes(sub)


def _used_names(graph: onnx.GraphProto) -> Iterator[str]:
    """Every tensor name read by a node (subgraphs included) or exposed as a graph output."""
    yield from (o.name for o in graph.output)
    for node in all_nodes(graph):
        yield from node.input


class Names:
    """Fresh node and tensor names that do not collide with the graph's."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken = {n.name for n in graph.node} | {t.name for t in graph.initializer}
        self.taken |= {x for n in graph.node for x in n.output} | {v.name for v in graph.input}

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name
