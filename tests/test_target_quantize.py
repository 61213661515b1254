"""`quantize --target`: the format, group and accuracy_level come from onnxq/targets.py, what the target cannot run
is refused with one line, and what is chosen runs on that target's execution provider."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxq import OnnxqError, QuantRecipe
from onnxq.cli import app
from onnxq.graph.metadata import read_provenance
from onnxq.pipeline import quantize
from onnxq.runtime import edge
from onnxq.formats.targets import choose, support
from tests.tiny import tiny_llama_onnx, write_byte_tokenizer

runner = CliRunner()
IN_CI = bool(__import__("os").environ.get("CI"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """The tiny Llama (2 layers, hidden 64) with a byte tokenizer beside it, so the CLI can calibrate it."""
    path = tiny_llama_onnx(tmp_path_factory.mktemp("llama"), layers=2, hidden=64, heads=4, kv_heads=2)
    write_byte_tokenizer(path.parent)
    return path


def _windows() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(8, 32)).astype(np.int64)


def _nbits_attrs(path: Path) -> set[tuple]:
    """{(bits, block_size, accuracy_level)} over the MatMulNBits nodes."""
    graph = onnx.load(str(path)).graph
    return {(a["bits"], a["block_size"], a.get("accuracy_level", 0)) for a in (
        {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute} for n in graph.node
        if n.op_type == "MatMulNBits")}


# ------------------------------------------------------------------------------------------ recipe validation
@pytest.mark.parametrize("kwargs,needle", [
    ({"target": "web", "bits": 8}, "web: no 8-bit MatMulNBits kernel"),
    ({"target": "cuda", "bits": 2}, "cuda: no 2-bit MatMulNBits kernel"),
    ({"target": "qnn", "group_size": 128}, "block_size 128 is not accepted"),
    ({"target": "tensorrt"}, "tensorrt: no 4-bit MatMulNBits kernel"),
    ({"target": "openvino", "bits": 8}, "openvino: no 8-bit MatMulNBits kernel"),
    ({"target": "qnn", "format": "qdq", "bits": 4}, "blocked DequantizeLinear -> MatMul falls back to CPU"),
    ({"target": "toaster"}, "unknown target 'toaster'"),
])
def test_recipe_refuses_what_the_target_cannot_run(kwargs, needle):
    with pytest.raises(OnnxqError) as err:
        QuantRecipe(**kwargs).validate()
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("target", ["cpu", "cuda", "web", "webgpu", "openvino", "dml", "qnn", "webnn", "tensorrt"])
def test_each_targets_own_choice_validates(target):
    t = support(target)
    fmt, level = choose(target, 4)
    recipe = QuantRecipe(bits=4, format=fmt, group_size=t.block_size, accuracy_level=level, target=target).validate()
    assert recipe.to_dict()["target"] == target


def test_no_target_keeps_old_behaviour():
    assert QuantRecipe().validate().target is None
    QuantRecipe(bits=8, group_size=128).validate()  # nothing to check without a target


# ------------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("args,needle", [
    (["--target", "web", "--bits", "8"], "web (JsExecutionProvider) cannot run 8-bit weights: use bits in [4]"),
    (["--target", "cuda", "--bits", "2"], "cuda (CUDAExecutionProvider) cannot run 2-bit weights"),
    (["--target", "qnn", "--group", "128"], "target qnn: MatMulNBits block_size 128 is not accepted (use 32/64)"),
    (["--target", "tensorrt", "--format", "nbits"], "target tensorrt: no 4-bit MatMulNBits kernel"),
    (["--target", "nope"], "unknown target 'nope'"),
])
def test_cli_refuses_with_one_line(llama, tmp_path, args, needle):
    out = tmp_path / "q.onnx"
    res = runner.invoke(app, ["quantize", str(llama), "-o", str(out), "--algo", "rtn", *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in " ".join(res.output.split()), res.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_target_picks_format_group_and_level(llama, tmp_path):
    out = tmp_path / "web.onnx"
    res = runner.invoke(app, ["quantize", str(llama), "-o", str(out), "--algo", "rtn", "--calib-windows", "2",
                              "--calib-seq-len", "32", "--target", "web"])
    assert res.exit_code == 0, res.output
    assert "target web: nbits, 4-bit, group 32, accuracy_level 0" in res.output
    assert _nbits_attrs(out) == {(4, 32, 0)}
    assert read_provenance(onnx.load(str(out), load_external_data=False))["group_size"] == 32


def test_cli_explicit_options_win_over_the_target(llama, tmp_path):
    out = tmp_path / "cpu.onnx"
    res = runner.invoke(app, ["quantize", str(llama), "-o", str(out), "--algo", "rtn", "--calib-windows", "2",
                              "--calib-seq-len", "32", "--target", "cpu", "--group", "64", "--accuracy-level", "1"])
    assert res.exit_code == 0, res.output
    assert _nbits_attrs(out) == {(4, 64, 1)}


def test_cli_openvino_8bit_goes_qdq(llama, tmp_path):
    """The table runs 8-bit on OpenVINO as DequantizeLinear -> MatMul only, so --target openvino --bits 8 writes QDQ."""
    out = tmp_path / "ov8.onnx"
    res = runner.invoke(app, ["quantize", str(llama), "-o", str(out), "--algo", "rtn", "--calib-windows", "2",
                              "--calib-seq-len", "32", "--target", "openvino", "--bits", "8"])
    assert res.exit_code == 0, res.output
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "DequantizeLinear" in ops and "MatMulNBits" not in ops


# --------------------------------------------------------------------------------- chosen format runs there
def _target_model(llama: Path, tmp_path: Path, target: str) -> Path:
    t = support(target)
    fmt, level = choose(target, 4)
    recipe = QuantRecipe(algo="rtn", bits=4, format=fmt, group_size=t.block_size, accuracy_level=level, target=target)
    out = tmp_path / f"{target}.onnx"
    quantize(llama, recipe, out, windows=_windows(), progress=False)
    return out


def _require(available: tuple[bool, str]) -> None:
    ok, why = available
    if not ok:
        if IN_CI:  # scripts/setup.sh installs these; in CI a missing piece is a failure, not a skip
            pytest.fail(f"CI must provide this: {why}")
        pytest.skip(why)


@pytest.mark.parametrize("target,ep", [("cpu", "cpu"), ("web", "web-wasm"), ("openvino", "openvino")])
def test_chosen_format_runs_on_the_target(llama, tmp_path, target, ep):
    if ep.startswith("web-"):
        _require(edge.web_available())
    if ep == "openvino":
        _require(edge.openvino_available())
    model = _target_model(llama, tmp_path, target)
    ids = np.random.default_rng(3).integers(0, 256, size=(1, 12))
    rep = edge.edge_eval(model, ep, ids, runs=1, warmup=0)
    assert rep.placement["layers"] == 14 and rep.placement["all_on_ep"], rep.markdown()
    assert rep.match["ok"], rep.markdown()


def test_byte_tokenizer_roundtrip(llama):
    from onnxq.models.export import load_tokenizer

    tok = load_tokenizer(llama)
    assert tok("Hi é", add_special_tokens=False)["input_ids"] == [72, 105, 32, 195, 169]
