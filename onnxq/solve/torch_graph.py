"""Run an ONNX graph (a decoder block piece) eagerly in torch, so that gradients reach chosen initializers."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor

from ..errors import OnnxqError

_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64}


def _ints(t: Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _div(x: list, a: dict) -> Tensor:
    if x[0].is_floating_point() or x[1].is_floating_point():
        return x[0] / x[1]
    return torch.div(x[0], x[1], rounding_mode="trunc")


def _reshape(x: list, a: dict) -> Tensor:
    shape = _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x[0].reshape(shape)


def _unsqueeze(x: list, a: dict) -> Tensor:
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(a["axes"])
    out, rank = x[0], x[0].dim() + len(axes)
    for ax in sorted(_axis(v, rank) for v in axes):
        out = out.unsqueeze(ax)
    return out


def _squeeze(x: list, a: dict) -> Tensor:
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(a.get("axes", []))
    if not axes:
        return x[0].squeeze()
    out = x[0]
    for ax in sorted((_axis(v, out.dim()) for v in axes), reverse=True):
        out = out.squeeze(ax)
    return out


def _slice(x: list, a: dict) -> Tensor:
    data = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st != 1:
            raise OnnxqError(f"Slice with step {st} is not supported by the torch block evaluator: drop --block-tune for this model")
        n = data.shape[_axis(ax, data.dim())]
        s, e = (max(0, min(n, v + n if v < 0 else v)) for v in (s, e))
        index[_axis(ax, data.dim())] = slice(s, e)
    return data[tuple(index)]


def _gather(x: list, a: dict) -> Tensor:
    data, idx = x[0], x[1]
    ax = _axis(a.get("axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[ax], idx)
    out = data.index_select(ax, idx.reshape(-1))
    return out.reshape(data.shape[:ax] + idx.shape + data.shape[ax + 1 :])


def _reduce_mean(x: list, a: dict) -> Tensor:
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(a.get("axes", range(x[0].dim())))
    return x[0].mean(dim=axes, keepdim=bool(a.get("keepdims", 1)))


def _layer_norm(x: list, a: dict) -> Tensor:
    axis = _axis(a.get("axis", -1), x[0].dim())
    bias = x[2] if len(x) > 2 else None
    return torch.nn.functional.layer_norm(x[0], x[0].shape[axis:], x[1], bias, a.get("epsilon", 1e-5))


def _split(x: list, a: dict) -> tuple[Tensor, ...]:
    ax = _axis(a.get("axis", 0), x[0].dim())
    if len(x) > 1 and x[1] is not None:
        return torch.split(x[0], _ints(x[1]), dim=ax)
    if "split" in a:
        return torch.split(x[0], list(a["split"]), dim=ax)
    n = a["num_outputs"]
    return torch.split(x[0], -(-x[0].shape[ax] // n), dim=ax)


def _shape(x: list, a: dict) -> Tensor:
    dims = list(x[0].shape)[a.get("start", 0) : a.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _expand(x: list, a: dict) -> Tensor:
    return torch.broadcast_to(x[0], torch.broadcast_shapes(x[0].shape, tuple(_ints(x[1]))))


def _constant_of_shape(x: list, a: dict) -> Tensor:
    value = a.get("value")
    fill = torch.from_numpy(numpy_helper.to_array(value).copy()) if value is not None else torch.zeros(1)
    return torch.full(tuple(_ints(x[0])), fill.reshape(-1)[0].item(), dtype=fill.dtype)


OPS = {
    "MatMul": lambda x, a: torch.matmul(x[0], x[1]),
    "Add": lambda x, a: x[0] + x[1],
    "Mul": lambda x, a: x[0] * x[1],
    "Div": _div,
    "Pow": lambda x, a: torch.pow(x[0], x[1]),
    "Sqrt": lambda x, a: torch.sqrt(x[0]),
    "Neg": lambda x, a: -x[0],
    "Tanh": lambda x, a: torch.tanh(x[0]),
    "Sigmoid": lambda x, a: torch.sigmoid(x[0]),
    "Softmax": lambda x, a: torch.softmax(x[0], dim=a.get("axis", -1)),
    "ReduceMean": _reduce_mean,
    "LayerNormalization": _layer_norm,
    "Reshape": _reshape,
    "Transpose": lambda x, a: x[0].permute(*(a.get("perm") or range(x[0].dim() - 1, -1, -1))),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": lambda x, a: torch.cat([t for t in x if t is not None], dim=a["axis"]),
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Shape": _shape,
    "Cast": lambda x, a: x[0].to(_DTYPES[a["to"]]),
    "Where": lambda x, a: torch.where(x[0], x[1], x[2]),
    "Equal": lambda x, a: torch.eq(x[0], x[1]),
    "IsNaN": lambda x, a: torch.isnan(x[0]),
    "Expand": _expand,
    "ConstantOfShape": _constant_of_shape,
}


class TorchGraph:
    """An ONNX graph evaluated op by op in torch: `graph(feeds, override)` returns its outputs; `override` replaces
    initializers by name (e.g. weights that depend on tunable tensors)."""

    def __init__(self, model: onnx.ModelProto):
        unknown = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")
                          or n.op_type not in OPS and n.op_type != "Constant"})
        if unknown:
            raise OnnxqError(f"block tuning evaluates blocks in torch and does not know op(s) {', '.join(unknown)}: "
                             "drop --block-tune for this model")
        self.consts = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
        self.nodes = []
        for n in model.graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "Split":
                attrs.setdefault("num_outputs", len(n.output))  # before opset 18: equal parts, one per output
            if n.op_type == "Constant":
                self.consts[n.output[0]] = _constant(attrs)
            else:
                self.nodes.append((n.op_type, list(n.input), list(n.output), attrs))
        self.inputs = [i.name for i in model.graph.input if i.name not in self.consts]
        self.outputs = [o.name for o in model.graph.output]

    def __call__(self, feeds: dict[str, Tensor | np.ndarray], override: dict[str, Tensor] | None = None) -> list[Tensor]:
        env = {**self.consts, **(override or {})}
        env.update({k: torch.as_tensor(v) for k, v in feeds.items()})
        for op, ins, outs, attrs in self.nodes:
            out = OPS[op]([env[i] if i else None for i in ins], attrs)
            env.update(zip(outs, out) if isinstance(out, tuple) else ((outs[0], out),))
        return [env[o] for o in self.outputs]


def _constant(attrs: dict) -> Tensor:
    if "value" not in attrs:
        raise OnnxqError(f"Constant with attribute(s) {sorted(attrs)} is not supported by the torch block evaluator: "
                         "drop --block-tune for this model")
    return torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
