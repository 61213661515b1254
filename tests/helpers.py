"""Helpers shared by test files: quantized weights read back, fake-quant references, model outputs compared."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.graph.io import read_array
from onnxq.formats.packing import unpack_nbits
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
