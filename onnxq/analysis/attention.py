"""Attention analysis: per decoder block, the Q/K/V/O projections, heads, RoPE, causal mask, or a fused op."""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .layers import LinearLayer, block_index, linear_layers

FUSED_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedMultiHeadAttention")
_DATA_ONLY = {"Reshape", "Expand", "Slice", "Unsqueeze", "Squeeze", "Tile", "Pad", "Gather", "Split"}
_CAUSAL_HINTS = {"Trilu", "Range", "LessOrEqual", "Less", "Greater", "GreaterOrEqual", "CumSum"}


@dataclass
class AttentionBlock:
    """One attention subgraph: which linear layers play Q/K/V/O and the tensors the solvers capture."""

    block: int | None
    kind: str  # "unfused" or the fused com.microsoft op type
    q: str | None
    k: str | None
    v: str | None
    o: str | None
    fused_qkv: str | None
    n_heads: int | None
    n_kv_heads: int | None
    head_dim: int | None
    causal: bool | None
    rope: str | None  # "rotate_half", "RotaryEmbedding", "fused" or None
    q_tensor: str | None = None  # query entering QKᵀ (post-RoPE), [B, H, T, d]
    k_tensor: str | None = None  # key entering QKᵀ (post-RoPE, transposed), [B, H, d, T]
    probs: str | None = None  # softmax output [B, H, T, T]
    v_input: str | None = None  # activation entering the V projection [B, T, d_model]
    cos: str | None = None
    sin: str | None = None
    qkv_rows: tuple[tuple[int, int], ...] | None = None  # packed QKV (fused_qkv): Q's, K's, V's rows [start, end)
    rope_interleaved: bool | None = None  # RoPE on (even, odd) pairs, not halves; None where unknown or no RoPE

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


class GraphIndex:
    """Producer/consumer lookups over one graph."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = [n for n in model.graph.node if n.output]  # a node without outputs computes nothing
        self.tensors = {t.name: t for t in model.graph.initializer}
        self.inits = set(self.tensors)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)

    def layer_outputs(self, layers: list[LinearLayer]) -> dict[str, LinearLayer]:
        """Output tensor -> linear layer, for the nodes that are `layers`."""
        by_node = {l.node: l for l in layers}
        return {n.output[0]: by_node[n.name or n.output[0]] for n in self.nodes if (n.name or n.output[0]) in by_node}

    def is_const(self, t: str) -> bool:
        p = self.producer.get(t)
        return t in self.inits or (p is not None and p.op_type == "Constant")

    def value(self, t: str) -> np.ndarray | None:
        """The value of a small constant (an initializer held inline or a Constant node's), else None."""
        p = self.producer.get(t)
        tensor = self.tensors.get(t) or (p.attribute[0].t if p is not None and p.op_type == "Constant"
                                          and p.attribute and p.attribute[0].name == "value" else None)
        if tensor is None or np.prod(tensor.dims) > 64 or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(tensor)

    def upstream(self, tensor: str, stop, limit: int = 60) -> list[onnx.NodeProto]:
        """Nearest nodes above `tensor` for which `stop(node)` holds (breadth-first, through non-constant inputs)."""
        found, seen, queue = [], set(), deque([tensor])
        while queue and len(seen) < limit * 8:
            t = queue.popleft()
            n = self.producer.get(t)
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if stop(n):
                found.append(n)
                continue
            if n.op_type == "Shape":
                continue  # shape arithmetic is not data flow
            ins = n.input[:1] if n.op_type in _DATA_ONLY else n.input
            queue.extend(i for i in ins if i and not self.is_const(i))
        return found

    def downstream(self, tensor: str, stop, limit: int = 60) -> list[onnx.NodeProto]:
        """Nearest nodes below `tensor` for which `stop(node)` holds."""
        found, seen, queue = [], set(), deque([tensor])
        while queue and len(seen) < limit:
            t = queue.popleft()
            for n in self.consumers.get(t, []):
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if stop(n):
                    found.append(n)
                    continue
                if n.op_type != "Shape":  # shape arithmetic is not data flow
                    queue.extend(o for o in n.output if o)
        return found

    def side_inputs(self, top: onnx.NodeProto, bottom: str) -> list[str]:
        """Inputs joining the data path from `top`'s output down to tensor `bottom` (e.g. the attention mask)."""
        path, t, side = {top.output[0]}, bottom, []
        chain = []
        while t not in path:
            n = self.producer.get(t)
            if n is None:
                return []
            chain.append(n)
            below = [i for i in n.input if i and self._reaches(top.output[0], i)]
            if not below:
                return []
            side += [i for i in n.input if i and i not in below and not self.is_const(i)]
            t = below[0]
        return side

    def _reaches(self, src: str, dst: str, limit: int = 12) -> bool:
        """Whether `dst` is at most `limit` data steps below `src`."""
        frontier = {src}
        for _ in range(limit):
            if dst in frontier:
                return True
            frontier = {o for t in frontier for n in self.consumers.get(t, []) if n.op_type != "Shape" for o in n.output}
        return dst in frontier

    def ancestors_ops(self, tensor: str, limit: int = 400) -> set[str]:
        """Op types among the ancestors of `tensor`."""
        ops, seen, queue = set(), set(), deque([tensor])
        while queue and len(seen) < limit:
            n = self.producer.get(queue.popleft())
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            ops.add(n.op_type)
            queue.extend(i for i in n.input if i)
        return ops


def attention_blocks(model: onnx.ModelProto) -> list[AttentionBlock]:
    """Every attention subgraph of the model, in graph order (unfused softmax attention and fused ops)."""
    g = GraphIndex(model)
    by_output = g.layer_outputs(linear_layers(model))
    is_linear = lambda n: n.output[0] in by_output  # noqa: E731
    head_dims = _static_last_dims(model)
    found = []
    for n in g.nodes:
        if not n.input or not n.output:
            continue  # malformed: an attention op without inputs or outputs cannot be mapped
        if n.op_type == "Softmax" and n.domain in ("", "ai.onnx"):
            blk = _unfused(g, n, by_output, is_linear, head_dims)
            if blk is not None:
                found.append(blk)
        elif n.domain == "com.microsoft" and n.op_type in FUSED_OPS:
            found.append(_fused(g, n, by_output, is_linear))
    return found


def _unfused(g: GraphIndex, softmax: onnx.NodeProto, by_output, is_linear, head_dims) -> AttentionBlock | None:
    qk = g.upstream(softmax.input[0], lambda n: n.op_type == "MatMul" and not any(g.is_const(i) for i in n.input))
    pv = g.downstream(softmax.output[0], lambda n: n.op_type == "MatMul")
    if len(qk) != 1 or len(pv) != 1 or len(qk[0].input) != 2 or len(pv[0].input) != 2:
        return None
    qk, pv = qk[0], pv[0]
    probs_in = 0 if g.upstream(pv.input[0], lambda n: n is softmax) or pv.input[0] == softmax.output[0] else 1
    v_side = pv.input[1 - probs_in]
    q_lin = [by_output[n.output[0]] for n in g.upstream(qk.input[0], is_linear)]
    k_lin = [by_output[n.output[0]] for n in g.upstream(qk.input[1], is_linear)]
    v_lin = [by_output[n.output[0]] for n in g.upstream(v_side, is_linear)]
    o_lin = [by_output[n.output[0]] for n in g.downstream(pv.output[0], is_linear)]
    if not (len(q_lin) == len(k_lin) == len(v_lin) == 1):
        return None
    q, k, v = q_lin[0], k_lin[0], v_lin[0]
    fused = q.node if q.node == k.node == v.node else None
    mask_ops = set().union(*(g.ancestors_ops(t) for t in g.side_inputs(qk, softmax.input[0])))
    causal = bool(mask_ops & _CAUSAL_HINTS)
    q_tensor = _strip_scale(g, qk.input[0])  # post-RoPE query, before the 1/sqrt(d) scaling
    rope, cos, sin = _rope(g, q_tensor)
    d = head_dims.get(qk.input[0]) or (head_dims.get(v_side) if fused else None)  # partial RoPE hides q's
    n_heads = n_kv = rows = None
    if d and not fused:
        n_heads, n_kv = q.n // d, k.n // d
    elif d and fused:
        rows = _packed_rows(g, (qk.input[0], qk.input[1], v_side), q)
        widths = [end - start for start, end in rows] if rows else [q.n // 3] * 3  # else MHA split in thirds
        n_heads, n_kv = widths[0] // d, widths[1] // d
    return AttentionBlock(
        block_index(softmax.name) if softmax.name else q.block, "unfused",
        None if fused else q.node, None if fused else k.node, None if fused else v.node,
        o_lin[0].node if len(o_lin) == 1 else None, fused, n_heads, n_kv, d, causal, rope,
        qk.input[0], qk.input[1], _probs_tensor(g, softmax, pv, probs_in), v.input, cos, sin, rows,
    )


def _strip_scale(g: GraphIndex, tensor: str) -> str:
    """The tensor before a constant Mul/Div (attention scaling), else itself."""
    p = g.producer.get(tensor)
    if p is not None and p.op_type in ("Mul", "Div") and any(g.is_const(i) for i in p.input):
        return next(i for i in p.input if not g.is_const(i))
    return tensor


def _packed_rows(g: GraphIndex, tensors, layer: LinearLayer) -> tuple[tuple[int, int], ...] | None:
    """Rows [start, end) of the packed projection `layer` that each of `tensors` (query, key, value) is cut from: the
    constant Slice or Split on its output's last axis above each; None unless all three are found."""
    source = next(n.output[0] for n in g.nodes if (n.name or n.output[0]) == layer.node)
    rows = tuple(_cut_rows(g, t, source, layer.n) for t in tensors)
    return rows if all(rows) else None


def _cut_rows(g: GraphIndex, tensor: str, source: str, width: int) -> tuple[int, int] | None:
    """Rows of `source` (last dim `width`) that `tensor` is computed from, found breadth-first above it."""
    seen, queue = set(), deque([tensor])
    while queue and len(seen) < 400:
        t = queue.popleft()
        n = g.producer.get(t)
        if n is None or t in seen or n.op_type == "Shape":
            continue
        seen.add(t)
        if n.op_type in ("Slice", "Split") and _reads(g, n.input[0], source):
            return _slice_rows(g, n, t, width)
        queue.extend(i for i in (n.input[:1] if n.op_type in _DATA_ONLY else n.input) if i and not g.is_const(i))
    return None


def _reads(g: GraphIndex, tensor: str, source: str) -> bool:
    """Whether `tensor` is `source`, or it through a bias Add, Reshape, Cast or Identity."""
    for _ in range(4):
        if tensor == source:
            return True
        n = g.producer.get(tensor)
        if n is None or n.op_type not in ("Add", "Reshape", "Cast", "Identity"):
            return False
        tensor = next((i for i in n.input if i and not g.is_const(i)), "")
    return tensor == source


def _slice_rows(g: GraphIndex, node: onnx.NodeProto, output: str, width: int) -> tuple[int, int] | None:
    """[start, end) of the last axis (of a [batch, seq, N] tensor) that Slice or Split `node` gives as `output`."""
    if node.op_type == "Slice":
        starts, ends, axes, steps = (g.value(i) if i else None for i in [*node.input[1:5], "", "", ""][:4])
        if starts is None or ends is None or starts.size != 1:
            return None
        if (axes is not None and int(axes[0]) not in (-1, 2)) or (steps is not None and int(steps[0]) != 1):
            return None
        start, end = (int(np.clip(v + width if v < 0 else v, 0, width)) for v in (int(starts[0]), int(ends[0])))
        return (start, end) if end > start else None
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    sizes = g.value(node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "split")
    sizes = [width // len(node.output)] * len(node.output) if sizes is None else [int(x) for x in sizes]
    if axis not in (-1, 2) or sum(sizes) != width:
        return None
    i = list(node.output).index(output)
    return sum(sizes[:i]), sum(sizes[:i + 1])


def _probs_tensor(g: GraphIndex, softmax, pv, probs_in: int) -> str:
    """The probabilities entering P·V (after any NaN guard), falling back to the softmax output."""
    return pv.input[probs_in] if g.producer.get(pv.input[probs_in]) is not None else softmax.output[0]


def _rope(g: GraphIndex, q_tensor: str) -> tuple[str | None, str | None, str | None]:
    """Detect rotate-half RoPE `x·cos + rotate_half(x)·sin` (or a RotaryEmbedding op) producing q_tensor."""
    p = g.producer.get(q_tensor)
    if p is None:
        return None, None, None
    if p.op_type == "RotaryEmbedding":  # com.microsoft: (x, position_ids, cos, sin); ONNX 23: (x, cos, sin, ...)
        c = 2 if p.domain == "com.microsoft" else 1
        return "RotaryEmbedding", p.input[c] if len(p.input) > c else None, p.input[c + 1] if len(p.input) > c + 1 else None
    if p.op_type != "Add":
        return None, None, None
    muls = [g.producer.get(i) for i in p.input]
    if len(muls) != 2 or any(m is None or m.op_type != "Mul" for m in muls):
        return None, None, None
    cos = sin = None
    for m in muls:
        srcs = [g.producer.get(i) for i in m.input]
        rotated = [i for i, s in zip(m.input, srcs) if s is not None and s.op_type == "Concat" and _has_neg(g, s)]
        other = [i for i in m.input if i not in rotated]
        if rotated and other:
            sin = other[0]
        elif len(other) == 2:
            cos = other[1] if _is_trig(g, other[1]) else other[0]
    if cos and sin:
        return "rotate_half", cos, sin
    return None, None, None


def _has_neg(g: GraphIndex, concat) -> bool:
    return any((p := g.producer.get(i)) is not None and p.op_type == "Neg" for i in concat.input)


def _is_trig(g: GraphIndex, t: str) -> bool:
    return bool({"Cos", "Sin"} & g.ancestors_ops(t, limit=40))


def _fused(g: GraphIndex, node: onnx.NodeProto, by_output, is_linear) -> AttentionBlock:
    """A com.microsoft fused attention op: roles from its inputs, heads from its attributes. GroupQueryAttention's
    packed input (no separate key) is one layer whose rows are Q's heads, then K's, then V's."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n_heads = attrs.get("num_heads")
    n_kv = attrs.get("kv_num_heads", n_heads)
    lin = lambda i: [by_output[n.output[0]] for n in g.upstream(node.input[i], is_linear)] if len(node.input) > i and node.input[i] else []  # noqa: E731
    o = [by_output[n.output[0]] for n in g.downstream(node.output[0], is_linear)]
    q = k = v = fused = rows = d = None
    if node.op_type == "Attention":  # QKV weights are an input of the op itself
        fused = node.name
        v_input = node.input[0]
    else:
        ql, kl, vl = lin(0), lin(1), lin(2)
        q, k, v = (x[0].node if len(x) == 1 else None for x in (ql, kl, vl))
        v_input = (vl or ql)[0].input if (vl or ql) else None
        if q and node.op_type == "GroupQueryAttention" and not kl and n_heads and n_kv:
            d = ql[0].n // (n_heads + 2 * n_kv)
            rows = ((0, n_heads * d), (n_heads * d, (n_heads + n_kv) * d), ((n_heads + n_kv) * d, ql[0].n))
            fused, q = q, None
        elif q and q == k == v:  # one packed projection cut into separate inputs (the builder's QK-norm form)
            rows = _packed_rows(g, node.input[:3], ql[0])
            d = (rows[1][1] - rows[1][0]) // n_kv if rows and n_kv else None
            fused, q, k, v = q, None, None, None
        elif ql and n_heads:
            d = ql[0].n // n_heads
    causal = node.op_type == "GroupQueryAttention" or bool(attrs.get("unidirectional", 0))
    if attrs.get("do_rotary", 0):
        rope, cos, sin = "fused", node.input[7] or None, node.input[8] or None
        interleaved = bool(attrs.get("rotary_interleaved", 0))
    else:
        rope, cos, sin = _rope(g, node.input[0])
        rotary = g.producer.get(node.input[0])
        interleaved = bool(_attr(rotary, "interleaved")) if rope == "RotaryEmbedding" else None
    return AttentionBlock(
        block_index(node.name), node.op_type, q, k, v, o[0].node if len(o) == 1 else None, fused,
        n_heads, n_kv, d, causal, rope, node.input[0], node.input[1] if len(node.input) > 1 and node.input[1] else None,
        None, v_input, cos, sin, rows, interleaved,
    )


def _attr(node: onnx.NodeProto, name: str):
    """The value of attribute `name` of `node`, or None."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def cache_head_dims(model: onnx.ModelProto) -> dict[str, int]:
    """Past key/value graph input -> head dimension, for the caches GroupQueryAttention ops read (onnxruntime-genai's
    builder leaves that dimension symbolic; an empty cache must still have it). The packed QKV width comes from the
    projection feeding the op: a float MatMul's weight or a MatMulNBits' N, through an optional bias Add; a separate
    key's from the Split that cuts it from such a projection or the Reshape after its QK-norm."""
    g = GraphIndex(model)
    dims_of = {t.name: list(t.dims) for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}

    def width(tensor: str) -> int | None:
        node = g.producer.get(tensor)
        if node is not None and node.op_type == "Reshape":  # back to [batch, seq, heads * d] after the QK-norm
            shape = g.value(node.input[1])
            return int(shape[-1]) if shape is not None and shape.size and shape[-1] > 0 else None
        if node is not None and node.op_type == "Split":  # one of Q, K, V cut from a packed projection
            rows = _slice_rows(g, node, tensor, width(node.input[0]) or 0)
            return rows[1] - rows[0] if rows else None
        if node is not None and node.op_type == "Add":
            node = next((g.producer[t] for t in node.input if t in g.producer), None)
        if node is None:
            return None
        if node.op_type == "MatMulNBits":
            return _attr(node, "N")
        weight = dims_of.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        return weight[-1] if weight else None

    dims = {}
    for n in g.nodes:
        if n.domain == "com.microsoft" and n.op_type == "GroupQueryAttention" and n.input:
            heads, kv = _attr(n, "num_heads"), _attr(n, "kv_num_heads")
            separate = len(n.input) > 1 and n.input[1]  # a key input of its own, else Q, K and V packed in input 0
            w = width(n.input[1] if separate else n.input[0])
            if heads and kv and w:
                dims.update({t: w // (kv if separate else heads + 2 * kv) for t in n.input[3:5] if t in inputs})
    return dims


def _static_last_dims(model: onnx.ModelProto) -> dict[str, int]:
    """Statically known last dimension of every value (shape inference with data propagation, no weights)."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.graph.initializer[:]
    for t in model.graph.initializer:
        stripped.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(stripped, data_prop=True)
    except Exception:  # shape inference is best effort: heads then come from captured shapes
        return {}
    out = {}
    for v in inferred.graph.value_info:
        dims = v.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            out[v.name] = dims[-1].dim_value
    return out


def layers_by_role(model: onnx.ModelProto) -> dict[str, str]:
    """Linear layer node name -> attention role ('q', 'k', 'v', 'o', 'qkv') from the attention analysis."""
    roles = {}
    for a in attention_blocks(model):
        for role in ("q", "k", "v", "o"):
            if getattr(a, role):
                roles[getattr(a, role)] = role
        if a.fused_qkv:
            roles[a.fused_qkv] = "qkv"
    return roles


__all__ = ["AttentionBlock", "attention_blocks", "layers_by_role", "LinearLayer"]
