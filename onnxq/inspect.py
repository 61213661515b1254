"""`onnxq inspect`: what a model holds: ops, linear layers by format, decoder blocks, provenance."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .analysis import block_index, linear_layers


def inspect_model(path: str | Path) -> dict:
    """A JSON-ready summary of the model at `path` (weight data is not loaded)."""
    from .io import load_model
    from .passes.metadata import read_provenance

    model = load_model(path, load_weights=False)
    ops = Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node)
    blocks = sorted({b for n in model.graph.node if (b := block_index(n.name)) is not None})
    quantized = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    return {
        "path": str(path),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ops": dict(sorted(ops.items())),
        "float_linear_layers": len(linear_layers(model)),
        "matmulnbits_layers": len(quantized),
        "dequantize_linear_nodes": len(dq),
        "decoder_blocks": len(blocks),
        "provenance": read_provenance(model),
    }


def render(info: dict, console: Console) -> None:
    """Print the summary as rich tables."""
    t = Table(title=Path(info["path"]).name, show_header=False)
    for k in ("ir_version", "opsets", "decoder_blocks", "float_linear_layers", "matmulnbits_layers", "dequantize_linear_nodes"):
        t.add_row(k, str(info[k]))
    console.print(t)
    ops = Table("op", "count", title="ops")
    for k, v in info["ops"].items():
        ops.add_row(k, str(v))
    console.print(ops)
    if info["provenance"]:
        p = Table("key", "value", title="provenance")
        for k, v in info["provenance"].items():
            p.add_row(k, str(v))
        console.print(p)
