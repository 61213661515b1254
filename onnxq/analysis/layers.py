"""Graph analysis: linear layers, decoder blocks and the partition of a graph into stem, blocks and head."""
from __future__ import annotations

import re
from dataclasses import dataclass

import onnx

from ..errors import OnnxqError

ROTATION_TAG = "onnxq_rotation"  # in the names of --rotate's online rotation nodes and weights (float, never quantized)
_BLOCK_RE = re.compile(r"(?:^|[/._])(?:layers|layer|h|blocks|block|decoder_layers)[./_](\d+)(?=[/._]|$)")
_ROLE_RE = re.compile(
    r"(q_proj|k_proj|v_proj|o_proj|qkv_proj|c_attn|c_proj|c_fc|gate_proj|up_proj|down_proj|gate_up_proj|"
    r"query|key|value|attention/output/dense|intermediate/dense|output/dense|dense_h_to_4h|dense_4h_to_h|"
    r"fc1|fc2|out_proj|lm_head|dense)"
)


@dataclass
class LinearLayer:
    """A MatMul with a constant weight initializer W[K, N] (K = d_in, N = d_out)."""

    node: str
    weight: str
    input: str
    k: int
    n: int
    block: int | None
    role: str


@dataclass
class Partition:
    """Nodes of the graph split into a stem, ordered decoder blocks and a head (by node index)."""

    stem: list[int]
    blocks: list[list[int]]
    head: list[int]


def block_index(name: str) -> int | None:
    """Decoder block number encoded in a node name by exporters (`/model/layers.3/...`), else None."""
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def layer_role(name: str) -> str:
    """A short role from the node name (q_proj, up_proj, lm_head, ..., 'rotation' for --rotate's) or 'linear'."""
    if ROTATION_TAG in name:
        return "rotation"
    m = _ROLE_RE.search(name)
    return m.group(1).replace("/", ".") if m else "linear"


def initializer_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Initializer name -> dims (no weight data is read)."""
    return {t.name: list(t.dims) for t in model.graph.initializer}


def linear_layers(model: onnx.ModelProto) -> list[LinearLayer]:
    """Every MatMul whose second input is a 2-D initializer, in graph order."""
    shapes = initializer_shapes(model)
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or not node.output:
            continue
        dims = shapes.get(node.input[1])
        if dims is None or len(dims) != 2:
            continue
        name = node.name or node.output[0]
        role = "lm_head" if _is_head_projection(model, node) else layer_role(name)
        out.append(LinearLayer(name, node.input[1], node.input[0], dims[0], dims[1], block_index(name), role))
    return out


def _is_head_projection(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """The MatMul producing a graph output (logits) is the LM head."""
    outputs = {o.name for o in model.graph.output}
    return node.output[0] in outputs or "lm_head" in (node.name or "")


def partition(model: onnx.ModelProto) -> Partition:
    """Split nodes into stem (before block 0), blocks and head, from exporter names and data dependencies.

    Unnamed nodes that depend on block i and feed a later block run with block i; the rest after the
    last block form the head, as does a final norm named like a block (see `block_numbers`).
    Raises OnnxqError when no decoder blocks are found.
    """
    nodes = list(model.graph.node)
    numbers = block_numbers(model)
    if not numbers:
        raise OnnxqError(
            "no decoder blocks found (node names carry no 'layers.N' / 'h.N'): export the model with optimum or "
            "torch.onnx so node names keep module paths"
        )
    tags = [t if t is not None and t <= numbers[-1] else None for t in (block_index(n.name) for n in nodes)]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    # dependency level: highest block among ancestors (or own tag)
    level = [-1] * len(nodes)
    for i, n in enumerate(nodes):
        lv = -1
        for t in n.input:
            p = producer.get(t)
            if p is not None:
                lv = max(lv, level[p])
        level[i] = tags[i] if tags[i] is not None else lv
        if tags[i] is not None and lv > tags[i]:
            raise OnnxqError(f"node {n.name!r} of block {tags[i]} depends on block {lv}: blocks are not sequential")
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            consumers.setdefault(t, []).append(i)
    # latest block any descendant belongs to (reverse pass) decides stem/head for untagged nodes
    feeds_block = [-1] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        best = tags[i] if tags[i] is not None else -1
        for o in nodes[i].output:
            for c in consumers.get(o, []):
                best = max(best, feeds_block[c])
        feeds_block[i] = best
    n_blocks = max(t for t in tags if t is not None) + 1
    stem, head = [], []
    blocks: list[list[int]] = [[] for _ in range(n_blocks)]
    for i in range(len(nodes)):
        if tags[i] is not None:
            b = tags[i]
        elif level[i] < 0 and feeds_block[i] >= 0:
            stem.append(i)
            continue
        elif level[i] >= 0 and feeds_block[i] > level[i]:
            b = level[i]
        elif nodes[i].op_type == "Constant" and feeds_block[i] >= 0:
            stem.append(i)
            continue
        else:
            head.append(i)
            continue
        blocks[b].append(i)
    if any(not b for b in blocks):
        missing = [i for i, b in enumerate(blocks) if not b]
        raise OnnxqError(f"decoder block numbering has gaps (blocks {missing} empty): check the export's node names")
    return Partition(stem, blocks, head)


def block_numbers(model: onnx.ModelProto) -> list[int]:
    """Sorted decoder block numbers from node names, less a last number whose nodes do no matrix work (linear layer,
    quantized or not, or fused attention): onnxruntime-genai's builder names its final norm `layers.{N}`."""
    work: dict[int, bool] = {}
    for n in model.graph.node:
        b = block_index(n.name)
        if b is not None:
            work[b] = work.get(b, False) or any(s in n.op_type for s in ("MatMul", "Gemm", "Attention"))
    numbers = sorted(work)
    if len(numbers) > 1 and not work[numbers[-1]]:
        numbers.pop()
    return numbers
