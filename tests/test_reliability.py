"""Bad input fails with one line, exit status 2 and no output; ragged groups, singular Hessians, interrupts,
lazily loaded external weights and byte-identical reruns. (tests/test_pipeline.py::test_cli_bad_input covers a
missing file, non-ONNX bytes, an unknown model name, --bits 5, --group 100 and an empty calibration text.)"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from typer.testing import CliRunner

import onnxq.solve.dispatch
import onnxq.solve.loop
from onnxq import OnnxqError, QuantRecipe
from onnxq.cli import app
from onnxq.pipeline import quantize
from onnxq.solvers import QuantSpec, factor, solve_gptq
from tests.tiny import CALIB, decoder_model, save, small, windows, write_byte_tokenizer

VOCAB = 256
runner = CliRunner()


def with_weight(model: onnx.ModelProto, name: str, edit) -> onnx.ModelProto:
    """`model` with initializer `name` replaced by edit(its array)."""
    for t in model.graph.initializer:
        if t.name == name:
            a = numpy_helper.to_array(t).copy()
            edit(a)
            t.CopyFrom(numpy_helper.from_array(a, name))
            return model
    raise KeyError(name)


def leftovers(*folders: Path) -> list[str]:
    """Temp or partial files a failed run may have left in `folders`."""
    return [p.name for f in folders if f.is_dir() for p in f.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def cli_error(args: list[str], needle: str, *watch: Path) -> str:
    """Run the CLI, expect exit 2 and exactly one `error:` line containing `needle`; return that line."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    assert needle.lower() in errors[0].lower(), errors[0]
    assert not leftovers(*watch), leftovers(*watch)
    return errors[0]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save(small(), tmp_path_factory.mktemp("good"))


# ---- bad input: one line, exit 2, nothing written ----------------------------------------------------------------


def _truncated(folder: Path, good: Path) -> Path:
    data = good.read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    return folder / "model.onnx"


def _empty(folder: Path, good: Path) -> Path:
    (folder / "model.onnx").write_bytes(b"")
    return folder / "model.onnx"


def _missing_data(folder: Path, good: Path) -> Path:
    path = save(small(), folder, external=True)
    (folder / "model.onnx.data").unlink()
    return path


def _truncated_data(folder: Path, good: Path) -> Path:
    path = save(small(), folder, external=True)
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-1000])
    return path


def _no_matmul(folder: Path, good: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed", "input_ids"], ["logits"], name="/model/layers.0/Gather")], "g",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", "t", 8])],
        [numpy_helper.from_array(np.ones((VOCAB, 8), np.float32), "embed")],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder)


def _weights_as_inputs(folder: Path, good: Path) -> Path:
    model = small()
    for t in [t for t in model.graph.initializer if "_proj" in t.name or "lm_head" in t.name]:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        model.graph.initializer.remove(t)
    return save(model, folder)


def _nan_weight(folder: Path, good: Path) -> Path:
    return save(with_weight(small(), "/model/layers.1/mlp/up_proj.weight", lambda a: a.__setitem__((3, 5), np.nan)), folder)


def _inf_weight(folder: Path, good: Path) -> Path:
    return save(with_weight(small(), "/model/layers.0/self_attn/k_proj.weight", lambda a: a.__setitem__((0, 0), np.inf)), folder)


def _inf_activation(folder: Path, good: Path) -> Path:
    # an Inf embedding row (not a quantized weight) turns the hidden state of every token using it into NaN
    return save(with_weight(small(), "model.embed_tokens.weight", lambda a: a.__setitem__(slice(None), np.inf)), folder)


BAD_MODELS = {
    "truncated ONNX": (_truncated, "truncated or not ONNX"),
    "empty file": (_empty, "not an ONNX model"),
    "missing external data": (_missing_data, "external data file 'model.onnx.data'"),
    "truncated external data": (_truncated_data, "is truncated"),
    "no quantizable MatMul": (_no_matmul, "no quantizable MatMul"),
    "weights are graph inputs": (_weights_as_inputs, "weights are graph inputs"),
    "NaN weight": (_nan_weight, "layer /model/layers.1/mlp/up_proj/MatMul has 1 NaN/Inf"),
    "Inf weight": (_inf_weight, "layer /model/layers.0/self_attn/k_proj/MatMul has 1 NaN/Inf"),
    "Inf activations": (_inf_activation, "block 0, input of /model/layers.0/self_attn/q_proj/MatMul"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model(tmp_path, good, text, case):
    make, needle = BAD_MODELS[case]
    (tmp_path / "in").mkdir()
    src = make(tmp_path / "in", good)
    out = tmp_path / "out" / "q.onnx"
    line = cli_error(["quantize", src, "-o", out, "--calib", text, *CALIB], needle, tmp_path / "in")
    assert ": " in line.removeprefix("error:")  # "<problem>: <what to do>"
    assert not out.parent.exists()


@pytest.mark.parametrize(
    "option,needle",
    [(["--bits", "1"], "bits=1"), (["--bits", "16"], "bits=16"), (["--group", "8"], "group size 8"),
     (["--group", "0"], "group size 0"), (["--group", "-2"], "group size -2"), (["--group", "48"], "power of two"),
     (["--calib-windows", "0"], "at least 1 window"), (["--calib-seq-len", "4"], "at least 1 window"),
     (["--damp", "0"], "damping"), (["--algo", "awq"], "unknown algorithm"), (["--format", "int4"], "unknown format")],
)
def test_bad_option(tmp_path, good, text, option, needle):
    out = tmp_path / "q.onnx"
    cli_error(["quantize", good, "-o", out, "--calib", text, *CALIB, *option], needle, tmp_path)
    assert not out.exists()


def test_too_short_calibration_text(tmp_path, good):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")  # 16 byte tokens < 2 windows of 16
    out = tmp_path / "q.onnx"
    cli_error(["quantize", good, "-o", out, "--calib", short, "--calib-windows", "2", "--calib-seq-len", "16"],
              "room for 1 windows of 16", tmp_path)
    cli_error(["quantize", good, "-o", out, "--calib", short, "--calib-seq-len", "64"], "need at least 64", tmp_path)
    assert not out.exists()


def test_output_is_the_input(tmp_path, text):
    src = save(small(), tmp_path)
    before = src.read_bytes()
    cli_error(["quantize", src, "-o", src, "--calib", text, *CALIB], "is the input model", tmp_path)
    assert src.read_bytes() == before


def test_output_would_overwrite_the_input_data(tmp_path, text):
    """Writing b.onnx (+ b.onnx.data) must not clobber the data file a.onnx reads."""
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save_model(small(), folder / "a.onnx", save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    write_byte_tokenizer(folder)
    before = (folder / "b.onnx.data").read_bytes()
    cli_error(["quantize", folder / "a.onnx", "-o", folder / "b.onnx", "--calib", text, *CALIB], "external data", folder)
    assert (folder / "b.onnx.data").read_bytes() == before and not (folder / "b.onnx").exists()


@pytest.mark.parametrize("where", ["folder", "under a file", "unwritable"])
def test_unwritable_output(tmp_path, good, text, where):
    if where == "folder":
        out, needle = tmp_path, "generation-ready folder is built from a Hugging Face folder"  # a folder means deploy
    elif where == "under a file":
        (tmp_path / "file").write_text("x")
        out, needle = tmp_path / "file" / "q.onnx", "is not a folder"
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("needs /proc, where nobody (not even root) can create files")
        out, needle = Path("/proc/onnxq-test-q.onnx"), "cannot write"
    cli_error(["quantize", good, "-o", out, "--calib", text, *CALIB], needle, tmp_path)
    assert not out.is_file()


def test_interrupted_run_writes_nothing(tmp_path, good, text, monkeypatch):
    calls = []
    real = onnxq.solve.loop.solve_layer

    def solve_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # mid-pipeline: block 0 is done, block 1 is being solved
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxq.solve.loop, "solve_layer", solve_then_interrupt)
    monkeypatch.setattr(onnxq.solve.dispatch, "solve_layer", solve_then_interrupt)  # solve_block's parallel layers
    out = tmp_path / "q.onnx"
    res = runner.invoke(app, ["quantize", str(good), "-o", str(out), "--calib", str(text), *CALIB])
    assert res.exit_code == 130, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("interrupted")]
    assert lines == ["interrupted: no output file was written"], res.output
    assert "Traceback" not in res.output and len(calls) >= 9  # layers solved side by side may finish first
    assert not out.exists() and not leftovers(tmp_path)


def test_interrupted_save_leaves_no_temp_files(tmp_path, good, monkeypatch):
    import onnxq.graph.io

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnxq.graph.io.os, "fsync", interrupt)
    out = tmp_path / "q.onnx"
    with pytest.raises(KeyboardInterrupt):
        quantize(good, QuantRecipe(algo="rtn", group_size=32), out, windows=windows(vocab=VOCAB), progress=False)
    assert not out.exists() and not leftovers(tmp_path)


# ---- ragged groups and singular Hessians --------------------------------------------------------------------------


def _logits(path, ids):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input_ids": ids})[0]


@pytest.mark.parametrize(
    "fmt,sym,group", [("nbits", False, 32), ("nbits", True, 32), ("qdq", False, 32), ("qdq", True, 32), ("nbits", False, 128)]
)
def test_k_not_divisible_by_group(tmp_path, fmt, sym, group):
    """K = 80 with group 32: the last group of each row holds 16 columns (MatMulNBits pads K to 96); with group
    128 > K there is one short group per row."""
    src = save(decoder_model(layers=1, hidden=80, heads=4, intermediate=160, vocab=VOCAB), tmp_path / "m")
    out = tmp_path / "q.onnx"
    quantize(src, QuantRecipe(algo="gptq", bits=4, group_size=group, format=fmt, sym=sym), out, windows=windows(vocab=VOCAB), progress=False)
    model = onnx.load(out)
    onnx.checker.check_model(model)
    if fmt == "nbits":
        q = next(n for n in model.graph.node if n.name == "/model/layers.0/self_attn/q_proj/MatMul")
        attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute}
        assert (attrs["K"], attrs["block_size"]) == (80, group)
        blob = next(t for t in model.graph.initializer if t.name == q.input[1])
        assert list(blob.dims) == [80, -(-80 // group), group // 2]  # N, ceil(K / group) blocks, 4-bit codes
    ids = windows(2, 12, vocab=VOCAB, seed=3)
    ref, got = _logits(src, ids), _logits(out, ids)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.3


@pytest.mark.parametrize("algo", ["gptq", "boa", "turboboa"])
def test_zero_and_rank_deficient_inputs_still_quantize(tmp_path, algo):
    """up_proj sees only zeros (H = 0), gate_proj a rank-1 input (singular H): damping and dead-column handling."""
    src = save(small(zero_input_layer=True, rank1_input_layer=True), tmp_path / "m")
    out = tmp_path / "q.onnx"
    rep = quantize(src, QuantRecipe(algo=algo, bits=4, group_size=16, rows_per_block=4), out, windows=windows(vocab=VOCAB), progress=False)
    assert rep.layers == 14 and all(np.isfinite(v) for v in rep.layer_losses.values())
    assert np.isfinite(_logits(out, windows(1, 8, vocab=VOCAB))).all()


def test_damping_escalates_on_indefinite_hessian():
    H = torch.diag(torch.tensor([1.0, 1.0, -0.01], dtype=torch.float64))  # first damped try still indefinite
    Hd, U = factor(H, 0.01)
    assert torch.linalg.eigvalsh(Hd).min() > 0
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd))
    with pytest.raises(OnnxqError, match=r"not positive definite .*: raise the damping"):
        factor(torch.diag(torch.tensor([1.0, 1.0, -10.0])), 0.01)


def test_gptq_on_rank_one_hessian():
    torch.manual_seed(0)
    W = torch.randn(8, 64)
    x = torch.randn(64, 1)
    res = solve_gptq(W, x @ x.T, QuantSpec(bits=4, group_size=32, sym=False), damp=0.01)
    assert torch.isfinite(res.qweight).all() and res.codes.min() >= 0 and res.codes.max() <= 15


# ---- lazily loaded external weights --------------------------------------------------------------------------------


def _weights(path: Path) -> dict[str, bytes]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
def test_external_source_gives_the_same_weights_as_inline(tmp_path, fmt):
    """Weights read block by block from model.onnx.data quantize exactly as inline ones; the output keeps external
    data (the float embedding and norms are copied from the source's data file), and the source is untouched."""
    inline = save(small(), tmp_path / "inline")
    external = save(small(), tmp_path / "external", external=True)
    data_before = (tmp_path / "external" / "model.onnx.data").read_bytes()
    recipe = QuantRecipe(algo="turboboa", bits=4, group_size=16, format=fmt, rows_per_block=4)
    quantize(inline, recipe, tmp_path / "a" / "q.onnx", windows=windows(vocab=VOCAB), progress=False)
    quantize(external, recipe, tmp_path / "b" / "q.onnx", windows=windows(vocab=VOCAB), progress=False)
    assert not (tmp_path / "a" / "q.onnx.data").exists() and (tmp_path / "b" / "q.onnx.data").is_file()
    assert _weights(tmp_path / "a" / "q.onnx") == _weights(tmp_path / "b" / "q.onnx")
    ids = windows(2, 8, vocab=VOCAB, seed=5)
    np.testing.assert_array_equal(_logits(tmp_path / "a" / "q.onnx", ids), _logits(tmp_path / "b" / "q.onnx", ids))
    assert (tmp_path / "external" / "model.onnx.data").read_bytes() == data_before


def test_lazy_load_reads_only_what_it_needs(tmp_path, monkeypatch):
    """No code path loads the whole external model: load_external_data_for_model is never called."""
    import onnxq.graph.io

    def forbidden(*_a, **_k):
        raise AssertionError("the whole model's external data was loaded")

    monkeypatch.setattr(onnxq.graph.io, "load_external_data_for_model", forbidden)
    src = save(small(), tmp_path / "m", external=True)
    quantize(src, QuantRecipe(algo="gptq", group_size=16), tmp_path / "q.onnx", windows=windows(vocab=VOCAB), progress=False)
    assert (tmp_path / "q.onnx.data").is_file()


def test_detached_inline_weights_come_back(tmp_path):
    """detach_weights leaves a small proto; Weights hands each tensor back exactly (what pieces and solves read)."""
    from onnxq.graph.io import Weights, detach_weights, load_tensor_data, read_array

    model = small()
    ref = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    slim, memory = detach_weights(model, keep=["model.embed_tokens.weight"])
    assert len(memory) == 15 and "model.embed_tokens.weight" not in memory  # 14 projections + lm_head
    assert slim.ByteSize() + sum(map(len, memory.values())) <= small().ByteSize()
    store = Weights(tmp_path, memory)
    for t in slim.graph.initializer:
        np.testing.assert_array_equal(read_array(t, store), ref[t.name])
    piece = [onnx.TensorProto()]
    piece[0].CopyFrom(next(t for t in slim.graph.initializer if t.name in memory))
    load_tensor_data(piece, store)
    np.testing.assert_array_equal(numpy_helper.to_array(piece[0]), ref[piece[0].name])


# ---- reproducibility --------------------------------------------------------------------------------------------


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("algo", ["gptq", "turboboa"])
def test_same_inputs_same_bytes(tmp_path, text, algo):
    """Two CLI runs with the same model, text and seed write byte-identical files (external data included)."""
    src = save(small(), tmp_path / "m", external=True)
    for run in ("a", "b"):
        res = runner.invoke(app, ["quantize", str(src), "-o", str(tmp_path / run / "q.onnx"), "--calib", str(text),
                                  "--algo", algo, "--seed", "7", *CALIB])
        assert res.exit_code == 0, res.output
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert set(_digest(tmp_path / "a")) == {"q.onnx", "q.onnx.data"}


def test_same_bytes_across_processes(tmp_path, text):
    """Fresh `onnxq quantize` processes with default thread settings (tests run torch on one thread) agree too."""
    import subprocess
    import sys

    src = save(small(), tmp_path / "m")
    for run in ("a", "b"):
        cmd = [sys.executable, "-c", "from onnxq.cli import main; main()", "quantize", str(src), "-o", str(tmp_path / run / "q.onnx"),
               "--calib", str(text), "--algo", "turboboa", *CALIB]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        assert res.returncode == 0, res.stderr[-2000:]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_tokenizer_json_alone_is_enough(tmp_path, text):
    """A folder with model.onnx and tokenizer.json only (no config.json) calibrates from text, whatever the folder's
    name (AutoTokenizer guessed a class from it: a folder named "sam..." picked SAM's and failed with a KeyError)."""
    src = save(small(), tmp_path / "sample-model")
    assert sorted(p.name for p in src.parent.iterdir()) == ["model.onnx", "tokenizer.json"]
    res = runner.invoke(app, ["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(text), *CALIB])
    assert res.exit_code == 0, res.output
