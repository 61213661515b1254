"""Cut a model into runnable sub-models (stem, one per decoder block) whose inputs are the live tensors."""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from onnxq.analysis.layers import Partition


@dataclass
class SubModel:
    """A piece of the graph: its nodes, the tensors it reads from outside, and what it hands on."""

    nodes: list[onnx.NodeProto]
    inputs: list[str]
    outputs: list[str]
    initializers: list[str]


def tensor_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Type of every named value after shape inference (graph inputs, outputs, intermediates)."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.graph.initializer[:]  # weights are not needed to infer types; their dims come back as inputs
    for t in model.graph.initializer:
        stripped.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    inferred = onnx.shape_inference.infer_shapes(stripped, strict_mode=False)
    g = inferred.graph
    return {v.name: v.type for v in list(g.value_info) + list(g.input) + list(g.output)}


def split_model(model: onnx.ModelProto, part: Partition) -> tuple[SubModel, list[SubModel]]:
    """Stem and per-block sub-models; a block's outputs are everything a later piece still needs."""
    nodes = list(model.graph.node)
    inits = {t.name for t in model.graph.initializer}
    pieces = [part.stem] + part.blocks + [part.head]
    needed_later: list[set[str]] = []
    later: set[str] = {o.name for o in model.graph.output}
    for idx in reversed(pieces):
        needed_later.append(set(later))
        for i in idx:
            later.update(t for t in nodes[i].input if t)
    needed_later.reverse()
    constants = {n.output[0]: n for n in (nodes[i] for i in part.stem) if n.op_type == "Constant" and not n.input}
    subs = []
    for k, (idx, after) in enumerate(zip(pieces[:-1], needed_later[:-1])):
        own = [nodes[i] for i in idx if k > 0 or nodes[i].output[0] not in constants]
        copied = {t for n in own for t in n.input if t in constants}
        own = [constants[t] for t in sorted(copied)] + own  # small constants travel with their readers
        produced = {o for n in own for o in n.output if o}
        read = []
        for n in own:
            for t in n.input:
                if t and t not in produced and t not in inits and t not in read:
                    read.append(t)
        used_inits = sorted({t for n in own for t in n.input if t in inits})
        outputs = [o for n in own for o in n.output if o and o in after and o not in constants]
        subs.append(SubModel(own, read, outputs, used_inits))
    return subs[0], subs[1:]


def build_model(
    model: onnx.ModelProto,
    sub: SubModel,
    types: dict[str, onnx.TypeProto],
    *,
    extra_outputs: list[str] = (),
    inputs: list[str] | None = None,
    weights: dict[str, onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    """A standalone ModelProto for `sub`, optionally exposing `extra_outputs` and overriding initializers."""
    by_name = {t.name: t for t in model.graph.initializer}
    weights = weights or {}

    declared = {i.name: i for i in model.graph.input}

    def value_info(name: str) -> onnx.ValueInfoProto:
        if name in declared:  # the model's own inputs keep their declared (symbolic) shapes
            return declared[name]
        t = types.get(name)
        if t is None:
            raise KeyError(name)
        vi = onnx.ValueInfoProto(name=name)
        vi.type.CopyFrom(t)
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")  # batch/sequence sizes vary between calls
        return vi

    outs = list(dict.fromkeys(list(sub.outputs) + list(extra_outputs)))
    ins = list(inputs if inputs is not None else sub.inputs)
    graph = helper.make_graph(
        sub.nodes,
        "onnxq_piece",
        [value_info(n) for n in ins],
        [value_info(n) for n in outs],
        initializer=[weights.get(n, by_name[n]) for n in sub.initializers],
    )
    piece = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return piece
