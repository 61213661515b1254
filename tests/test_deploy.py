"""Generation-ready folders: the genai builder's graph with onnxq's weights loads and generates in onnxruntime-genai,
computes the fake-quant function, and bad requests are refused in one line."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnxq.cli import app
from onnxq.deploy.builder import float_build
from onnxq.deploy.generate import generate
from onnxq.errors import OnnxqError
from onnxq.graph.io import read_array
from onnxq.models.export import export_onnx
from onnxq.graph.metadata import read_provenance
from onnxq.formats.rewrite import add_output_bias
from onnxq.pipeline import quantize
from onnxq.recipe import QuantRecipe
from onnxq.runtime.evaluate import file_size
from onnxq.runtime.session import make_session, model_feeds
from tests.helpers import dequantized
from tests.tiny import tiny_llama_hf

WINDOWS = np.random.default_rng(0).integers(2, 258, (8, 48))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny tied Llama HF folder; the builder's and optimum's exports are cached in a module-wide cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNXQ_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield tiny_llama_hf(tmp_path_factory.mktemp("hf"), tied=True)


def _logits(path, ids: np.ndarray) -> np.ndarray:
    session = make_session(path)
    return session.run(["logits"], model_feeds(session, ids))[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_builder_graph_computes_the_analysis_export(hf):
    ids = WINDOWS[:1]
    assert _rel(_logits(float_build(hf) / "model.onnx", ids), _logits(export_onnx(hf), ids)) < 1e-4


def test_folder_loads_generates_and_is_smaller(hf, tmp_path):
    out = tmp_path / "deploy"
    rep = quantize(str(hf), QuantRecipe(algo="turboboa", bits=4, group_size=32), out, windows=WINDOWS, progress=False)
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2 * 5 + 1  # packed qkv, o, gate, up, down per block, and the LM head
    assert "GroupQueryAttention" in ops and "GatherBlockQuantized" in ops and "MatMul" not in ops
    assert rep.deploy["embedding"].startswith("GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.name == "/lm_head/MatMul")
    assert {a.name: a.i for a in head.attribute}["bits"] == 8 and rep.layer_losses["/lm_head/MatMul"] >= 0
    meta = read_provenance(model)
    assert meta["algorithm"] == "turboboa" and meta["exclude"] == [] and meta["head_bits"] == 8
    assert file_size(out / "model.onnx") < 0.5 * file_size(float_build(hf) / "model.onnx")
    gen = generate(out, "hello", max_new_tokens=6)
    assert len(gen.tokens) == 6 and all(0 <= t < 258 for t in gen.tokens)


def _bias(model: onnx.ModelProto, folder, node: onnx.NodeProto) -> np.ndarray | None:
    """A MatMulNBits node's bias input [N], if it has one."""
    inits = {t.name: t for t in model.graph.initializer}
    return read_array(inits[node.input[5]], str(folder)) if len(node.input) > 5 and node.input[5] else None


QKV = {"q_proj": (0, 64), "k_proj": (64, 96), "v_proj": (96, 128)}  # 4 heads, 2 KV heads, head_dim 16: column ranges


@pytest.mark.parametrize("bias_correction", [False, True])
def test_folder_matches_the_fake_quant_analysis_export(hf, tmp_path, bias_correction):
    """The quantized genai graph (exact activations) against optimum's float graph holding the stored weights and
    output biases (the folder keeps them as MatMulNBits bias inputs)."""
    out = tmp_path / "deploy"
    recipe = QuantRecipe(algo="gptq", bits=4, group_size=32, accuracy_level=0, bias_correction=bias_correction)
    quantize(str(hf), recipe, out, windows=WINDOWS, progress=False)
    deployed = onnx.load(str(out / "model.onnx"), load_external_data=False)
    stored = {n.name: (dequantized(deployed, out, n), _bias(deployed, out, n)) for n in deployed.graph.node
              if n.op_type == "MatMulNBits"}
    assert all(b is not None for _, b in stored.values()) == bias_correction
    assert "Add" not in {n.op_type for n in deployed.graph.node}
    ref = onnx.load(str(export_onnx(hf)))
    inits = {t.name: t for t in ref.graph.initializer}
    biases = {}
    for node in ref.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        name = node.name.replace("self_attn", "attn")
        proj = name.split("/")[-2]
        lo, hi = QKV.get(proj, (None, None))
        value, bias = stored[name.replace(proj, "qkv_proj") if proj in QKV else name]
        inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(value[:, lo:hi].copy(), node.input[1]))
        if bias is not None:
            biases[node.name] = bias[lo:hi]
    head, head_bias = stored["/lm_head/MatMul"]  # the tied head reads Transpose(embedding): set through the embedding
    if head_bias is not None:
        biases["/lm_head/MatMul"] = head_bias
    add_output_bias(ref, biases)
    embed = next(n for n in ref.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    inits[embed.input[0]].CopyFrom(onnx.numpy_helper.from_array(head.T.copy(), embed.input[0]))
    ids = WINDOWS[:2]
    session = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(["logits"], model_feeds(session, ids))[0]
    assert _rel(_logits(out / "model.onnx", ids), expected) < 1e-4


@pytest.mark.parametrize("recipe, message", [
    (QuantRecipe(algo="rtn", rotate=True), "--rotate"),
    (QuantRecipe(algo="rtn", format="qdq"), "MatMulNBits"),
    (QuantRecipe(algo="rtn", head_bits=3), "LM head"),
    (QuantRecipe(algo="gptq", float_zero=True, v_int_zero=True), "packs Q, K and V"),
])
def test_folder_refusals(hf, tmp_path, recipe, message):
    with pytest.raises(OnnxqError, match=message):
        quantize(str(hf), recipe, tmp_path / "deploy", windows=WINDOWS, progress=False)
    assert not (tmp_path / "deploy").exists()


def test_folder_from_a_onnx_file_is_refused(hf, tmp_path):
    with pytest.raises(OnnxqError, match="Hugging Face folder or a registry name"):
        quantize(str(export_onnx(hf)), QuantRecipe(algo="rtn"), tmp_path / "deploy", progress=False)


def test_cli_quantize_to_folder_then_generate(hf, tmp_path):
    out = tmp_path / "deploy"
    runner = CliRunner()
    done = runner.invoke(app, ["quantize", str(hf), "-o", str(out), "--algo", "rtn", "--group", "32"])
    assert done.exit_code == 0, done.output
    assert "generation check:" in done.output
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 2
    gen = runner.invoke(app, ["generate", str(out), "hi", "--max-new-tokens", "4"])
    assert gen.exit_code == 0 and "tok/s decode" in gen.output
    bad = runner.invoke(app, ["generate", str(tmp_path), "hi"])
    assert bad.exit_code == 2 and "not a generation-ready folder" in bad.output


@pytest.mark.slow
def test_default_model_folder_generates(tmp_path, monkeypatch):
    """The README's deploy flow on the default model (RTN: no calibration, so it stays quick)."""
    monkeypatch.delenv("ONNXQ_CACHE", raising=False)  # reuse the user's exports: each takes about a minute
    out = tmp_path / "smollm2"
    rep = quantize("smollm2", QuantRecipe(algo="rtn"), out, progress=False)
    assert rep.layers == 30 * 7 + 1 and file_size(out / "model.onnx") < 95e6
    gen = generate(out, "The capital of France is", max_new_tokens=8)
    assert "Paris" in gen.text
