"""Rotate the residual stream of a pre-RMSNorm decoder (QuaRot-style R1, R2 per attention head, R4 online).

The function computed by the graph does not change: each RMSNorm's scale is folded into the linear layers that read
it, those layers get `W <- Rᵀ diag(g) W`, the layers that write into the stream get `W <- W R`, and the stream is
rotated once after the embedding and back once before the final norm (two small float MatMuls), so the embedding and a
tied LM head stay untouched. R4 rotates the input of each MLP down projection online (`online_hadamard`). Rotated
weights have fewer outliers, which is what low-bit grids need (spec §8).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.analysis.layers import ROTATION_TAG
from onnxq.analysis.attention import GraphIndex
from onnxq.errors import OnnxqError

_NORM_OPS = {"Cast", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Reciprocal", "Mul"}
_SHAPE_ONLY = {"Shape", "Size"}


def hadamard(n: int) -> np.ndarray | None:
    """Orthonormal Hadamard matrix of order n = 2^a · 12^b (Sylvester and Paley), or None for other orders."""
    h = np.ones((1, 1))
    m = n
    while m % 12 == 0:
        h, m = np.kron(h, _paley12()), m // 12
    while m % 2 == 0:
        h, m = np.kron(h, np.array([[1.0, 1.0], [1.0, -1.0]])), m // 2
    return h / np.sqrt(n) if m == 1 else None


def _paley12() -> np.ndarray:
    """The order-12 Hadamard matrix from the quadratic residues mod 11 (Paley's first construction)."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = lambda x: 0 if x % q == 0 else (1 if x % q in residues else -1)  # noqa: E731
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0] = 1, -1
    s[1:, 1:] = [[chi(j - i) for j in range(q)] for i in range(q)]
    return s + np.eye(q + 1)


def is_hadamard_order(n: int) -> bool:
    """Whether `hadamard(n)` has a matrix (n = 2^a · 12^b), without building it."""
    while n % 12 == 0:
        n //= 12
    return n > 0 and n & (n - 1) == 0


def hadamard_factors(n: int, rng: np.random.Generator, inner: int = 128) -> tuple[np.ndarray, np.ndarray] | None:
    """(A, B), orthonormal Hadamard matrices with random column signs and B of order min(2^a, inner), so that
    A ⊗ B is one of order n; None where n is not 2^a · 12^b. x (A ⊗ B) = Aᵀ X B for X = x as [order A, order B]."""
    if not is_hadamard_order(n):
        return None
    twos = n
    while twos % 12 == 0:
        twos //= 12
    nb = min(twos, inner)  # the Sylvester part, a power of two: inner is one too
    return random_rotation(n // nb, rng), random_rotation(nb, rng)


def random_rotation(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal n×n matrix: a Hadamard matrix with random column signs where one exists, else Haar (QR)."""
    h = hadamard(n)
    if h is not None:
        return h * rng.choice([-1.0, 1.0], size=n)[None, :]
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


@dataclass
class Norm:
    """One RMSNorm on the stream: its scale initializer, the input of `node` that carries it, and the weights of the
    linear layers that read the norm's output."""

    scale: str
    node: str  # first output of the node that multiplies by the scale
    scale_input: str
    readers: list[str]


@dataclass
class ResidualPlan:
    """Where the residual stream of a decoder is read and written: what `rotate_residual` changes."""

    hidden: int
    entry: str  # stream tensor produced by the embedding
    exit: str  # stream tensor entering the final norm
    norms: list[Norm] = field(default_factory=list)
    writers: list[tuple[str, str | None]] = field(default_factory=list)  # (weight, bias) of layers adding into it

    def tensors(self) -> list[str]:
        """Initializers the rotation reads and rewrites (load their data before `rotate_residual`)."""
        names = [n.scale for n in self.norms] + [w for n in self.norms for w in n.readers]
        return names + [w for w, _ in self.writers] + [b for _, b in self.writers if b]


def residual_plan(model: onnx.ModelProto) -> ResidualPlan:
    """Trace the residual stream from the embedding to the final norm; OnnxqError when the graph is not a pre-RMSNorm
    decoder in a form this pass knows (every stream reader must be a norm, a residual Add or a shape op)."""
    g = _Lookup(model)
    entry = _embedding_output(g)
    hidden = g.dims[g.producer[entry].input[0]][1]
    plan = ResidualPlan(hidden=hidden, entry=entry, exit=entry)
    current = entry
    while True:
        stream = g.transparent(current)  # the stream tensor, its no-op Casts and constant scalings
        readers = [n for t in stream for n in g.consumers.get(t, []) if n.op_type not in _SHAPE_ONLY
                   and n.output[0] not in stream]
        adds = [n for n in readers if n.op_type == "Add" and not any(g.is_const(i) for i in n.input)
                and any(i in stream for i in n.input)]
        norm_nodes, scale, node = _rms_norm(g, stream, hidden)
        out = node.output[0] if node is not None else None
        other = [n for n in readers if n not in adds and n.output[0] not in norm_nodes]
        if scale is None or other or len(adds) > 1:
            what = other[0].op_type if other else g.reader_past_adds(stream)
            raise OnnxqError(f"--rotate: the residual stream at {current!r} feeds {what}: only pre-RMSNorm decoders "
                             "(Llama, Mistral, Qwen, SmolLM ...) can be rotated; drop --rotate")
        if not adds and not plan.norms:
            raise OnnxqError(f"--rotate: the residual stream at {current!r} reaches a norm but no decoder block: "
                             "only pre-RMSNorm decoders can be rotated; drop --rotate")
        if not adds:  # the final norm: rotated back before it, so the (possibly tied) LM head stays as it is
            plan.exit = current
            return plan
        readers_w = []
        for n in g.consumers.get(out, []):
            if n.op_type in _SHAPE_ONLY:
                continue
            w = g.weight_of(n, k=hidden)
            if w is None:
                raise OnnxqError(f"--rotate: the norm output {out!r} feeds {n.op_type} {n.name!r}, not a linear layer "
                                 "with a constant weight: drop --rotate")
            readers_w.append(w)
        scale_input = next(i for i in node.input if g.source(i) == scale)
        plan.norms.append(Norm(scale, out, scale_input, readers_w))
        (add,) = adds
        branch = next(i for i in add.input if i not in stream)
        plan.writers.append(g.writer(branch, hidden))
        current = add.output[0]


def rotate_residual(model: onnx.ModelProto, plan: ResidualPlan, *, seed: int = 0,
                    heads: Sequence[tuple[str, str, int]] = (), online: Sequence[str] = ()) -> onnx.ModelProto:
    """Rotate `model` in place by a random orthogonal R (hidden×hidden) along `plan`; returns `model`.

    The weights `plan.tensors()` and `head_tensors(model, heads)` must be loaded. `heads` lists (v weight, o weight,
    head dim) per attention block for R2: each head's values (with V's bias) are rotated by one Hadamard-type matrix
    and o_proj's rows by its transpose. `online` names loaded weights (the MLP down projections: QuaRot's R4) whose
    inputs get an online Hadamard transform where their width is 2^a · 12^b (`online_hadamard`); the others stay as
    they are.
    """
    rng = np.random.default_rng(seed)
    r = random_rotation(plan.hidden, rng)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    get = lambda name: numpy_helper.to_array(inits[name]).astype(np.float64)  # noqa: E731
    dtype_of = lambda name: helper.tensor_dtype_to_np_dtype(inits[name].data_type)  # noqa: E731

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(dtype_of(name)), name))

    for norm in plan.norms:
        g = get(norm.scale)
        for w in norm.readers:
            put(w, r.T @ (g[:, None] * get(w)))
    if plan.norms:  # the folded norms multiply by ones; their scales may be shared with the final norm: left as they are
        ones = f"{ROTATION_TAG}.ones"
        graph.initializer.append(numpy_helper.from_array(np.ones(plan.hidden, dtype_of(plan.norms[0].scale)), ones))
        sites = {n.node: n.scale_input for n in plan.norms}
        for node in graph.node:
            if node.output and node.output[0] in sites:
                node.input[:] = [ones if i == sites[node.output[0]] else i for i in node.input]
    for w, b in plan.writers:
        put(w, get(w) @ r)
        if b:
            put(b, get(b) @ r)
    if heads:
        r2 = random_rotation(heads[0][2], rng)
        biases = value_biases(model, [v for v, _, _ in heads])
        for v, o, d in heads:
            wv, wo = get(v), get(o)
            put(v, (wv.reshape(wv.shape[0], -1, d) @ r2).reshape(wv.shape))
            put(o, (r2.T @ wo.reshape(-1, d, wo.shape[1])).reshape(wo.shape))
            if v in biases:  # Qwen2's: the values are x W_v + b_v, both rotated
                put(biases[v], (get(biases[v]).reshape(-1, d) @ r2).reshape(-1))
    for w in online:
        online_hadamard(model, w, rng)
    dtype = dtype_of(plan.writers[0][0]) if plan.writers else np.float32
    _insert_matmul(graph, plan.entry, r.astype(dtype), "in")
    _insert_matmul(graph, plan.exit, r.T.astype(dtype), "out")
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for name in {n.scale for n in plan.norms} - used:  # a scale only the folded norms read
        graph.initializer.remove(inits[name])
    return model


def head_tensors(model: onnx.ModelProto, heads: Sequence[tuple[str, str, int]]) -> list[str]:
    """Initializers R2 rewrites for `heads` (v weight, o weight, head dim): both weights and V's output bias."""
    return [w for v, o, _ in heads for w in (v, o)] + list(value_biases(model, [v for v, _, _ in heads]).values())


def value_biases(model: onnx.ModelProto, weights: Sequence[str]) -> dict[str, str]:
    """V weight -> the constant bias its MatMul's output gets (an Add of an [N] initializer), where there is one."""
    g = _Lookup(model)
    out = {}
    for n in g.nodes:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in weights:
            width = [g.dims[n.input[1]][-1]]
            found = [g.source(i) for c in g.consumers.get(n.output[0], []) if c.op_type == "Add" for i in c.input
                     if g.dims.get(g.source(i)) == width]
            if len(found) == 1:
                out[n.input[1]] = found[0]
    return out


def online_hadamard(model: onnx.ModelProto, weight: str, rng: np.random.Generator) -> bool:
    """Rotate the input of the MatMul reading `weight` [k, n] (loaded) by a random Hadamard H = A ⊗ B computed online
    (reshape to [-1, |A|, |B|], two small MatMuls, reshape back) and set W <- Hᵀ W; False where k has no Hadamard."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    pos, node = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "MatMul" and n.input[1] == weight)
    w = numpy_helper.to_array(inits[weight]).astype(np.float64)
    factors = hadamard_factors(w.shape[0], rng)
    if factors is None:
        return False
    a, b = factors
    dtype = helper.tensor_dtype_to_np_dtype(inits[weight].data_type)
    rotated = np.einsum("pa,qb,pqj->abj", a, b, w.reshape(len(a), len(b), -1)).reshape(w.shape)
    inits[weight].CopyFrom(numpy_helper.from_array(rotated.astype(dtype), weight))
    base = f"{(node.name or node.output[0]).rsplit('/', 1)[0]}/{ROTATION_TAG}"
    x = node.input[0]
    consts = {"shape": np.array([-1, len(a), len(b)], np.int64), "b": b.astype(dtype), "a_t": a.T.astype(dtype)}
    for key, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(value, f"{base}.{key}"))
    t = lambda op: f"{base}/{op}_output_0"  # noqa: E731
    new = [
        helper.make_node("Shape", [x], [t("Shape")], name=f"{base}/Shape"),
        helper.make_node("Reshape", [x, f"{base}.shape"], [t("Reshape")], name=f"{base}/Reshape"),
        helper.make_node("MatMul", [t("Reshape"), f"{base}.b"], [t("MatMul")], name=f"{base}/MatMul"),
        helper.make_node("MatMul", [f"{base}.a_t", t("MatMul")], [t("MatMul_1")], name=f"{base}/MatMul_1"),
        helper.make_node("Reshape", [t("MatMul_1"), t("Shape")], [t("Reshape_1")], name=f"{base}/Reshape_1"),
    ]
    for k, n in enumerate(new):
        graph.node.insert(pos + k, n)
    node.input[0] = t("Reshape_1")
    return True


def _insert_matmul(graph: onnx.GraphProto, tensor: str, matrix: np.ndarray, tag: str) -> None:
    """Put `tensor @ matrix` right after the producer of `tensor`; all its consumers read the product instead."""
    if any(o.name == tensor for o in graph.output):
        raise OnnxqError(f"--rotate: the stream tensor {tensor!r} is a graph output: drop --rotate")
    name = f"/{ROTATION_TAG}/{tag}"
    out = f"{name}/MatMul_output_0"
    graph.initializer.append(numpy_helper.from_array(matrix, f"{ROTATION_TAG}.{tag}.weight"))
    for node in graph.node:
        node.input[:] = [out if i == tensor else i for i in node.input]
    pos = next(i for i, n in enumerate(graph.node) if tensor in n.output) + 1
    graph.node.insert(pos, helper.make_node("MatMul", [tensor, f"{ROTATION_TAG}.{tag}.weight"], [out], name=f"{name}/MatMul"))


class _Lookup(GraphIndex):
    """`GraphIndex` plus initializer shapes and graph inputs."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__(model)
        self.dims = {t.name: list(t.dims) for t in model.graph.initializer}
        self.inputs = {i.name for i in model.graph.input}

    def source(self, t: str) -> str:
        """The initializer behind `t` through Identity nodes (exporters alias shared parameters that way), else `t`."""
        while t not in self.dims and t in self.producer and self.producer[t].op_type == "Identity":
            t = self.producer[t].input[0]
        return t

    def transparent(self, t: str) -> list[str]:
        """`t` and the outputs of the (no-op) Casts and constant scalar Muls (Gemma's embedding scale) that read it,
        transitively: a rotation of the stream commutes with both."""
        out, todo = [], [t]
        while todo:
            x = todo.pop()
            out.append(x)
            todo += [n.output[0] for n in self.consumers.get(x, []) if n.op_type == "Cast" or self._scalar_mul(n)]
        return out

    def reader_past_adds(self, stream: list[str]) -> str:
        """The op type first reached below `stream` through Adds and Casts (what a stream with no RMSNorm feeds, e.g.
        LayerNormalization after the position embedding is added), else a phrase saying there is none."""
        todo, seen = list(stream), set(stream)
        while todo:
            for n in self.consumers.get(todo.pop(0), []):
                if n.op_type not in {"Add", "Cast"} | _SHAPE_ONLY:
                    return n.op_type
                todo += [o for o in n.output if o not in seen and n.op_type not in _SHAPE_ONLY]
                seen.update(n.output)
        return "a reader that is not an RMSNorm"

    def _scalar_mul(self, node: onnx.NodeProto) -> bool:
        """Whether `node` multiplies by a constant scalar."""
        consts = [self.value(i) for i in node.input if self.is_const(i)]
        return node.op_type == "Mul" and len(consts) == 1 and consts[0] is not None and consts[0].size == 1

    def weight_of(self, node: onnx.NodeProto, k: int) -> str | None:
        """The constant [k, n] weight of a MatMul node, else None."""
        if node.op_type == "MatMul" and len(node.input) == 2 and len(self.dims.get(node.input[1], [])) == 2:
            return node.input[1] if self.dims[node.input[1]][0] == k else None
        return None

    def writer(self, tensor: str, hidden: int) -> tuple[str, str | None]:
        """(weight, bias) of the linear layer producing `tensor` (a MatMul, optionally + a constant bias)."""
        node, bias = self.producer.get(tensor), None
        if node is not None and node.op_type == "Add":
            consts = [i for i in node.input if i in self.dims and self.dims[i] == [hidden]]
            rest = [i for i in node.input if i not in consts]
            if len(consts) == 1 and len(rest) == 1:
                bias, node = consts[0], self.producer.get(rest[0])
        if node is not None and (node.op_type == "SimplifiedLayerNormalization" or node.op_type == "Mul" and any(
                self.dims.get(self.source(i)) == [hidden] for i in node.input)
                and "ReduceMean" in self.ancestors_ops(node.output[0], limit=16)):
            raise OnnxqError(f"--rotate: the residual branch {tensor!r} is normalized after its linear layer (a "
                             "post-norm, as in Gemma-2/3): only pre-RMSNorm decoders can be rotated; drop --rotate")
        if node is None or node.op_type != "MatMul" or len(self.dims.get(node.input[1], [])) != 2 \
                or self.dims[node.input[1]][1] != hidden:
            raise OnnxqError(f"--rotate: the residual branch {tensor!r} is not the output of a linear layer with a "
                             "constant weight: drop --rotate")
        return node.input[1], bias


def _embedding_output(g: _Lookup) -> str:
    """Output of the Gather that reads a 2-D embedding table with token ids from a graph input."""
    for n in g.nodes:
        if n.op_type == "Gather" and len(g.dims.get(n.input[0], [])) == 2 and n.input[1] in g.inputs:
            return n.output[0]
    raise OnnxqError("--rotate: no token embedding (Gather of a 2-D table by input ids) found: drop --rotate")


def _rms_norm(g: _Lookup, stream: list[str], hidden: int) -> tuple[set[str], str | None, onnx.NodeProto | None]:
    """(node outputs, scale initializer, scale node) of the RMSNorm reading `stream`; scale None when there is none.

    Decomposed form x·(1/sqrt(mean(x²)+eps))·g (the nodes between the stream and the Mul by a [hidden] constant, a
    ReduceMean among them); ORT's fused SimplifiedLayerNormalization also counts."""
    for t in stream:
        for n in g.consumers.get(t, []):
            if n.op_type == "SimplifiedLayerNormalization" and g.dims.get(g.source(n.input[1])) == [hidden]:
                return {n.output[0]}, g.source(n.input[1]), n
    seen: dict[str, onnx.NodeProto] = {}
    scales: list[onnx.NodeProto] = []
    todo = [n for t in stream for n in g.consumers.get(t, [])
            if n.op_type in ("Pow", "Mul") and n.output[0] not in stream]
    while todo and len(seen) < 16:
        n = todo.pop()
        if n.output[0] in seen or n.op_type not in _NORM_OPS:
            continue
        if n.op_type == "Add" and not any(g.is_const(i) for i in n.input):
            continue  # a residual Add, not the eps of the norm
        seen[n.output[0]] = n
        if n.op_type == "Mul" and any(g.dims.get(g.source(i)) == [hidden] for i in n.input):
            scales.append(n)  # the norm's scale: its output is the norm's output
            continue
        todo += [c for o in n.output for c in g.consumers.get(o, [])]
    if len(scales) != 1 or not any(n.op_type == "ReduceMean" for n in seen.values()):
        return set(seen), None, None
    (mul,) = scales
    return set(seen), next(g.source(i) for i in mul.input if g.dims.get(g.source(i)) == [hidden]), mul
