"""End-to-end quantize on a tiny Llama built in code, and the CLI's handling of bad input."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxq import QuantRecipe
from onnxq.cli import app
from onnxq.errors import OnnxqError
from onnxq.inspect import inspect_model
from onnxq.graph.metadata import read_provenance
from onnxq.pipeline import quantize
from onnxq.runtime.session import make_session, model_feeds
from tests.tiny import tiny_llama_onnx


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama_onnx(tmp_path_factory.mktemp("llama"), layers=2, hidden=64, heads=4, kv_heads=2)


def _windows(n=8, t=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, t)).astype(np.int64)


def _logits(path, ids):
    s = make_session(path)
    return s.run(["logits"], model_feeds(s, ids))[0]


@pytest.mark.parametrize(
    "algo,bits,group,fmt",
    [("rtn", 4, 32, "nbits"), ("gptq", 4, 32, "nbits"), ("gptq", 8, -1, "qdq"), ("gptq", 3, 16, "qdq"),
     ("boa", 4, -1, "nbits"), ("turboboa", 2, 32, "nbits")],
)
def test_quantize_runs_on_ort(llama, tmp_path, algo, bits, group, fmt):
    out = tmp_path / "q.onnx"
    recipe = QuantRecipe(algo=algo, bits=bits, group_size=group, format=fmt, rows_per_block=4)
    rep = quantize(llama, recipe, out, windows=_windows(), progress=False)
    assert out.exists() and rep.layers == 14
    model = onnx.load(out)
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert ("MatMulNBits" in ops) if fmt == "nbits" else ("DequantizeLinear" in ops)
    prov = read_provenance(model)
    assert prov["algorithm"] == algo and int(prov["bits"]) == bits
    ids = _windows(2, 16, seed=1)
    ref, got = _logits(llama, ids), _logits(out, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert np.isfinite(got).all()
    assert rel < {8: 0.02, 4: 0.3, 3: 0.5, 2: 1.0}[bits], rel


def test_gptq_beats_rtn_on_layer_loss(llama, tmp_path):
    """On block 0, GPTQ's calibration loss tr(ΔW H ΔWᵀ) is below calibrated (Hessian-grid) RTN's at 3 bits."""
    rtn = quantize(llama, QuantRecipe(algo="rtn", bits=3, group_size=32, grid="hessian"), tmp_path / "r.onnx", windows=_windows(), progress=False)
    gptq = quantize(llama, QuantRecipe(algo="gptq", bits=3, group_size=32), tmp_path / "g.onnx", windows=_windows(), progress=False)
    # RTN's layer losses use H of its own (quantized) stream; compare the first block, where streams are identical
    first = [k for k in gptq.layer_losses if "layers.0/" in k]
    assert sum(gptq.layer_losses[k] for k in first) < sum(rtn.layer_losses[k] for k in first)



def test_refine_codes_lowers_gptq_layer_losses(llama, tmp_path):
    """Code coordinate descent after GPTQ: on block 0 (same inputs both runs) no layer loss rises, the sum falls."""
    recipe = lambda **kw: QuantRecipe(algo="gptq", bits=3, group_size=32, **kw)  # noqa: E731
    base = quantize(llama, recipe(), tmp_path / "g.onnx", windows=_windows(), progress=False)
    cd = quantize(llama, recipe(refine_codes=2), tmp_path / "c.onnx", windows=_windows(), progress=False)
    first = [k for k in base.layer_losses if "layers.0/" in k]
    assert all(cd.layer_losses[k] <= base.layer_losses[k] * (1 + 1e-6) for k in first)
    assert sum(cd.layer_losses[k] for k in first) < sum(base.layer_losses[k] for k in first)
    assert int(read_provenance(onnx.load(tmp_path / "c.onnx"))["refine_codes"]) == 2
    with pytest.raises(OnnxqError, match="refine-codes"):
        QuantRecipe(algo="rtn", refine_codes=1).validate()


runner = CliRunner()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["quantize", "missing.onnx", "-o", "OUT"], "missing.onnx"),
        (["quantize", "NOTONNX", "-o", "OUT"], "ONNX"),
        (["quantize", "no-such-model", "-o", "OUT"], "unknown model"),
        (["quantize", "LLAMA", "-o", "OUT", "--bits", "5"], "bits=5"),
        (["quantize", "LLAMA", "-o", "OUT", "--group", "100"], "power of two"),
        (["quantize", "LLAMA", "-o", "OUT", "--calib", "EMPTY"], "empty"),
    ],
)
def test_cli_bad_input(llama, tmp_path, args, needle):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf at all" * 10)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    out = tmp_path / "out.onnx"
    subst = {"OUT": str(out), "NOTONNX": str(bad), "LLAMA": str(llama), "EMPTY": str(empty), "missing.onnx": str(tmp_path / "missing.onnx")}
    res = runner.invoke(app, [subst.get(a, a) for a in args])
    assert res.exit_code == 2, res.output
    assert needle.lower() in res.output.lower()
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_tied_head_stays_shared(tmp_path):
    """With lm_head excluded, a Transpose-fed tied head keeps reading the embedding instead of a float copy."""
    from onnxq.graph.normalize import normalize
    from tests.tiny import tiny_gpt2_onnx

    src = onnx.load(tiny_gpt2_onnx(tmp_path, constant_folding=False))
    before = sum(np.prod(t.dims) for t in src.graph.initializer)
    kept = normalize(onnx.load(tiny_gpt2_onnx(tmp_path, constant_folding=False)), keep_tied=True)
    copied = normalize(onnx.load(tiny_gpt2_onnx(tmp_path, constant_folding=False)))
    size = lambda m: sum(np.prod(t.dims) for t in m.graph.initializer)  # noqa: E731
    assert size(kept) <= before < size(copied)


def test_data_free_rtn_needs_no_calibration(llama, tmp_path):
    """RTN with a min-max grid never runs the model: no tokenizer or calibration text is needed."""
    rep = quantize(llama, QuantRecipe(algo="rtn", bits=4, group_size=32), tmp_path / "r.onnx", progress=False)
    assert rep.calib_tokens == 0 and rep.layers == 14 and (tmp_path / "r.onnx").exists()


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_hessians_see_quantized_inputs(llama, tmp_path, true_sequential):
    """With true_sequential, o_proj's reported loss tr(ΔW H ΔWᵀ) uses H from block 0 with its q/k/v quantized."""
    out, windows = tmp_path / "q.onnx", _windows()
    recipe = QuantRecipe(algo="gptq", bits=2, group_size=32, format="qdq", true_sequential=true_sequential)
    rep = quantize(llama, recipe, out, windows=windows, progress=False)
    model = onnx.load(out)
    (mm,) = [n for n in model.graph.node if n.op_type == "MatMul" and "layers.0/self_attn/o_proj" in n.name]
    model.graph.output.extend([onnx.ValueInfoProto(name=mm.input[0]), onnx.ValueInfoProto(name=mm.input[1])])
    (tmp_path / "probe.onnx").write_bytes(model.SerializeToString())
    s = make_session(tmp_path / "probe.onnx", disabled_optimizers=["QDQSelectorActionTransformer"])  # exact fp32 DQ
    x, wq = s.run([mm.input[0], mm.input[1]], model_feeds(s, windows))
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    H = 2.0 / len(x) * x.T @ x  # the o_proj input Hessian in the model with block 0's q/k/v quantized
    source = onnx.load(llama)
    weight = next(n.input[1] for n in source.graph.node if n.name == mm.name)
    w = next(t for t in source.graph.initializer if t.name == weight)
    dW = wq.astype(np.float64) - onnx.numpy_helper.to_array(w).astype(np.float64)  # [K, N]
    loss = float(np.trace(dW.T @ H @ dW))
    reported = rep.layer_losses[mm.name]
    if true_sequential:
        assert reported == pytest.approx(loss, rel=1e-5)
    else:  # the float-block statistics differ from the quantized-q/k/v ones
        assert abs(reported - loss) > 1e-3 * loss



@pytest.mark.parametrize("algo", ["boa", "turboboa"])
def test_v_row_factor_changes_only_v(llama, tmp_path, algo):
    """--v-row-factor gives V the W_O row Hessian: V's weights change, block 0's Q and K (solved before V) do not."""
    from onnx import numpy_helper

    def weights(v_rows):
        out = tmp_path / f"{algo}-{v_rows}.onnx"
        quantize(llama, QuantRecipe(algo=algo, bits=3, group_size=32, format="qdq", v_row_factor=v_rows, rows_per_block=4),
                 out, windows=_windows(), progress=False)
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer if t.name.endswith("weight_q")}

    a, b = weights(False), weights(True)
    name = lambda role: next(k for k in a if f"layers.0/self_attn/{role}" in k)  # noqa: E731
    assert np.array_equal(a[name("q_proj")], b[name("q_proj")]) and np.array_equal(a[name("k_proj")], b[name("k_proj")])
    assert not np.array_equal(a[name("v_proj")], b[name("v_proj")])
    with pytest.raises(Exception, match="BoA/TurboBoA option"):
        QuantRecipe(algo="gptq", v_row_factor=True).validate()


def test_float_zero_points_end_to_end(llama, tmp_path):
    """--float-zero: float32 zero points in every MatMulNBits, counted at 32 bits by inspect, and ORT runs the file."""
    from onnxq.inspect import inspect_model

    out = tmp_path / "fz.onnx"
    res = runner.invoke(app, ["quantize", str(llama), "-o", str(out), "--algo", "rtn", "--bits", "2", "--group", "32",
                              "--float-zero"])
    assert res.exit_code == 0, res.output
    layers = [l for l in inspect_model(out)["layers"] if l["format"] == "MatMulNBits"]
    assert len(layers) == 14 and {l["zero_point"] for l in layers} == {"float32"}
    assert all(l["bpw_nominal"] == pytest.approx(2 + 64 / 32) for l in layers)  # fp32 scale + fp32 zero per 32
    assert np.isfinite(_logits(out, _windows(2, 16, seed=1))).all()


def _nbits_inputs(path) -> dict[str, list[np.ndarray]]:
    """B, scales and zero points of every MatMulNBits node, by node name."""
    from onnx import numpy_helper

    m = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return {n.name: [inits[i] for i in n.input[1:4]] for n in m.graph.node if n.op_type == "MatMulNBits"}


def test_v_int_zero_keeps_integer_zero_points_on_v(llama, tmp_path):
    """--v-int-zero: V projections get packed integer zero points and exactly the --int-zero result, every other layer the
    --float-zero one (RTN, so layers are independent); the attention-aware path marks the same layers."""
    runs = {}
    for tag, extra in [("int", []), ("float", ["--float-zero"]), ("mixed", ["--float-zero", "--v-int-zero"])]:
        out = tmp_path / f"{tag}.onnx"
        res = runner.invoke(app, ["quantize", str(llama), "-o", str(out), "--algo", "rtn", "--bits", "2", "--group", "32", *extra])
        assert res.exit_code == 0, res.output
        runs[tag] = _nbits_inputs(out)
    layers = {l["name"]: l for l in inspect_model(tmp_path / "mixed.onnx")["layers"] if l["format"] == "MatMulNBits"}
    v = {n for n in layers if "v_proj" in n}
    assert len(v) == 2 and {layers[n]["zero_point"] for n in v} == {"uint2 packed"}
    assert {layers[n]["zero_point"] for n in set(layers) - v} == {"float32"}
    for name, arrays in runs["mixed"].items():
        ref = runs["int" if name in v else "float"][name]
        assert all(np.array_equal(a, b) for a, b in zip(arrays, ref)), name
    out = tmp_path / "turbo.onnx"
    quantize(llama, QuantRecipe(algo="turboboa", bits=2, group_size=32, float_zero=True, v_int_zero=True, rows_per_block=4),
             out, windows=_windows(), progress=False)
    zero_types = {l["name"]: l["zero_point"] for l in inspect_model(out)["layers"] if l["format"] == "MatMulNBits"}
    assert {n for n, z in zero_types.items() if z != "float32"} == v
    assert read_provenance(onnx.load(out))["v_int_zero"] is True


@pytest.mark.parametrize("extra,needle", [(["--sym"], "asymmetric"), (["--format", "qdq"], "integer zero points"),
                                          (["--bits", "8"], "8-bit"), (["--target", "cuda"], "CPU provider only"),
                                          (["--int-zero", "--v-int-zero"], "add --float-zero")])
def test_float_zero_refusals(llama, tmp_path, extra, needle):
    out = tmp_path / "fz.onnx"
    res = runner.invoke(app, ["quantize", str(llama), "-o", str(out), "--algo", "rtn", "--float-zero", *extra])
    assert res.exit_code == 2 and needle.lower() in res.output.lower(), res.output
    assert not out.exists()


def test_bias_correction_end_to_end(llama, tmp_path):
    """--bias-correction: every quantized MatMul gets an Add; block 0's q_proj (whose input no quantized layer
    precedes) carries b = E[x] (W - Q) and reports the loss tr(ΔWᵀ Hc ΔW), both measured on the output model."""
    out, windows = tmp_path / "q.onnx", _windows()
    recipe = QuantRecipe(algo="gptq", bits=2, group_size=32, format="qdq", bias_correction=True)
    rep = quantize(llama, recipe, out, windows=windows, progress=False)
    model = onnx.load(out)
    assert read_provenance(model)["bias_correction"] in (True, "True", "true")
    adds = {n.name: n for n in model.graph.node if n.op_type == "Add" and n.name.endswith(".bias_add")}
    assert len(adds) == 14
    (mm,) = [n for n in model.graph.node if n.op_type == "MatMul" and "layers.0/self_attn/q_proj" in n.name]
    add = adds[f"{mm.name}.bias_add"]
    bias = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == add.input[1]))
    model.graph.output.extend([onnx.ValueInfoProto(name=mm.input[0]), onnx.ValueInfoProto(name=mm.input[1])])
    (tmp_path / "probe.onnx").write_bytes(model.SerializeToString())
    s = make_session(tmp_path / "probe.onnx")
    x, wq = s.run([mm.input[0], mm.input[1]], model_feeds(s, windows))
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mu = x.mean(0)
    Hc = 2.0 / len(x) * (x - mu).T @ (x - mu)
    source = onnx.load(llama)
    weight = next(n.input[1] for n in source.graph.node if n.name == mm.name)
    w = onnx.numpy_helper.to_array(next(t for t in source.graph.initializer if t.name == weight)).astype(np.float64)
    dW = wq.astype(np.float64) - w  # [K, N]
    scale = (np.abs(mu) @ np.abs(dW)).max()  # size of the terms summed: the bias is a small difference of them
    np.testing.assert_allclose(bias, -mu @ dW, rtol=0, atol=1e-4 * scale)
    assert np.abs(bias).max() > 0.05 * scale
    assert rep.layer_losses[mm.name] == pytest.approx(float(np.trace(dW.T @ Hc @ dW)), rel=1e-4)
    assert np.isfinite(_logits(out, _windows(2, 16, seed=1))).all()


def test_bias_correction_needs_data(llama, tmp_path):
    res = runner.invoke(app, ["quantize", str(llama), "-o", str(tmp_path / "q.onnx"), "--algo", "rtn", "--bias-correction"])
    assert res.exit_code == 2 and "needs activation means" in res.output, res.output


def test_rotate_end_to_end(llama, tmp_path):
    """--rotate: the float parts change (online rotations, unit norm scales), the 14 layers (not R4's small MatMuls)
    are still quantized, and
    at 8 bits the output follows the float model as closely as without rotation."""
    out = tmp_path / "rot.onnx"
    rep = quantize(llama, QuantRecipe(algo="gptq", bits=8, group_size=32, rotate=True), out, windows=_windows(),
                   progress=False)
    assert rep.layers == 14
    model = onnx.load(out)
    assert read_provenance(model)["rotate"] in (True, "True", "true")
    assert read_provenance(model)["rotation"] == ("R1 (residual stream of width 64), R2 (2 attention blocks), "
                                                  "R4 (2 of 2 MLP down projections)")
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 14
    online = [n for n in model.graph.node if n.op_type == "MatMul" and "onnxq_rotation" in n.name]
    assert len(online) == 2 + 2 * 2  # R1 in and out; R4 (two small MatMuls) before each down_proj
    info = inspect_model(out)
    assert info["blocks"]["layers_per_block"] == 7  # the rotations are not counted as the blocks' layers
    assert sum(l["role"] == "rotation" for l in info["layers"]) == 4  # R1 in/out, R4's MatMul with its constant
    ids = _windows(2, 16, seed=1)
    ref, got = _logits(llama, ids), _logits(out, ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02


def test_rotate_refuses_layernorm_models(tmp_path):
    from tests.tiny import tiny_gpt2_onnx

    out = tmp_path / "q.onnx"
    res = runner.invoke(app, ["quantize", str(tiny_gpt2_onnx(tmp_path)), "-o", str(out), "--algo", "rtn", "--rotate"])
    assert res.exit_code == 2 and "--rotate:" in res.output and "drop --rotate" in res.output, res.output
    assert not out.exists()


def test_rotate_quantizes_the_with_past_export(tmp_path):
    """A rotated model changes float weights too, so generation needs the with-past export quantized directly:
    it runs through the same pipeline and matches the float with-past model at 8 bits."""
    from onnxq.models.export import export_onnx
    from tests.tiny import tiny_llama

    tiny_llama(hidden=64, heads=4, kv_heads=2).save_pretrained(tmp_path / "hf")
    past = export_onnx(tmp_path / "hf", tmp_path / "past", with_past=True)
    out = tmp_path / "q.onnx"
    quantize(past, QuantRecipe(algo="gptq", bits=8, group_size=32, rotate=True), out, windows=_windows(), progress=False)
    ids = _windows(1, 16, seed=1)
    ref, got = _logits(past, ids), _logits(out, ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02
    assert sum("onnxq_rotation" in n.name for n in onnx.load(out).graph.node) == 2 + 2 * 5  # R1; R4 per block


def test_aespa_end_to_end_descends_from_gptq(llama, tmp_path):
    """--algo aespa: GPTQ (Hessian grid, act-order) then code descent, so block 0's non-attention layers (same
    statistics in both runs) end no higher than that GPTQ's loss, V and Q/K under their own objectives; ORT runs it."""
    reports = {}
    for algo, grid in (("aespa", None), ("gptq", "hessian")):
        out = tmp_path / f"{algo}.onnx"
        reports[algo] = quantize(llama, QuantRecipe(algo=algo, bits=3, group_size=32, grid=grid), out,
                                 windows=_windows(), progress=False)
        assert np.isfinite(_logits(out, _windows(2, 16, seed=1))).all()
    a, g = reports["aespa"].layer_losses, reports["gptq"].layer_losses
    plain = [k for k in a if "layers.0/" in k and not any(r in k for r in ("q_proj", "k_proj", "v_proj"))]
    assert len(plain) == 4 and all(a[k] <= g[k] * (1 + 1e-6) for k in plain)
    assert any(a[k] < g[k] * 0.999 for k in plain)  # the descent moved something
    assert read_provenance(onnx.load(tmp_path / "aespa.onnx", load_external_data=False))["algorithm"] == "aespa"
