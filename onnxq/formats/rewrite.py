"""Write quantized weights into the graph: MatMul -> com.microsoft::MatMulNBits, or DequantizeLinear -> MatMul (QDQ)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, defs, helper, numpy_helper, version_converter

from onnxq.errors import OnnxqError
from onnxq.graph.io import one_line, restore_weights, strip_weights
from onnxq.formats.packing import pack_nbits, pack_subbyte

from ..graph.normalize import Names, all_nodes, remove_unused, renamed

MS_DOMAIN = "com.microsoft"
NBITS_MAX_BLOCK_2BIT = 256  # ORT 1.32 CPU refuses 2-bit MatMulNBits with larger blocks
PER_CHANNEL_BLOCK = 128  # MatMulNBits block for per-channel weights (the channel's scale is repeated per block)
_QDQ_TYPES = {  # container bits -> (signed, unsigned) DequantizeLinear input type
    2: (TensorProto.INT2, TensorProto.UINT2),
    4: (TensorProto.INT4, TensorProto.UINT4),
    8: (TensorProto.INT8, TensorProto.UINT8),
}
_MEANING_CHANGED = {"Softmax", "LogSoftmax", "Hardmax", "GroupNormalization"}  # same signature, new semantics


@dataclass
class QuantizedWeight:
    """Integer weights of one MatMul, rows = output channels (the ONNX initializer [K, N] transposed)."""

    codes: np.ndarray  # [N, K] ints in [0, 2^bits - 1]
    scales: np.ndarray  # [N, G] float32, G = ceil(K / group_size) (1 for per-channel)
    zeros: np.ndarray | None  # [N, G] ints, or floats (MatMulNBits only); None = symmetric, zero 2^(bits-1)
    bits: int  # 2, 3, 4 or 8 (3 is stored in 4-bit containers)
    group_size: int  # -1 = per channel


def to_matmulnbits(
    model: onnx.ModelProto, weights: dict[str, QuantizedWeight], *, accuracy_level: int = 4
) -> onnx.ModelProto:
    """Replace each named MatMul by MatMulNBits (same name and output), in place; returns `model`.

    3-bit codes use bits=4 containers (symmetric ones shifted by +4, so the implicit zero point 8 still applies).
    Groups become blocks; per-channel weights use blocks of PER_CHANNEL_BLOCK (or the next power of two >= K, >= 16,
    when smaller) with the channel's scale repeated, so K is padded by less than one block and 2-bit stays within
    ORT's 256 limit.
    """
    names = Names(model.graph)
    for node, weight, qw in _targets(model.graph, weights):
        k, n = weight.dims
        bits = 4 if qw.bits == 3 else qw.bits
        block = _nbits_block(qw, k, node.name)
        if qw.bits == 8 and qw.zeros is not None and qw.zeros.dtype.kind == "f":
            raise OnnxqError(f"{node.name!r}: ONNX Runtime's MatMulNBits has no 8-bit kernel with float zero points: "
                             "use integer zero points at 8 bits")
        codes = qw.codes if qw.zeros is not None else qw.codes + (1 << (bits - 1)) - (1 << (qw.bits - 1))
        blob, scales, zp = pack_nbits(codes, qw.scales, qw.zeros, bits, block)
        dtype = helper.tensor_dtype_to_np_dtype(weight.data_type)
        inputs = [
            node.input[0],
            _add(model, names, f"{node.name}.B", blob),
            _add(model, names, f"{node.name}.scales", scales.astype(dtype).reshape(-1)),  # 1-D as ORT writes them:
        ]  # onnxruntime-web's WebGPU kernel rejects the 2-D [N, blocks] form
        if zp is not None:
            zp = zp.astype(dtype) if zp.dtype.kind == "f" else zp  # float zero points: A's dtype, unpacked
            inputs.append(_add(model, names, f"{node.name}.zero_points", zp.reshape(-1)))
        node.CopyFrom(helper.make_node(
            "MatMulNBits", inputs, list(node.output), name=node.name, domain=MS_DOMAIN,
            K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level,
        ))
    remove_unused(model.graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def to_qdq(model: onnx.ModelProto, weights: dict[str, QuantizedWeight]) -> onnx.ModelProto:
    """Feed each named MatMul from DequantizeLinear(integer weight [K, N]), in place; returns `model`.

    Asymmetric: uint2/uint4/uint8 codes and zero points; symmetric: int codes - 2^(bits-1), no zero point (3-bit in
    int4/uint4). Groups are blocks along K (axis=0, block_size=group_size); per-channel is per-axis (axis=1).
    Needs opset 21 (opset 25 when any weight is 2-bit), raised as `_raise_opset` describes.
    """
    if any(qw.zeros is not None and qw.zeros.dtype.kind == "f" for qw in weights.values()):
        raise OnnxqError("float zero points have no DequantizeLinear form: write MatMulNBits (--format nbits) "
                         "or use integer zero points")
    bits = {qw.bits for *_, qw in _targets(model.graph, weights)}
    if bits:
        _raise_opset(model, 25 if 2 in bits else 21)  # may replace the graph: look the targets up again after it
    names = Names(model.graph)
    dq_for = {}
    for node, weight, qw in _targets(model.graph, weights):
        signed, unsigned = _QDQ_TYPES[4 if qw.bits == 3 else qw.bits]
        dtype = helper.tensor_dtype_to_np_dtype(weight.data_type)
        values = qw.codes.T if qw.zeros is not None else qw.codes.T.astype(np.int64) - (1 << (qw.bits - 1))
        per_channel = qw.group_size == -1
        scales = (qw.scales[:, 0] if per_channel else qw.scales.T).astype(dtype)
        q_type = unsigned if qw.zeros is not None else signed
        inputs = [
            _add(model, names, f"{node.name}.weight_q", _int_tensor(values, q_type)),
            _add(model, names, f"{node.name}.weight_scale", scales),
        ]
        if qw.zeros is not None:
            zeros = qw.zeros[:, 0] if per_channel else qw.zeros.T
            inputs.append(_add(model, names, f"{node.name}.weight_zero_point", _int_tensor(zeros, q_type)))
        attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": qw.group_size}
        out = names.unique(f"{node.name}.weight_dq")
        dq_name = names.unique(renamed(node.name, "DequantizeLinear", "MatMul"))
        dq_for[node.name] = helper.make_node("DequantizeLinear", inputs, [out], name=dq_name, **attrs)
        node.input[1] = out
    nodes = [x for node in model.graph.node for x in ([dq_for[node.name]] if node.name in dq_for else []) + [node]]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    remove_unused(model.graph)
    return model


def add_output_bias(model: onnx.ModelProto, biases: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Route each named node's first output through Add(output, bias) (same tensor name downstream), in place.

    `biases` maps node name -> [N] array in the output's dtype; works on MatMul, MatMulNBits and QDQ MatMuls alike."""
    names = Names(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    missing = sorted(set(biases) - set(nodes))
    if missing:
        raise OnnxqError(f"cannot add an output bias to {missing[0]!r}: no node of that name in the graph")
    add_for = {}
    for name, bias in biases.items():
        node = nodes[name]
        out = node.output[0]
        node.output[0] = names.unique(f"{out}.no_bias")
        b = _add(model, names, f"{name}.bias", np.ascontiguousarray(bias).reshape(-1))
        add_for[name] = helper.make_node("Add", [node.output[0], b], [out], name=names.unique(f"{name}.bias_add"))
    order = [x for node in model.graph.node for x in [node] + ([add_for[node.name]] if node.name in add_for else [])]
    del model.graph.node[:]
    model.graph.node.extend(order)
    return model


def _targets(
    graph: onnx.GraphProto, weights: dict[str, QuantizedWeight]
) -> list[tuple[onnx.NodeProto, TensorProto, QuantizedWeight]]:
    """(MatMul node, its weight initializer [K, N], quantized weight) per entry, all checked before any rewrite."""
    nodes = {n.name: n for n in graph.node}
    inits = {t.name: t for t in graph.initializer}
    targets = []
    for name, qw in weights.items():
        node = nodes.get(name)
        if node is None or node.op_type != "MatMul" or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2:
            raise OnnxqError(f"{name!r} is not a MatMul with a constant 2-D weight: normalize the model or check the name")
        weight = inits[node.input[1]]
        problem = _problem(qw, *weight.dims)
        if problem:
            raise OnnxqError(f"quantized weight for {name!r} is invalid: {problem}")
        targets.append((node, weight, qw))
    return targets


def _problem(qw: QuantizedWeight, k: int, n: int) -> str | None:
    """What makes `qw` unfit for a weight [K, N], or None."""
    if qw.bits not in (2, 3, 4, 8):
        return f"bits={qw.bits} (use 2, 3, 4 or 8)"
    if qw.group_size == 0 or qw.group_size < -1:
        return f"group_size={qw.group_size} (use -1 or a positive size)"
    groups = 1 if qw.group_size == -1 else -(-k // qw.group_size)
    if qw.codes.shape != (n, k):
        return f"codes shape {qw.codes.shape}, expected [N, K] = {(n, k)}"
    if qw.scales.shape != (n, groups) or (qw.zeros is not None and qw.zeros.shape != (n, groups)):
        return f"scales/zeros shape {qw.scales.shape}, expected [N, groups] = {(n, groups)}"
    float_zero = qw.zeros is not None and qw.zeros.dtype.kind == "f"
    if float_zero and not np.isfinite(qw.zeros).all():
        return "float zero points hold NaN/Inf"
    if any(a.min() < 0 or a.max() >= 1 << qw.bits for a in (qw.codes, None if float_zero else qw.zeros) if a is not None):
        return f"codes/zeros outside [0, {(1 << qw.bits) - 1}]"
    return None


def _nbits_block(qw: QuantizedWeight, k: int, name: str) -> int:
    if qw.group_size == -1:
        return min(PER_CHANNEL_BLOCK, max(16, 1 << (k - 1).bit_length()))
    if qw.group_size < 16 or qw.group_size & (qw.group_size - 1):
        raise OnnxqError(f"{name!r}: MatMulNBits needs a power-of-two group size >= 16, not {qw.group_size}: use 32/64/128")
    if qw.bits == 2 and qw.group_size > NBITS_MAX_BLOCK_2BIT:
        raise OnnxqError(f"{name!r}: ONNX Runtime limits 2-bit MatMulNBits blocks to {NBITS_MAX_BLOCK_2BIT}: use a smaller group")
    return qw.group_size


def _int_tensor(values: np.ndarray, data_type: int) -> TensorProto:
    """An integer initializer (int8/uint8 via numpy, 2/4-bit packed two's-complement) with the given values."""
    if data_type in (TensorProto.INT8, TensorProto.UINT8):
        return numpy_helper.from_array(values.astype(helper.tensor_dtype_to_np_dtype(data_type)))
    bits = 4 if data_type in (TensorProto.INT4, TensorProto.UINT4) else 2
    return helper.make_tensor("", data_type, values.shape, pack_subbyte(values, bits), raw=True)


def _add(model: onnx.ModelProto, names: Names, name: str, value: np.ndarray | TensorProto) -> str:
    """Append an initializer under a fresh name derived from `name`; return that name."""
    tensor = value if isinstance(value, TensorProto) else numpy_helper.from_array(np.ascontiguousarray(value))
    tensor.name = names.unique(name)
    model.graph.initializer.append(tensor)
    return tensor.name


def _raise_opset(model: onnx.ModelProto, target: int) -> None:
    """Raise the default-domain opset import to `target` (nothing to do if already there) and the IR version with it.

    When every default-domain op in the graph keeps its inputs, outputs and attribute defaults from the model's
    opset to `target` (true for transformer exports at opset 14-18 going to 21/25: the newer versions of Cast,
    Reshape, Shape, Pad, Squeeze, ... only add types or optional attributes), only the import number is raised.
    Otherwise (a signature change such as ReduceMean's axes input at 18, or a same-signature change of meaning:
    Softmax family at 13, GroupNormalization at 21) `onnx.version_converter` rewrites the graph, weights detached.
    """
    entry = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if entry.version < target:
        ops = {n.op_type for n in all_nodes(model.graph) if n.domain in ("", "ai.onnx")}
        if all(_same_meaning(op, entry.version, target) for op in ops):
            entry.version = target
        else:
            payloads = strip_weights(model)
            try:
                model.CopyFrom(version_converter.convert_version(model, target))
            except (RuntimeError, ValueError, onnx.checker.ValidationError) as err:
                reason = one_line(err)
                raise OnnxqError(f"cannot convert the model to opset {target} for QDQ ({reason}): use --format nbits") from None
            finally:
                restore_weights(model, payloads)
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(model.opset_import, ignore_unknown=True))


def _same_meaning(op: str, old: int, new: int) -> bool:
    """Whether nodes of `op` valid at opset `old` mean the same at `new` (only types/optional parts were added)."""
    try:
        a, b = defs.get_schema(op, old), defs.get_schema(op, new)
    except defs.SchemaError:
        return False
    if a.since_version == b.since_version:
        return True
    optional = defs.OpSchema.FormalParameterOption.Optional
    return (
        op not in _MEANING_CHANGED
        and _params(b.inputs)[: len(a.inputs)] == _params(a.inputs)
        and all(p.option == optional for p in b.inputs[len(a.inputs):])
        and _params(b.outputs) == _params(a.outputs)
        and all(k in b.attributes and b.attributes[k].default_value == attr.default_value for k, attr in a.attributes.items())
        and not any(attr.required for k, attr in b.attributes.items() if k not in a.attributes)
    )


def _params(params: list[defs.OpSchema.FormalParameter]) -> list[tuple[str, object]]:
    return [(p.name, p.option) for p in params]
