"""Size-budgeted mixed precision end to end: the written file lands on the predicted size, inside the budget, with the
per-layer formats in its metadata and nodes; packed QKV in a folder shares one format."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxq.errors import OnnxqError
from onnxq.graph.metadata import read_provenance
from onnxq.inspect import find_layers
from onnxq.models.export import export_onnx
from onnxq.pipeline import quantize
from onnxq.recipe import QuantRecipe
from onnxq.runtime.evaluate import file_size
from tests.tiny import tiny_llama_hf

WINDOWS = np.random.default_rng(0).integers(2, 258, (8, 48))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNXQ_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield tiny_llama_hf(tmp_path_factory.mktemp("hf"), tied=True, hidden=256, intermediate=768)  # MB-sized: pages <1%


def _sizes(hf, tmp_path, out_name: str) -> tuple[int, int]:
    """Written bytes with every decoder layer at 2-bit g128 and at 8-bit g32 (the budget's reachable range)."""
    sizes = []
    for bits, group in ((2, 128), (8, 32)):
        out = tmp_path / f"{out_name}-{bits}"
        quantize(str(hf) if "." not in out_name else str(export_onnx(hf)), QuantRecipe(algo="gptq", bits=bits, group_size=group),
                 out.with_suffix(".onnx") if "." in out_name else out, windows=WINDOWS, progress=False)
        sizes.append(file_size(out.with_suffix(".onnx") if "." in out_name else out / "model.onnx"))
    return sizes[0], sizes[1]


@pytest.mark.parametrize("kind", ["file.onnx", "folder"])
def test_budget_is_met_and_predicted(hf, tmp_path, kind):
    small, large = _sizes(hf, tmp_path, kind)
    budget = (small + 0.4 * (large - small)) / 1e6
    out = tmp_path / ("mixed.onnx" if kind == "file.onnx" else "mixed")
    source = str(export_onnx(hf)) if kind == "file.onnx" else str(hf)
    rep = quantize(source, QuantRecipe(algo="gptq", bits=2, size_mb=budget), out, windows=WINDOWS, progress=False)
    path = out if kind == "file.onnx" else out / "model.onnx"
    written = file_size(path)
    assert written <= budget * 1e6 * 1.01
    assert abs(written - rep.allocation["predicted_mb"] * 1e6) <= 0.01 * written
    assert len(rep.allocation["formats"]) > 1  # between the extremes, the choice is mixed
    formats = read_provenance(onnx.load(str(path), load_external_data=False))["layer_formats"]
    nodes = {l.name: (l.bits, l.block_size) for l in find_layers(onnx.load(str(path), load_external_data=False))}
    assert len({tuple(f) for f in formats.values()}) > 1
    if kind == "folder":  # q, k and v live in one MatMulNBits: they got one format
        for block in range(2):
            qkv = {tuple(v) for k, v in formats.items() if f"layers.{block}/" in k and any(r in k for r in ("q_proj", "k_proj", "v_proj"))}
            assert len(qkv) == 1
    else:
        for node, (bits, group) in formats.items():
            assert nodes[node][0] == (4 if bits == 3 else bits)


def test_bits_per_weight_budget(hf, tmp_path):
    rep = quantize(str(export_onnx(hf)), QuantRecipe(algo="gptq", bits=2, bpw=3.0), tmp_path / "q.onnx", windows=WINDOWS,
                   progress=False)
    formats = rep.allocation["formats"]
    assert rep.allocation["bpw"] == 3.0 and formats
    assert any(f.startswith("w2") for f in formats)  # 3 bits per weight cannot all be 4-bit
    rep = quantize(str(export_onnx(hf)), QuantRecipe(algo="gptq", bpw=6.0), tmp_path / "q4.onnx", windows=WINDOWS,
                   progress=False)
    assert rep.allocation["formats"] and not any(f.startswith("w2") for f in rep.allocation["formats"])  # --bits 4: the floor


def test_too_small_budget_is_one_line(hf, tmp_path):
    with pytest.raises(OnnxqError, match="raise the budget"):
        quantize(str(export_onnx(hf)), QuantRecipe(algo="gptq", size_mb=0.001), tmp_path / "q.onnx", windows=WINDOWS,
                 progress=False)
    assert not (tmp_path / "q.onnx").exists()


def test_budget_needs_calibrated_matmulnbits():
    with pytest.raises(OnnxqError, match="size budget"):
        QuantRecipe(algo="gptq", size_mb=10, format="qdq").validate()
    with pytest.raises(OnnxqError, match="one of them"):
        QuantRecipe(algo="gptq", size_mb=10, bpw=3).validate()
