"""Model quality and size: perplexity on token windows, logit error against the float model, bytes on disk."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.errors import OnnxqError

from .session import make_session, model_feeds

Model = onnx.ModelProto | str | Path


def _logits(session: ort.InferenceSession, input_ids: np.ndarray) -> np.ndarray:
    """Logits `[batch, seq, vocab]` of one fresh run (output "logits", else the first output)."""
    names = [o.name for o in session.get_outputs()]
    name = "logits" if "logits" in names else names[0]
    return session.run([name], model_feeds(session, input_ids))[0]


def _check_windows(windows: np.ndarray) -> None:
    if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
        raise OnnxqError(f"token windows must be [n >= 1, seq_len >= 2], got {list(windows.shape)}")


def perplexity(model: Model, windows: np.ndarray, ep: str = "cpu", *, context: int = 1,
               disabled_optimizers: list[str] | None = None) -> float:
    """exp(mean next-token NLL) over all predicted tokens of all windows.

    Method: each row of `windows` is run alone as a fresh sequence (batch 1, positions 0..L-1, empty cache, nothing
    added: a tokenizer's BOS is in the window already); the logits at position t score token t+1, and the first
    `context` tokens (at least the first; the tokenizer's prefix ids, e.g. BOS) are never predicted, so a window of
    L tokens predicts L - context tokens. Log-softmax is taken in float64; the NLLs of all windows are pooled,
    averaged, exponentiated. `disabled_optimizers` names ORT graph transformers to switch off (e.g.
    QDQSelectorActionTransformer).
    """
    _check_windows(windows)
    if not 1 <= context < windows.shape[1]:
        raise OnnxqError(f"context {context} leaves nothing to predict in windows of {windows.shape[1]}: "
                         "use longer windows")
    session = make_session(model, ep, disabled_optimizers=disabled_optimizers)
    total, count = 0.0, 0
    for window in windows:
        logits = _logits(session, window[None])[0, context - 1:-1].astype(np.float64)
        peak = logits.max(axis=-1)
        lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1))
        total += float((lse - logits[np.arange(len(logits)), window[context:]]).sum())
        count += len(logits)
    return math.exp(total / count)


def output_error(float_model: Model, quant_model: Model, windows: np.ndarray, ep: str = "cpu") -> dict[str, float]:
    """Logits of `quant_model` against `float_model` on the same windows.

    rel_l2 = ‖Δ‖₂ / ‖ref‖₂ over all logits, max_abs = max |Δ|, top1_agreement = share of positions with the same
    argmax; tokens = positions compared.
    """
    _check_windows(windows)
    ref_session, quant_session = make_session(float_model, ep), make_session(quant_model, ep)
    sq_err = sq_ref = max_abs = 0.0
    agree = 0
    for window in windows:
        ref = _logits(ref_session, window[None]).astype(np.float64)
        quant = _logits(quant_session, window[None]).astype(np.float64)
        diff = quant - ref
        sq_err += float((diff**2).sum())
        sq_ref += float((ref**2).sum())
        max_abs = max(max_abs, float(np.abs(diff).max()))
        agree += int((ref.argmax(-1) == quant.argmax(-1)).sum())
    return {"rel_l2": math.sqrt(sq_err / sq_ref), "max_abs": max_abs,
            "top1_agreement": agree / windows.size, "tokens": int(windows.size)}


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and attribute tensors of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def file_size(path: str | Path) -> int:
    """Bytes on disk of a .onnx file plus every external-data file it references."""
    path = Path(path)
    if not path.is_file():
        raise OnnxqError(f"model file '{path}' not found: give an existing .onnx file")
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)
