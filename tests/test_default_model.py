"""The default model end to end (slow: exports SmolLM2 once into the cache): quantize, inspect, perplexity."""
from __future__ import annotations

import math

import pytest

from onnxq import QuantRecipe
from onnxq.inspect import inspect_model
from onnxq.models.export import export_onnx, load_tokenizer
from onnxq.pipeline import quantize
from onnxq.runtime.evaluate import perplexity
from onnxq.calibrate.textdata import load_text, token_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rtn_w4(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "rtn-w4g128.onnx"
    quantize("smollm2", QuantRecipe(algo="rtn", bits=4, group_size=128), out, progress=False)
    return out


def test_inspect_before_and_after(rtn_w4):
    """30-block attention map on both; per-layer bytes and bits per weight equal the hand-computed MatMulNBits sizes."""
    for info in (inspect_model(export_onnx("smollm2")), inspect_model(rtn_w4)):
        assert info["blocks"]["count"] == 30
        assert {(a["n_heads"], a["n_kv_heads"], a["head_dim"], a["causal"], a["rope"]) for a in info["blocks"]["attention"]} == {(9, 3, 64, True, "rotate_half")}
    layers = [l for l in inspect_model(rtn_w4)["layers"] if l["format"] == "MatMulNBits"]
    assert len(layers) == 210
    for l in layers:
        blocks = math.ceil(l["k"] / 128)
        per_row = blocks * 64 + blocks * 4 + math.ceil(blocks * 4 / 8)  # uint4 codes, fp32 scales, packed uint4 zero points
        assert l["bytes"] == l["n"] * per_row, l
        assert l["bpw"] == pytest.approx(per_row * 8 / l["k"], abs=1e-6)


def test_data_free_rtn_matches_ort_rtn(rtn_w4):
    """onnxq's min-max RTN W4 g128 asym reproduces ONNX Runtime's own RTN perplexity on the eval protocol (29.83)."""
    windows = token_windows(load_tokenizer(export_onnx("smollm2")), load_text("sotu-eval"), 512, 8)
    assert perplexity(rtn_w4, windows) == pytest.approx(29.835, abs=0.01)
