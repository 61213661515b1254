"""A generation-ready folder: the builder's float graph with onnxq's solved weights, as onnxruntime-genai loads it.

Calibration and solving run on the analysis export (optimum, no KV cache); the builder's graph computes the same
function with fused attention, fused norms, packed QKV and a KV cache. Each of its MatMuls is matched to the analysis
layers whose weights it holds (a packed QKV holds Q, K and V side by side along N), checked value for value, and
written as MatMulNBits; a tied embedding becomes GatherBlockQuantized over the LM head's quantized data.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.analysis.layers import LinearLayer
from onnxq.errors import OnnxqError
from onnxq.graph.io import atomic_dir, existing_parent, read_array, save_model_atomic
from onnxq.graph.metadata import add_provenance
from onnxq.graph.normalize import Names, remove_unused
from onnxq.formats.rewrite import MS_DOMAIN, QuantizedWeight, to_matmulnbits

HEAD = "/lm_head/MatMul"
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "vocab.json", "merges.txt", "added_tokens.json")


def match_layers(graph: onnx.ModelProto, folder: Path, layers: list[LinearLayer], read_layer) -> dict[str, list[LinearLayer]]:
    """Builder MatMul name -> the analysis layers its weight holds side by side along N (one, or Q/K/V of a packed
    projection), each checked equal to the builder's float weight; builder MatMuls without such layers are left out."""
    by_node = {l.node: l for l in layers}
    inits = {t.name: t for t in graph.graph.initializer}
    found = {}
    for node in graph.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        parts = [by_node.get(n) for n in _analysis_names(node.name)]
        if not parts or any(p is None for p in parts):
            continue
        built = read_array(inits[node.input[1]], str(folder))
        ours = read_layer(parts[0]) if len(parts) == 1 else np.concatenate([read_layer(p) for p in parts], axis=1)
        if built.shape != ours.shape or not np.array_equal(built, ours.astype(built.dtype, copy=False)):
            raise OnnxqError(f"the builder's {node.name} does not hold the float weights of {', '.join(p.node for p in parts)}: "
                             "the two exports differ; write a single .onnx file instead (-o FILE.onnx)")
        found[node.name] = parts
    return found


def _analysis_names(name: str) -> list[str]:
    """Analysis-export node names (optimum's module paths) of the layers a builder MatMul holds."""
    m = re.fullmatch(r"/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul", name)
    if m is None:
        return [name] if name == HEAD else []
    block, kind, proj = m.groups()
    prefix = f"/model/layers.{block}/{'self_attn' if kind == 'attn' else 'mlp'}"
    return [f"{prefix}/{p}/MatMul" for p in _PACKED.get(proj, (proj,))]


def packed_weight(parts: list[QuantizedWeight], where: str) -> QuantizedWeight:
    """One QuantizedWeight of several stacked along N (rows); they must share bits, group and zero-point kind."""
    first = parts[0]
    form = lambda w: (w.bits, w.group_size, None if w.zeros is None else w.zeros.dtype.kind)  # noqa: E731
    if any(form(p) != form(first) for p in parts[1:]):
        raise OnnxqError(f"{where} packs layers quantized differently (bits, group or zero points): the genai graph "
                         "needs one format per packed projection; drop --v-int-zero or write a .onnx file")
    zeros = None if first.zeros is None else np.concatenate([p.zeros for p in parts])
    return QuantizedWeight(codes=np.concatenate([p.codes for p in parts]), scales=np.concatenate([p.scales for p in parts]),
                           zeros=zeros, bits=first.bits, group_size=first.group_size)


def quantized_embedding(graph: onnx.ModelProto, hidden: int) -> bool:
    """Rewire a tied float embedding (Gather over Transpose(lm_head weight)) to GatherBlockQuantized over the LM head's
    MatMulNBits data, scales and zero points (shared, reshaped); False where the layout does not allow it."""
    nodes = {n.name: n for n in graph.graph.node}
    head = nodes.get(HEAD)
    gather = next((n for n in graph.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"), None)
    if head is None or head.op_type != "MatMulNBits" or gather is None:
        return False
    producer = {o: n for n in graph.graph.node for o in n.output}.get(gather.input[0])
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    bits, block, vocab = attrs["bits"], attrs["block_size"], attrs["N"]
    if producer is None or producer.op_type != "Transpose" or hidden % block or bits not in (4, 8):
        return False
    if len(head.input) > 3 and head.input[3] and _dtype(graph, head.input[3]).kind == "f":
        return False  # float zero points: GatherBlockQuantized takes them in the data type only
    names = Names(graph.graph)
    shape = lambda n, cols: _const(graph, names, f"/model/embed_tokens/{n}_shape", np.array([vocab, cols], np.int64))  # noqa: E731
    sources = [("data", head.input[1], hidden * bits // 8), ("scales", head.input[2], hidden // block)]
    if len(head.input) > 3 and head.input[3]:
        sources.append(("zero_points", head.input[3], -(-(hidden // block) * bits // 8)))
    flat = []
    for what, src, cols in sources:  # MatMulNBits keeps [N, blocks, blob] and 1-D scales/zero points: view as 2-D
        out = names.unique(f"/model/embed_tokens/{what}")
        graph.graph.node.insert(0, helper.make_node("Reshape", [src, shape(what, cols)], [out],
                                                    name=names.unique(f"/model/embed_tokens/Reshape_{what}")))
        flat.append(out)
    quant = helper.make_node("GatherBlockQuantized", [flat[0], gather.input[1], *flat[1:]], list(gather.output),
                             name="/model/embed_tokens/GatherBlockQuantized", domain=MS_DOMAIN, bits=bits,
                             block_size=block, gather_axis=0, quantize_axis=1)
    gather.CopyFrom(quant)
    graph.graph.node.remove(producer)
    remove_unused(graph.graph)
    return True


def _dtype(graph: onnx.ModelProto, name: str) -> np.dtype:
    t = next(t for t in graph.graph.initializer if t.name == name)
    return helper.tensor_dtype_to_np_dtype(t.data_type)


def _const(graph: onnx.ModelProto, names: Names, name: str, value: np.ndarray) -> str:
    tensor = numpy_helper.from_array(value, names.unique(name))
    graph.graph.initializer.append(tensor)
    return tensor.name


def _bias_inputs(graph: onnx.ModelProto, biases: dict[str, np.ndarray]) -> None:
    """Each output bias as its MatMulNBits' own bias input (index 5; the CPU and CUDA kernels add it in place, where a
    separate Add node costs a pass over the output)."""
    names = Names(graph.graph)
    nodes = {n.name: n for n in graph.graph.node}
    for name, bias in biases.items():
        node = nodes[name]
        dtype = _dtype(graph, node.input[2])
        inputs = list(node.input) + [""] * (5 - len(node.input))
        inputs.append(_const(graph, names, f"{name}.bias", np.ascontiguousarray(bias, dtype=dtype).reshape(-1)))
        del node.input[:]
        node.input.extend(inputs)


def write_folder(build: Path, graph: onnx.ModelProto, packed: dict[str, QuantizedWeight],
                 biases: dict[str, np.ndarray], *, accuracy_level: int, provenance: dict, out: Path) -> dict:
    """Write `graph` (the builder's, from `build`, loaded without weights; changed in place) with `packed` (builder
    MatMul -> its weight, parts along N joined by `packed_weight`) and output `biases` as a folder `out`
    onnxruntime-genai loads (model, genai_config.json, tokenizer files); atomic. Returns what changed."""
    src = build / "model.onnx"
    to_matmulnbits(graph, packed, accuracy_level=accuracy_level)
    _bias_inputs(graph, biases)
    config = json.loads((build / "genai_config.json").read_text())
    hidden = config["model"]["decoder"]["hidden_size"]
    embedding = quantized_embedding(graph, hidden) if HEAD in packed else False
    add_provenance(graph, provenance)
    check_folder_output(out)
    with atomic_dir(out, replace=True) as tmp:
        save_model_atomic(graph, tmp / "model.onnx", external_data=True, source=src)
        (tmp / "genai_config.json").write_text(json.dumps(config, indent=4))
        for name in _TOKENIZER_FILES:
            if (build / name).is_file():
                shutil.copyfile(build / name, tmp / name)
        fix_tokenizer(tmp)
    return {"matmulnbits": len(packed), "embedding": "GatherBlockQuantized (shares the LM head's data)" if embedding
            else "float"}


def fix_tokenizer(folder: Path) -> None:
    """Make a byte-level BPE tokenizer readable by onnxruntime-genai's tokenizer: its class named GPT2Tokenizer (the
    builder writes transformers 5's generic class name) and a plain ByteLevel decoder (GGUF conversions chain
    Metaspace-style steps that decode 'Ġ' literally)."""
    tok_path, cfg_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tok_path.is_file():
        return
    tok = json.loads(tok_path.read_text())
    if (tok.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        return
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tok_path.write_text(json.dumps(tok, ensure_ascii=False))
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "GPT2Tokenizer"
        cfg_path.write_text(json.dumps(cfg, indent=2))


def check_folder_output(folder: Path) -> None:
    """Fail before any work if `folder` cannot take a generation-ready model (an earlier one there is replaced)."""
    if folder.exists() and not folder.is_dir():
        raise OnnxqError(f"output {folder} is a file: give a folder for the generation-ready model, or a .onnx path")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "genai_config.json").is_file():
        raise OnnxqError(f"output folder {folder} is not empty and holds no earlier generation-ready model: give a new "
                         "or empty folder")
    parent = existing_parent(folder)
    if not parent.is_dir():
        raise OnnxqError(f"cannot write {folder}: {parent} is not a folder")
