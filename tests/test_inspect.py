"""`onnxq inspect`: sizes and bits per weight against hand-computed values, structure of float and quantized
exports, external data, foreign models, the JSON schema, --diff and --target."""
from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from typer.testing import CliRunner

from onnxq.analysis.layers import linear_layers
from onnxq.cli import app
from onnxq.inspect import SCHEMA_VERSION, inspect_model, render
from onnxq.graph.io import load_model, save_model_atomic
from onnxq.formats.packing import pack_bits
from onnxq.formats.rewrite import QuantizedWeight, to_matmulnbits, to_qdq
from onnxq.graph.metadata import add_provenance
from onnxq.graph.normalize import normalize
from tests.tiny import matmul_model, tied_embedding_model, tiny_llama_onnx

LAYER = "/layers.0/MatMul"


def random_weight(n: int, k: int, bits: int, group: int, sym: bool, seed: int = 0) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    groups = 1 if group == -1 else -(-k // group)
    zeros = None if sym else rng.integers(0, 1 << bits, (n, groups))
    return QuantizedWeight(rng.integers(0, 1 << bits, (n, k)), rng.random((n, groups)).astype(np.float32) + 0.01, zeros, bits, group)


def one_layer(tmp_path, bits, group, sym, *, k=1024, n=16, fmt="nbits", name="q.onnx", **save) -> str:
    """x -> one quantized MatMul [K, N] -> y, saved; its only initializers are the layer's."""
    model = matmul_model((k, n))
    weights = {LAYER: random_weight(n, k, bits, group, sym)}
    (to_matmulnbits if fmt == "nbits" else to_qdq)(model, weights)
    return str(save_model_atomic(model, tmp_path / name, **save))


def only_layer(path) -> dict:
    (layer,) = inspect_model(path)["layers"]
    return layer


@pytest.mark.parametrize(
    "bits, group, sym, bpw",
    [
        (4, 128, False, (4 * 128 + 32 + 4) / 128),  # 4.28125: fp32 scale + packed uint4 zero point per block
        (4, 32, False, (4 * 32 + 32 + 4) / 32),  # 5.125
        (4, 128, True, (4 * 128 + 32) / 128),  # 4.25: no zero point stored
        (8, 128, False, (8 * 128 + 32 + 8) / 128),  # 8.3125
        (8, 128, True, (8 * 128 + 32) / 128),  # 8.25
        (2, 128, False, (2 * 128 + 32 + 2) / 128),  # 2.265625
        (2, 32, True, (2 * 32 + 32) / 32),  # 3.0
    ],
)
def test_matmulnbits_bits_per_weight_and_bytes(tmp_path, bits, group, sym, bpw):
    layer = only_layer(one_layer(tmp_path, bits, group, sym))
    assert (layer["format"], layer["bits"], layer["block_size"], layer["sym"]) == ("MatMulNBits", bits, group, sym)
    assert (layer["k"], layer["n"]) == (1024, 16)
    assert layer["bpw"] == layer["bpw_nominal"] == bpw
    assert layer["bytes"] == bpw * 1024 * 16 / 8
    assert layer["bytes_fp32"] == 1024 * 16 * 4
    assert layer["zero_point"] == (None if sym else f"uint{bits} packed" if bits < 8 else "uint8")
    assert layer["scale_dtype"] == "float32" and layer["accuracy_level"] == 4


def test_ragged_k_counts_the_padding(tmp_path):
    """K = 576 = 4.5 blocks of 128 (SmolLM2): 5 blocks are stored, 3 bytes of zero points per row."""
    layer = only_layer(one_layer(tmp_path, 4, 128, False, k=576))
    assert layer["bytes"] == 16 * (5 * 64 + 5 * 4 + 3)
    assert layer["bpw"] == round((5 * 64 + 5 * 4 + 3) * 8 / 576, 6)
    assert layer["bpw_nominal"] == 4.28125


@pytest.mark.parametrize(
    "bits, group, sym, block, zp, bpw",
    [
        (4, 32, True, 32, None, (4 * 32 + 32) / 32),  # int4, 5.0
        (4, 32, False, 32, "uint4", (4 * 32 + 32 + 4) / 32),  # uint4 with uint4 zero points, 5.125
        (8, -1, False, -1, "uint8", 8 + (32 + 8) / 1024),  # per channel: one scale and zero point per column
    ],
)
def test_qdq_bits_per_weight(tmp_path, bits, group, sym, block, zp, bpw):
    layer = only_layer(one_layer(tmp_path, bits, group, sym, fmt="qdq"))
    assert (layer["format"], layer["bits"], layer["block_size"], layer["zero_point"]) == ("DQ→MatMul", bits, block, zp)
    assert layer["bpw"] == pytest.approx(bpw, abs=1e-5)


def test_totals_and_compression(tmp_path):
    path = one_layer(tmp_path, 4, 128, False)
    float_path = save_model_atomic(matmul_model((1024, 16)), tmp_path / "float.onnx")
    info = inspect_model(path)
    stored = 16 * (8 * 64 + 8 * 4 + 4)  # codes + fp32 scales + packed zero points
    p = info["parameters"]
    assert (p["total"], p["bytes"], p["fp32_bytes"]) == (1024 * 16, stored, 1024 * 16 * 4)
    rows = {r["precision"]: r for r in p["by_precision"]}
    assert rows["int4"]["params"] == 1024 * 16 and rows["int4"]["bytes"] == 16 * 8 * 64
    assert rows["scales/zero points"] == {"precision": "scales/zero points", "tensors": 2, "params": 0, "bytes": 16 * (32 + 4)}
    assert info["compression"] == {"source": "fp32 estimate", "source_bytes": 65536, "bytes": stored, "ratio": round(65536 / stored, 4)}
    assert info["weights"]["float_param_share"] == 0.0
    diffed = inspect_model(path, diff=float_path)
    assert diffed["compression"]["source"] == str(float_path) and diffed["compression"]["ratio"] == round(65536 / stored, 4)


# ---- the tiny Llama export, float and quantized ------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(float export, 4-bit asym MatMulNBits g32 without lm_head, 4-bit sym QDQ g32) paths."""
    tmp = tmp_path_factory.mktemp("llama")
    src = tiny_llama_onnx(tmp, layers=2, hidden=64, heads=4, kv_heads=2)
    paths = [str(src)]
    for fmt, sym in (("nbits", False), ("qdq", True)):
        model = normalize(load_model(src))
        weights = {l.node: random_weight(l.n, l.k, 4, 32, sym, i) for i, l in enumerate(linear_layers(model)) if l.role != "lm_head"}
        (to_matmulnbits if fmt == "nbits" else to_qdq)(model, weights)
        add_provenance(model, {"algorithm": "gptq", "bits": 4, "group_size": 32, "damp": 0.01, "calibration": {"windows": 8}})
        paths.append(str(save_model_atomic(model, tmp / f"{fmt}.onnx")))
    return paths


def check_attention(info):
    att = info["blocks"]["attention"]
    assert info["blocks"]["count"] == 2 and len(att) == 2
    for i, a in enumerate(att):
        assert (a["block"], a["n_heads"], a["n_kv_heads"], a["head_dim"]) == (i, 4, 2, 16)
        assert a["causal"] is True and a["rope"] == "rotate_half"
        assert [a[r].rsplit("/", 2)[-2] for r in "qkvo"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_float_export(llama):
    info = inspect_model(llama[0])
    check_attention(info)
    layers = info["layers"]
    assert len(layers) == 16 and {l["format"] for l in layers} == {"float"}
    assert [l["role"] for l in layers if l["block"] is None] == ["embed", "lm_head"]
    assert info["weights"]["float_param_share"] == 1.0 and info["compression"]["ratio"] == 1.0
    assert info["ops"]["ai.onnx"]["MatMul"] >= 15 and info["problems"] == []
    assert [i["name"] for i in info["inputs"]] == ["input_ids", "attention_mask", "position_ids"]


def test_matmulnbits_export(llama):
    info = inspect_model(llama[1])
    check_attention(info)
    q = next(l for l in info["layers"] if l["role"] == "q_proj")
    assert (q["format"], q["attention"], q["block"], q["bpw"]) == ("MatMulNBits", "q", 0, 5.125)
    w = info["weights"]
    assert (w["quantized"], w["float"], w["float_by_role"]) == (14, 2, {"embed": 1, "lm_head": 1})
    assert 0 < w["float_param_share"] < 1 and info["compression"]["ratio"] > 2
    assert info["ops"]["com.microsoft"] == {"MatMulNBits": 14}
    assert info["provenance"]["algorithm"] == "gptq" and info["provenance"]["calibration"] == {"windows": 8}


def test_qdq_export(llama):
    info = inspect_model(llama[2])
    check_attention(info)
    assert {l["format"] for l in info["layers"] if l["block"] is not None} == {"DQ→MatMul"}
    assert info["opsets"]["ai.onnx"] >= 21 and info["ir_version"] >= 10 and info["problems"] == []
    assert info["ops"]["ai.onnx"]["DequantizeLinear"] == 14


def test_external_data_is_described_not_read(tmp_path, llama):
    model = load_model(llama[1])
    path = save_model_atomic(model, tmp_path / "ext.onnx", external_data=True)
    info = inspect_model(path)
    (ext,) = info["external_data"]
    assert ext["file"] == "ext.onnx.data" and ext["present"] and ext["file_bytes"] >= ext["bytes"] > 0
    assert info["layers"] == inspect_model(llama[1])["layers"]
    (tmp_path / "ext.onnx.data").unlink()  # sizes come from metadata: the data file is never opened
    gone = inspect_model(path)
    assert gone["external_data"][0]["present"] is False and gone["layers"] == info["layers"]


def test_diff_against_the_float_source(llama):
    info = inspect_model(llama[1], diff=llama[0])
    d = info["diff"]
    assert d["changed_layers"] == 14 and len(d["layers"]) == 16
    ops = {o["op"]: (o["model"], o["other"]) for o in d["ops"]}
    assert ops["com.microsoft::MatMulNBits"] == (14, 0)
    assert d["bytes"]["other"] == info["compression"]["source_bytes"] and info["compression"]["source"] == llama[0]
    q = next(l for l in d["layers"] if l["role"] == "q_proj")
    assert q["model"]["format"] == "MatMulNBits" and q["other"]["format"] == "float" and q["other"]["bits"] == 32


def test_target_lint(tmp_path, llama):
    assert inspect_model(llama[1], target="cuda")["target"]["findings"] == []
    cpu = inspect_model(llama[1], target="cpu")["target"]
    assert cpu["errors"] == 0 and cpu["warnings"] == 1 and cpu["findings"][0]["layers"] == 14  # accuracy_level 4
    web = inspect_model(one_layer(tmp_path, 8, 128, False), target="web")["target"]
    assert web["errors"] == 1 and "no 8-bit MatMulNBits kernel" in web["findings"][0]["message"]
    assert web["findings"][0]["examples"] == [LAYER]
    qnn = inspect_model(llama[2], target="qnn")["target"]  # blocked QDQ with float activations
    assert qnn["errors"] == 1 and qnn["findings"][0]["layers"] == 14 and "blocked DequantizeLinear" in qnn["findings"][0]["message"]


def test_render_all_sections(llama):
    out = io.StringIO()
    render(inspect_model(llama[1], target="dml", diff=llama[0]), Console(file=out, width=200), layers=True)
    text = out.getvalue()
    for part in ("attention", "rotate_half", "q_proj", "uint4 packed", "provenance", "gptq", "target dml", "diff:"):
        assert part in text


# ---- models onnxq did not write -----------------------------------------------------------------------------------


def test_foreign_model_without_names(tmp_path):
    """Unnamed nodes, Gemm with transB, a float embedding Gather, an op of an undeclared domain: no traceback."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((50, 8)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.standard_normal((12, 8)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["h"]),
        helper.make_node("Reshape", ["h", "shape"], ["h2"]),
        helper.make_node("Gemm", ["h2", "w"], ["g"], transB=1),
        helper.make_node("Mystery", ["g"], ["y"], domain="vendor.ops"),
    ]
    inits.append(numpy_helper.from_array(np.array([-1, 8], dtype=np.int64), "shape"))
    graph = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    info = inspect_model(path, target="cpu")
    assert [(l["name"], l["op"], l["role"], l["k"], l["n"]) for l in info["layers"]] == [("h", "Gather", "gather", 50, 8), ("g", "Gemm", "linear", 8, 12)]
    assert info["blocks"] == {"count": 0, "layers_per_block": 0, "attention": []}
    assert any("vendor.ops" in p for p in info["problems"])
    render(info, Console(file=io.StringIO()), layers=True)


def test_int4_needs_ir10_and_opset21(tmp_path):
    k, n = 32, 4
    q = helper.make_tensor("wq", TensorProto.INT4, [k, n], pack_bits(np.zeros(k * n, dtype=np.uint8), 4).tobytes(), raw=True)
    scale = numpy_helper.from_array(np.ones((1, n), dtype=np.float32), "ws")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0, block_size=32, name="/fc/DQ"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [q, scale])
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), path)
    info = inspect_model(path)
    assert info["layers"][0]["bits"] == 4 and info["layers"][0]["block_size"] == 32
    assert any("IR version >= 10" in p for p in info["problems"]) and any("opset >= 21" in p for p in info["problems"])


def test_gather_block_quantized(tmp_path):
    """uint8-packed 4-bit embedding [64, 32], blocks of 16: (16 + 2*4 + 1) bytes per row."""
    v, d, block = 64, 32, 16
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(0, 256, (v, d // 2)).astype(np.uint8), "emb_q"),
        numpy_helper.from_array(rng.random((v, d // block)).astype(np.float32), "emb_s"),
        numpy_helper.from_array(rng.integers(0, 256, (v, 1)).astype(np.uint8), "emb_zp"),
    ]
    node = helper.make_node("GatherBlockQuantized", ["emb_q", "ids", "emb_s", "emb_zp"], ["h"], domain="com.microsoft",
                            name="/model/embed_tokens/GatherBlockQuantized", bits=4, block_size=block, quantize_axis=1)
    graph = helper.make_graph([node], "gbq", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, [3, d])], inits)
    path = tmp_path / "gbq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]), path)
    info = inspect_model(path, target="dml")
    (layer,) = info["layers"]
    assert (layer["format"], layer["role"], layer["k"], layer["n"], layer["bits"]) == ("GatherBlockQuantized", "embed", v, d, 4)
    assert layer["bytes"] == v * (16 + 2 * 4 + 1) and layer["bpw"] == layer["bpw_nominal"] == 4 + (32 + 4) / 16
    assert "runs on CPU" in info["target"]["findings"][0]["message"]


def test_tied_embedding_counts_once(tmp_path):
    path = save_model_atomic(tied_embedding_model(vocab=32, hidden=16), tmp_path / "tied.onnx")
    info = inspect_model(path)
    assert [(l["role"], l["k"], l["n"]) for l in info["layers"]] == [("embed", 32, 16), ("lm_head", 16, 32)]
    assert info["weights"]["tied"] == ["/embed/Gather", "/lm_head/MatMul"] and info["weights"]["params"] == 32 * 16


# ---- command line --------------------------------------------------------------------------------------------------

NONE = type(None)
TOP = {
    "schema_version": int, "path": str, "file_bytes": int, "ir_version": int, "opsets": dict, "producer": str,
    "inputs": list, "outputs": list, "nodes": int, "ops": dict, "parameters": dict, "external_data": list,
    "weights": dict, "compression": dict, "blocks": dict, "layers": list, "provenance": dict, "problems": list,
    "target": (dict, NONE), "diff": (dict, NONE),
}
LAYER_KEYS = {
    "name": str, "op": str, "format": str, "dtype": str, "bits": int, "block_size": (int, NONE), "sym": (bool, NONE),
    "zero_point": (str, NONE), "scale_dtype": (str, NONE), "accuracy_level": (int, NONE), "bias": bool, "k": int,
    "n": int, "bytes": int, "bytes_fp32": int, "bpw": (int, float), "bpw_nominal": (int, float), "weight": str,
    "role": str, "attention": (str, NONE), "block": (int, NONE),
}
PARTS = {
    "parameters": {"total": int, "bytes": int, "fp32_bytes": int, "by_precision": list},
    "weights": {"layers": int, "quantized": int, "float": int, "params": int, "float_params": int,
                "float_param_share": (int, float), "float_byte_share": (int, float), "float_by_role": dict, "tied": list},
    "compression": {"source": str, "source_bytes": int, "bytes": int, "ratio": (int, float, NONE)},
    "blocks": {"count": int, "layers_per_block": int, "attention": list},
    "target": {"name": str, "provider": str, "errors": int, "warnings": int, "findings": list},
    "diff": {"other": str, "bytes": dict, "params": dict, "ops": list, "layers": list, "changed_layers": int},
}


def conforms(value: dict, schema: dict) -> None:
    assert set(value) == set(schema), set(value) ^ set(schema)
    for key, types in schema.items():
        assert isinstance(value[key], types), (key, value[key])


def test_json_schema(llama):
    result = CliRunner().invoke(app, ["inspect", llama[1], "--json", "--target", "cpu", "--diff", llama[0]])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["schema_version"] == SCHEMA_VERSION == 1
    conforms(info, TOP)
    for part, schema in PARTS.items():
        conforms(info[part], schema)
    for layer in info["layers"]:
        conforms(layer, LAYER_KEYS)
    conforms(info["blocks"]["attention"][0], {k: (str, int, bool, NONE) for k in (
        "block", "kind", "q", "k", "v", "o", "fused_qkv", "n_heads", "n_kv_heads", "head_dim", "rope", "causal")})
    conforms(info["parameters"]["by_precision"][0], {"precision": str, "tensors": int, "params": int, "bytes": int})
    conforms(info["target"]["findings"][0], {"severity": str, "message": str, "layers": int, "examples": list})
    conforms(info["diff"]["layers"][1], {"name": str, "role": str, "model": dict, "other": dict})
    conforms(info["diff"]["ops"][0], {"op": str, "model": int, "other": int})
    conforms(info["inputs"][0], {"name": str, "dtype": str, "shape": (list, NONE)})


def test_cli_human_output_and_errors(tmp_path, llama):
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", llama[0], "--layers"])
    assert result.exit_code == 0 and "attention" in result.stdout and "rotate_half" in result.stdout
    assert runner.invoke(app, ["inspect", llama[0], "--target", "tpu"]).exit_code == 2
    assert runner.invoke(app, ["inspect", str(tmp_path / "missing.onnx")]).exit_code == 2
