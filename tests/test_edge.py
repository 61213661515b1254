"""Edge execution providers: a quantized tiny Llama runs in headless Chromium (onnxruntime-web WASM, and WebGPU where
Chromium offers an adapter) and on OpenVINO, its logits match the CPU EP, and the placement record says where every
quantized node ran. Browser and OpenVINO tests skip with the reason when those are missing; in CI (CI set) they fail
instead, because scripts/setup.sh installs them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxq import OnnxqError, QuantRecipe
from onnxq.cli import app
from onnxq.pipeline import quantize
from onnxq.runtime import edge
from onnxq.runtime.session import make_session, model_feeds
from tests.tiny import tiny_llama_onnx, write_byte_tokenizer

IN_CI = bool(os.environ.get("CI"))
PROMPT = np.random.default_rng(7).integers(0, 256, size=(1, 16))


def _require(available: tuple[bool, str]) -> None:
    ok, why = available
    if not ok:
        if IN_CI:
            pytest.fail(f"CI must provide this (scripts/setup.sh): {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """float, and RTN W4 g32 as MatMulNBits (accuracy_level 0 and 4), W4 g32 QDQ, W8 g32 MatMulNBits."""
    root = tmp_path_factory.mktemp("edge")
    float_path = tiny_llama_onnx(root, layers=2, hidden=64, heads=4, kv_heads=2)
    write_byte_tokenizer(float_path.parent)
    windows = np.random.default_rng(0).integers(0, 256, size=(8, 32)).astype(np.int64)
    out = {"float": float_path}
    for name, recipe in {
        "nbits4": QuantRecipe(algo="rtn", bits=4, group_size=32, accuracy_level=0),
        "nbits4_int8": QuantRecipe(algo="rtn", bits=4, group_size=32, accuracy_level=4),
        "qdq4": QuantRecipe(algo="rtn", bits=4, group_size=32, format="qdq"),
        "nbits8": QuantRecipe(algo="rtn", bits=8, group_size=32, accuracy_level=0),
    }.items():
        out[name] = root / f"{name}.onnx"
        quantize(float_path, recipe, out[name], windows=windows, progress=False)
    return out


def _cpu_logits(path: Path) -> np.ndarray:
    session = make_session(path)
    return session.run(["logits"], model_feeds(session, PROMPT))[0]


# --------------------------------------------------------------------------------------------- no runtime needed
def test_quantized_nodes(models):
    nbits = edge.quantized_nodes(models["nbits4"])
    assert len(nbits) == 14 and all(v == [k] for k, v in nbits.items())
    qdq = edge.quantized_nodes(models["qdq4"])
    assert len(qdq) == 14
    assert all(len(v) == 2 and v[0].endswith("DequantizeLinear") and v[1] == k for k, v in qdq.items())
    assert edge.quantized_nodes(models["float"]) == {}


def test_parse_placement():
    tag = "2026-11-23 13:24:33 [V:onnxruntime:, session_state.cc:1383 VerifyEachNodeIsAssignedToAnEp]"
    split = [f"{tag} Node placements", f"{tag}  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 1",
             f"{tag}   DequantizeLinear (/a/DequantizeLinear)",
             f"{tag}  Node(s) placed on [JsExecutionProvider]. Number of nodes: 2",
             f"{tag}   MatMul (/a/MatMul)", f"{tag}   MatMulNBits (/b/MatMul)", "unrelated line"]
    assert edge.parse_placement(split, []) == {"/a/DequantizeLinear": "CPUExecutionProvider",
                                                "/a/MatMul": "JsExecutionProvider", "/b/MatMul": "JsExecutionProvider"}
    whole = [f"{tag}  All nodes placed on [CPUExecutionProvider]. Number of nodes: 262"]
    assert edge.parse_placement(whole, ["x", "y"]) == {"x": "CPUExecutionProvider", "y": "CPUExecutionProvider"}
    assert edge.parse_placement([], ["x"]) == {}


def test_compare_has_teeth():
    ref = np.random.default_rng(0).standard_normal((1, 8, 256)).astype(np.float32)
    assert edge.compare(ref, ref.copy())["ok"]
    assert edge.compare(ref, ref * np.float32(1 + 2e-5))["ok"]  # summation-order sized
    bad = edge.compare(ref, ref * np.float32(1 + 1e-3))
    assert not bad["ok"] and bad["rel_l2"] == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(OnnxqError, match="logits shapes differ"):
        edge.compare(ref, ref[:, :4])


def test_unknown_edge_ep(models):
    with pytest.raises(OnnxqError, match="unknown edge execution provider 'tpu'"):
        edge.run_on(models["nbits4"], "tpu", PROMPT)


# ------------------------------------------------------------------------------------------------------ CPU EP
def test_cpu_edge_eval_places_every_quantized_node(models):
    rep = edge.edge_eval(models["nbits4"], "cpu", PROMPT, runs=2, warmup=1)
    assert rep.ok and rep.placement == {"provider": "CPUExecutionProvider", "layers": 14, "on_ep": 14,
                                        "fallback": [], "unknown": [], "all_on_ep": True}
    assert rep.match["rel_l2"] == 0 and rep.cpu_int8 is None
    assert rep.run.prefill_ms > 0 and rep.run.token_ms > 0
    np.testing.assert_array_equal(rep.run.logits, _cpu_logits(models["nbits4"]))


def test_int8_activations_get_an_fp32_reference(models):
    """accuracy_level=4 makes the CPU EP quantize activations to int8; the reference is a level-0 copy."""
    before = set(models["nbits4_int8"].parent.iterdir())
    rep = edge.edge_eval(models["nbits4_int8"], "cpu", PROMPT, runs=0, warmup=0)
    assert set(models["nbits4_int8"].parent.iterdir()) == before  # the copy is removed
    assert rep.cpu_int8 is not None and rep.cpu_int8["rel_l2"] > 1e-4, rep.cpu_int8
    assert rep.cpu_int8["why"] == "14 MatMulNBits at accuracy_level=4"
    # the level-0 copy computes what the accuracy_level=0 model computes
    exact = edge.edge_eval(models["nbits4"], "cpu", PROMPT, runs=0, warmup=0)
    got = edge.compare(exact.run.logits, rep.run.logits)
    assert got["rel_l2"] == pytest.approx(rep.cpu_int8["rel_l2"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------- browser
def test_web_wasm_matches_cpu(models):
    _require(edge.web_available())
    rep = edge.edge_eval(models["nbits4"], "web-wasm", PROMPT, runs=2, warmup=1)
    assert rep.run.runtime.startswith("onnxruntime-web") and "(wasm)" in rep.run.runtime
    assert rep.match["ok"] and rep.match["rel_l2"] <= edge.TOL_FP32, rep.markdown()
    assert rep.match["top1_agreement"] == 1.0
    assert rep.placement["all_on_ep"] and rep.placement["on_ep"] == 14, rep.markdown()
    assert rep.run.prefill_ms > 0 and rep.run.token_ms > 0
    # the page really ran this model: the float model's logits are far outside the tolerance
    assert not edge.compare(_cpu_logits(models["float"]), rep.run.logits)["ok"]


def test_web_wasm_external_data(models, tmp_path):
    """Weights in a separate .onnx.data file (what models over 2 GB need) are fetched by the page."""
    _require(edge.web_available())
    proto = onnx.load(str(models["nbits4"]))
    path = tmp_path / "ext.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert edge.external_data_files(path) == ["ext.onnx.data"]
    run = edge.run_on(path, "web-wasm", PROMPT, runs=0, warmup=0)
    assert edge.compare(_cpu_logits(models["nbits4"]), run.logits)["ok"]


def _webgpu_or_skip() -> None:
    _require(edge.web_available())
    probe = edge.webgpu_probe()
    if not probe["swiftshader"].get("available"):  # a GPU matter, not an install step: skip even in CI
        pytest.skip(f"no WebGPU adapter in headless Chromium: {probe['swiftshader'].get('reason')}")


def test_web_webgpu(models):
    """JSEP (JsExecutionProvider) on Chromium's SwiftShader adapter: 4-bit MatMulNBits runs there; 4-bit QDQ leaves
    DequantizeLinear on the CPU EP (reported as fallback); 8-bit MatMulNBits is refused at session creation."""
    _webgpu_or_skip()
    rep = edge.edge_eval(models["nbits4"], "web-webgpu", PROMPT, runs=1, warmup=0)
    assert rep.ok and rep.placement["on_ep"] == 14 and rep.match["rel_l2"] <= edge.TOL_WEBGPU, rep.markdown()
    qdq = edge.edge_eval(models["qdq4"], "web-webgpu", PROMPT, runs=0, warmup=0)
    assert qdq.match["ok"] and not qdq.placement["all_on_ep"] and not qdq.ok
    assert len(qdq.placement["fallback"]) == 14 and "(CPUExecutionProvider)" in qdq.placement["fallback"][0]
    with pytest.raises(OnnxqError, match="Only 2b and 4b"):
        edge.run_on(models["nbits8"], "web-webgpu", PROMPT, runs=0, warmup=0)


def test_web_webgpu_zero_point_layout(tmp_path):
    """K = 96 with group 16 gives 6 blocks, 3 zero-point bytes a row: the layout SmolLM2 (K = 576) hits too."""
    _webgpu_or_skip()
    path = tiny_llama_onnx(tmp_path, layers=1, hidden=96, heads=4, kv_heads=2, intermediate=192)
    out = tmp_path / "q.onnx"
    windows = np.random.default_rng(0).integers(0, 256, size=(4, 32)).astype(np.int64)
    quantize(path, QuantRecipe(algo="rtn", bits=4, group_size=16, accuracy_level=0), out, windows=windows,
             progress=False)
    assert edge.edge_eval(out, "web-webgpu", PROMPT, runs=0, warmup=0).ok


def test_webgpu_probe_reports_disable_gpu():
    _require(edge.web_available())
    probe = edge.webgpu_probe()
    assert not probe["disable-gpu"]["available"] and probe["disable-gpu"]["reason"]


# --------------------------------------------------------------------------------------------------- OpenVINO
def test_openvino_matches_cpu(models):
    _require(edge.openvino_available())
    rep = edge.edge_eval(models["nbits4"], "openvino", PROMPT, runs=1, warmup=0)
    assert rep.run.runtime.startswith("onnxruntime-openvino"), rep.run.runtime
    assert rep.ok and rep.match["rel_l2"] <= edge.TOL_FP32 and rep.placement["on_ep"] == 14, rep.markdown()


# -------------------------------------------------------------------------------------------------------- CLI
runner = CliRunner()


def test_eval_cli_web_wasm(models, tmp_path):
    _require(edge.web_available())
    res = runner.invoke(app, ["eval", str(models["float"]), str(models["nbits4"]), "--ep", "web-wasm",
                              "--prompt-tokens", "16", "--runs", "1", "--report", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "-> match" in res.output and "14/14 quantized nodes on CPUExecutionProvider" in res.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["ok"] and saved["ep"] == "web-wasm" and saved["prompt_tokens"] == 16
    assert "logits" not in saved["run"]


def test_eval_cli_edge_flag_and_bad_ep(models):
    """An unknown EP is one line naming the edge EPs, exit 2; --edge adds the edge check to perplexity on the CPU."""
    res = runner.invoke(app, ["eval", str(models["float"]), str(models["nbits4"]), "--ep", "web-gpu"])
    assert res.exit_code == 2 and "web-wasm" in res.output, res.output
    ok = runner.invoke(app, ["eval", str(models["float"]), str(models["nbits4"]), "--tokens", "64", "--seq-len", "32",
                             "--edge", "--prompt-tokens", "8", "--runs", "1"])
    assert ok.exit_code == 0 and "Edge check" in ok.output and "Perplexity" in ok.output, ok.output
