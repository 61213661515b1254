"""Helpers shared by test files: quantized weights read back and made up, fake-quant references, model outputs
compared."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxq.graph.io import read_array
from onnxq.formats.packing import unpack_nbits
from onnxq.formats.rewrite import QuantizedWeight
from onnxq.runtime.session import make_session, model_feeds


def dequantized(model: onnx.ModelProto, folder, node: onnx.NodeProto) -> np.ndarray:
    """W [K, N] of a MatMulNBits node, dequantized from its stored codes, scales and zero points."""
    attrs = {a.name: a.i for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    inits = {t.name: t for t in model.graph.initializer}
    blob, scales = (read_array(inits[t], str(folder)) for t in node.input[1:3])
    zp = read_array(inits[node.input[3]], str(folder)).reshape(n, -1) if len(node.input) > 3 else None
    codes, zeros = unpack_nbits(blob, zp, bits, k)
    cols = np.arange(k) // block
    zeros = (1 << (bits - 1)) if zeros is None else zeros[:, cols]
    return ((codes.astype(np.int64) - zeros) * scales.reshape(n, -1)[:, cols]).T.astype(np.float32)


def fake_quant_reference(reference: onnx.ModelProto, quantized: str | Path) -> onnx.ModelProto:
    """`reference` (a float graph with its weights, in the quantized file's node names) holding, in each MatMul, the
    dequantized weight of the quantized file's MatMulNBits of the same name; every such node must have its MatMul."""
    quant = onnx.load(str(quantized), load_external_data=False)
    weights = {n.name: dequantized(quant, Path(quantized).parent, n) for n in quant.graph.node
               if n.op_type == "MatMulNBits"}
    inits = {t.name: t for t in reference.graph.initializer}
    for node in reference.graph.node:
        if node.op_type == "MatMul" and node.name in weights:
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(weights.pop(node.name), node.input[1]))
    assert not weights, f"no float MatMul for {sorted(weights)}"
    return reference


def outputs(model: onnx.ModelProto | str | Path, ids: np.ndarray, dims: dict[str, int] | None = None) -> np.ndarray:
    """The logits (else the first output, e.g. an encoder's hidden states) of one fresh ORT run on `ids`."""
    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    return session.run(["logits" if "logits" in names else names[0]], model_feeds(session, ids, dims))[0]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖b‖."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def random_weight(n, k, bits, group, sym, rng) -> QuantizedWeight:
    """Codes over the whole range [0, 2^bits - 1], random scales and zero points."""
    groups = 1 if group == -1 else -(-k // group)
    zeros = None if sym else rng.integers(0, 1 << bits, (n, groups))
    scales = (rng.random((n, groups)) * 0.1 + 0.01).astype(np.float32)
    return QuantizedWeight(rng.integers(0, 1 << bits, (n, k)), scales, zeros, bits, group)


_FEEDS_RNG = np.random.default_rng(0)  # one stream for the whole session, as check_same_outputs always drew


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs for a tiny model: token ids < 32, all-ones mask, arange positions, zero token types, random floats."""
    out = {}
    for i in ort.InferenceSession(model.SerializeToString()).get_inputs():
        shape = [d if isinstance(d, int) else {0: 2}.get(n, 7) for n, d in enumerate(i.shape)]
        if i.type != "tensor(int64)":
            out[i.name] = _FEEDS_RNG.standard_normal(shape).astype(np.float32)
        elif i.name == "position_ids":
            out[i.name] = np.broadcast_to(np.arange(shape[1]), shape).copy()
        else:
            out[i.name] = {"attention_mask": np.ones(shape, np.int64), "token_type_ids": np.zeros(shape, np.int64)}.get(
                i.name, _FEEDS_RNG.integers(0, 32, shape))
    return out


def _run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of one CPU ORT run of an in-memory model."""
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)


def check_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Both in-memory models give the same outputs (max error <= 1e-5 of the largest) on the same random inputs."""
    inputs = _feeds(before)
    for ref, got in zip(_run(before, inputs), _run(after, inputs)):
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
