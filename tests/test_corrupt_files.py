"""Every CLI argument that takes a file fails on a corrupt one with exit 2 and a single `error:` line: eval's FLOAT and
QUANT (perplexity and edge-only paths), inspect's MODEL and --diff, quantize's MODEL, --calib, --text and --report.
(tests/test_reliability.py covers quantize on truncated, empty and external-data-broken models; tests/test_pipeline.py
quantize on non-ONNX text and an empty --calib; inspect reports missing external data by design: test_inspect.py.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from onnxq.cli import app
from onnxq.graph.io import save_model_atomic
from tests.tiny import CALIB, matmul_model, save, small

runner = CliRunner()
SHORT = ["--tokens", "32", "--seq-len", "16"]


def one_line_error(args: list) -> str:
    """Run the CLI; expect exit 2 and an output of exactly one `error:` line; return that line."""
    res = runner.invoke(app, [str(a) for a in args])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def _external(folder: Path) -> Path:
    """A valid model with its weights in model.onnx.data."""
    return save_model_atomic(matmul_model(), folder / "model.onnx", external_data=True)


def _random_bytes(folder: Path) -> Path:
    (folder / "model.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    return folder / "model.onnx"


def _truncated(folder: Path) -> Path:
    (folder / "model.onnx").write_bytes(matmul_model().SerializeToString()[:5000])
    return folder / "model.onnx"


def _empty(folder: Path) -> Path:
    (folder / "model.onnx").write_bytes(b"")
    return folder / "model.onnx"


def _folder(folder: Path) -> Path:
    (folder / "model.onnx").mkdir()
    return folder / "model.onnx"


def _missing_data(folder: Path) -> Path:
    path = _external(folder)
    (folder / "model.onnx.data").unlink()
    return path


def _truncated_data(folder: Path) -> Path:
    path = _external(folder)
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    return path


UNREADABLE = {"random bytes": (_random_bytes, "not a readable ONNX model"), "truncated": (_truncated, "truncated"),
              "empty": (_empty, "not an ONNX model"), "folder": (_folder, "")}
BROKEN_DATA = {"missing data": (_missing_data, "is missing"), "truncated data": (_truncated_data, "is truncated")}
MODEL_ARGS = {
    "eval FLOAT": lambda bad, good, text: ["eval", bad, "--text", text, *SHORT],
    "eval QUANT": lambda bad, good, text: ["eval", good, bad, "--text", text, *SHORT],
    "eval FLOAT --ep web-wasm": lambda bad, good, text: ["eval", bad, "--ep", "web-wasm", "--text", text],
    "inspect MODEL": lambda bad, good, text: ["inspect", bad],
    "inspect --diff": lambda bad, good, text: ["inspect", good, "--diff", bad],
    "quantize MODEL": lambda bad, good, text: ["quantize", bad, "-o", bad.parent / "out" / "q.onnx", "--calib", text,
                                               *CALIB],
}
MODEL_CASES = ([(arg, kind) for arg in MODEL_ARGS if not arg.startswith("quantize") for kind in UNREADABLE]
               + [(arg, kind) for arg in MODEL_ARGS if arg.startswith("eval") for kind in BROKEN_DATA]
               + [("quantize MODEL", kind) for kind in ("random bytes", "folder")])


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save(small(), tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


@pytest.mark.parametrize("arg,kind", MODEL_CASES)
def test_corrupt_model(tmp_path, good, text, arg, kind):
    make, needle = {**UNREADABLE, **BROKEN_DATA}[kind]
    bad = make(tmp_path)
    line = one_line_error(MODEL_ARGS[arg](bad, good, text))
    assert needle in line and bad.name in line, line
    assert not (tmp_path / "out").exists()


def _empty_text(folder: Path) -> Path:
    (folder / "text.txt").write_text("")
    return folder / "text.txt"


def _empty_text_folder(folder: Path) -> Path:
    (folder / "texts").mkdir()
    return folder / "texts"


def _not_utf8(folder: Path) -> Path:
    (folder / "text.txt").write_bytes(np.random.default_rng(0).bytes(2000))
    return folder / "text.txt"


TEXT_CASES = [
    ("--text", _empty_text), ("--text", _empty_text_folder), ("--calib", _empty_text_folder),
    ("--text", _not_utf8), ("--calib", _not_utf8),
]


@pytest.mark.parametrize("option,make", TEXT_CASES)
def test_bad_text(tmp_path, good, option, make):
    bad = make(tmp_path)
    out = tmp_path / "q.onnx"
    args = ["eval", good, "--text", bad, *SHORT] if option == "--text" else [
        "quantize", good, "-o", out, "--calib", bad, *CALIB]
    assert bad.name in one_line_error(args)
    assert not out.exists()


@pytest.mark.parametrize("where", ["stem.json is a folder", "parent is a file"])
def test_bad_report_path(tmp_path, good, text, where):
    (tmp_path / "r.json").mkdir()
    (tmp_path / "file").write_text("")
    stem = tmp_path / "r" if where == "stem.json is a folder" else tmp_path / "file" / "r"
    line = one_line_error(["eval", good, "--text", text, *SHORT, "--report", stem])
    assert ("is a folder" if where == "stem.json is a folder" else "is not a folder") in line, line
