"""MatMul -> MatMulNBits and DequantizeLinear -> MatMul: ORT output equals a float64 fake-quant reference."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxq.errors import OnnxqError
from onnxq.formats import rewrite
from onnxq.formats.rewrite import QuantizedWeight, to_matmulnbits, to_qdq
from tests.helpers import random_weight
from tests.tiny import matmul_model, tiny_llama, tiny_llama_onnx

BITS = [2, 3, 4, 8]
GROUPS = [16, 32, 128, -1]
LLAMA = dict(hidden=80, intermediate=144)  # K = 80 and 144: ragged for groups 32 and 128 (like 576 = 4.5 x 128)


def rtn(w: np.ndarray, bits: int, group: int, sym: bool) -> QuantizedWeight:
    """Round-to-nearest min/max quantization of w [N, K] (rows = output channels), groups along K."""
    n, k = w.shape
    size = k if group == -1 else group
    groups, maxq = -(-k // size), (1 << bits) - 1
    padded = np.full((n, groups * size), np.nan)
    padded[:, :k] = w
    padded = padded.reshape(n, groups, size)
    if sym:
        scales = np.nanmax(np.abs(padded), axis=2) / max(maxq // 2, 1)
        zeros, offset = None, 1 << (bits - 1)
    else:
        lo, hi = np.minimum(np.nanmin(padded, axis=2), 0), np.maximum(np.nanmax(padded, axis=2), 0)
        scales = (hi - lo) / maxq
        zeros = np.clip(np.round(-lo / np.maximum(scales, 1e-12)), 0, maxq).astype(np.int64)
    scales = np.maximum(scales, 1e-8).astype(np.float32)
    cols = np.arange(k) // size
    offset = offset if sym else zeros[:, cols]
    codes = np.clip(np.round(w / scales[:, cols]) + offset, 0, maxq).astype(np.int64)
    return QuantizedWeight(codes, scales, zeros, bits, group)


def dequant(qw: QuantizedWeight) -> np.ndarray:
    """Fake-quant reference W [N, K] in float64: (code - zero) * scale per group."""
    k = qw.codes.shape[1]
    cols = np.arange(k) // (k if qw.group_size == -1 else qw.group_size)
    zeros = (1 << (qw.bits - 1)) if qw.zeros is None else qw.zeros[:, cols]
    return (qw.codes - zeros) * qw.scales[:, cols].astype(np.float64)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """CPU session computing exactly (ORT's DQ+MatMul -> MatMulNBits fusion otherwise uses int8 activations)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def rewritten(model, weights, fmt):
    return to_matmulnbits(model, weights, accuracy_level=0) if fmt == "nbits" else to_qdq(model, weights)


def torch_logits(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Forward pass on one thread (two torch threads on a two-core box make this tiny model ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    finally:
        torch.set_num_threads(threads)


def rel_err(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def weight_of(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(inits[node.input[1]])


# ---- parity --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", GROUPS)
def test_matmul_model_parity(fmt, bits, sym, group):
    rng = np.random.default_rng(bits * 100 + group)
    model = matmul_model((80, 200, 48))  # K = 80 and 200: ragged for 32 and 128, 200 also for 16
    weights = {f"/layers.{i}/MatMul": random_weight(n, k, bits, group, sym, rng) for i, (k, n) in enumerate([(80, 200), (200, 48)])}
    out = rewritten(model, weights, fmt)
    onnx.checker.check_model(out, full_check=True)
    x = rng.standard_normal((2, 3, 80)).astype(np.float32)
    w0, w1 = (dequant(weights[f"/layers.{i}/MatMul"]) for i in range(2))
    ref = np.maximum(x.astype(np.float64) @ w0.T, 0) @ w1.T
    assert rel_err(session(out).run(None, {"x": x})[0], ref) < 1e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama export, its torch twin in float64, and MatMul node name -> torch module name."""
    path = tiny_llama_onnx(tmp_path_factory.mktemp("llama"), **LLAMA)
    model = onnx.load(path)
    torch_model = tiny_llama(**LLAMA).double()
    linear = {}
    for node in model.graph.node:
        module = node.name.strip("/").removesuffix("/MatMul").replace("/", ".")
        if node.op_type == "MatMul" and module.endswith(("proj", "lm_head")):
            w = torch_model.get_submodule(module).weight.detach().numpy()
            np.testing.assert_array_equal(weight_of(model, node.name), w.T.astype(np.float32))
            linear[node.name] = module
    assert len(linear) == 15
    return model, torch_model, linear


@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", GROUPS)
def test_llama_parity(llama, fmt, bits, sym, group):
    model, torch_model, linear = llama
    reference = copy.deepcopy(torch_model)
    weights = {}
    for node, module in linear.items():
        layer = reference.get_submodule(module)
        weights[node] = rtn(layer.weight.detach().numpy(), bits, group, sym)
        layer.weight.data = torch.from_numpy(dequant(weights[node]))
    out = rewritten(copy.deepcopy(model), weights, fmt)
    onnx.checker.check_model(out, full_check=True)
    ids = np.random.default_rng(0).integers(0, 256, (2, 7))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(7), (2, 1))}
    ref = torch_logits(reference, feeds)
    assert rel_err(session(out).run(["logits"], feeds)[0], ref) < 1e-4


# ---- graph structure -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,group,sym,container,block,has_zp",
    [(4, 32, False, 4, 32, True), (3, 16, True, 4, 16, False), (3, 32, False, 4, 32, True), (2, 128, True, 2, 128, False),
     (8, -1, False, 8, 128, True), (4, -1, True, 4, 128, False)],
)
def test_matmulnbits_node(bits, group, sym, container, block, has_zp):
    rng = np.random.default_rng(0)
    weights = {f"/layers.{i}/MatMul": random_weight(n, k, bits, group, sym, rng) for i, (k, n) in enumerate([(80, 200), (200, 48)])}
    out = to_matmulnbits(matmul_model(), weights)
    node = out.graph.node[-1]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.domain, node.name, node.output[0]) == ("MatMulNBits", "com.microsoft", "/layers.1/MatMul", "y")
    assert attrs == {"K": 200, "N": 48, "bits": container, "block_size": block, "accuracy_level": 4}
    assert len(node.input) == (4 if has_zp else 3)
    assert {t.name for t in out.graph.initializer}.isdisjoint({"layers.0.weight", "layers.1.weight"})
    assert helper.make_opsetid("com.microsoft", 1) in out.opset_import
    assert out.opset_import[0].version == 18  # the default domain is left alone


def test_matmulnbits_default_accuracy_level_is_close():
    """accuracy_level=4 (int8 activations, the default) is not exact but close."""
    rng = np.random.default_rng(0)
    weights = {f"/layers.{i}/MatMul": random_weight(n, k, 4, 32, False, rng) for i, (k, n) in enumerate([(80, 200), (200, 48)])}
    x = rng.standard_normal((2, 3, 80)).astype(np.float32)
    exact = session(to_matmulnbits(matmul_model(), weights, accuracy_level=0)).run(None, {"x": x})[0]
    fast = session(to_matmulnbits(matmul_model(), weights)).run(None, {"x": x})[0]
    assert 0 < rel_err(fast, exact) < 3e-2


@pytest.mark.parametrize(
    "bits,group,sym,data_type,opset",
    [(4, 32, True, TensorProto.INT4, 21), (4, 32, False, TensorProto.UINT4, 21), (3, 16, True, TensorProto.INT4, 21),
     (3, -1, False, TensorProto.UINT4, 21), (8, 128, True, TensorProto.INT8, 21), (8, -1, False, TensorProto.UINT8, 21),
     (2, 32, True, TensorProto.INT2, 25), (2, -1, False, TensorProto.UINT2, 25)],
)
def test_qdq_nodes(bits, group, sym, data_type, opset):
    rng = np.random.default_rng(0)
    weights = {"/layers.1/MatMul": random_weight(48, 200, bits, group, sym, rng)}
    out = to_qdq(matmul_model(), weights)
    dq, mm = out.graph.node[-2:]
    inits = {t.name: t for t in out.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert (dq.op_type, mm.op_type, mm.name, mm.input[1]) == ("DequantizeLinear", "MatMul", "/layers.1/MatMul", dq.output[0])
    assert dq.name == "/layers.1/DequantizeLinear"
    assert attrs == ({"axis": 1} if group == -1 else {"axis": 0, "block_size": group})
    q = inits[dq.input[0]]
    assert q.data_type == data_type and list(q.dims) == [200, 48]
    assert list(inits[dq.input[1]].dims) == ([48] if group == -1 else [-(-200 // group), 48])
    assert len(dq.input) == (2 if sym else 3) and (sym or inits[dq.input[2]].data_type == data_type)
    assert out.opset_import[0].version == opset and out.ir_version >= (13 if opset == 25 else 10)
    assert "layers.1.weight" not in inits and "layers.0.weight" in inits


def test_qdq_raises_the_opset_without_the_converter(llama, monkeypatch):
    """Ops of an optimum export (opset 18) mean the same at 21/25: only the import number changes."""
    def refuse(*_):
        raise AssertionError("version converter should not be needed")

    monkeypatch.setattr(rewrite.version_converter, "convert_version", refuse)
    model, _, linear = llama
    rng = np.random.default_rng(0)
    name = next(iter(linear))
    k, n = weight_of(model, name).shape
    out = to_qdq(copy.deepcopy(model), {name: random_weight(n, k, 2, 16, True, rng)})
    assert out.opset_import[0].version == 25
    onnx.checker.check_model(out, full_check=True)


def test_qdq_converts_an_old_graph():
    """ReduceMean's axes moved from attribute to input at opset 18: the version converter rewrites the graph."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 32)).astype(np.float32)  # 8 KiB, float: detached during the conversion, then restored
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1, name="mean"),
             helper.make_node("Sub", ["x", "m"], ["c"], name="sub"), helper.make_node("MatMul", ["c", "w1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 16])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.ones((32, 16), np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    qw = random_weight(16, 32, 4, 16, False, rng)
    out = to_qdq(model, {"mm2": qw})
    onnx.checker.check_model(out, full_check=True)
    mean = next(n for n in out.graph.node if n.op_type == "ReduceMean")
    assert out.opset_import[0].version == 21 and len(mean.input) == 2
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ref = (x - x.mean(-1, keepdims=True)).astype(np.float64) @ w1 @ dequant(qw).T
    assert rel_err(session(out).run(None, {"x": x})[0], ref) < 1e-4


def test_shared_weight_is_kept_while_still_used():
    model = matmul_model((16, 16, 16))
    model.graph.node[-1].input[1] = "layers.0.weight"  # both MatMuls read one initializer
    rng = np.random.default_rng(0)
    out = to_matmulnbits(copy.deepcopy(model), {"/layers.0/MatMul": random_weight(16, 16, 4, 16, True, rng)})
    assert "layers.0.weight" in {t.name for t in out.graph.initializer}
    out = to_matmulnbits(out, {"/layers.1/MatMul": random_weight(16, 16, 4, 16, True, rng)})
    assert "layers.0.weight" not in {t.name for t in out.graph.initializer}


# ---- errors --------------------------------------------------------------------------------------------------------


def test_bad_weights_are_one_line_errors():
    rng = np.random.default_rng(0)
    good = random_weight(200, 80, 4, 32, False, rng)
    cases = {
        "not a MatMul": {"/layers.0/Relu": good},
        "codes shape": {"/layers.0/MatMul": QuantizedWeight(good.codes.T, good.scales, good.zeros, 4, 32)},
        "scales/zeros shape": {"/layers.0/MatMul": QuantizedWeight(good.codes, good.scales[:, :2], good.zeros, 4, 32)},
        "outside": {"/layers.0/MatMul": QuantizedWeight(good.codes + 16, good.scales, good.zeros, 4, 32)},
        "bits=5": {"/layers.0/MatMul": QuantizedWeight(good.codes, good.scales, good.zeros, 5, 32)},
    }
    for message, weights in cases.items():
        for convert in (to_matmulnbits, to_qdq):
            model = matmul_model()
            with pytest.raises(OnnxqError, match=message) as err:
                convert(model, weights)
            assert "\n" not in str(err.value)
            assert model.opset_import[0].version == 18  # nothing was rewritten


@pytest.mark.parametrize("bits,group,message", [(4, 48, "power-of-two"), (2, 512, "blocks to 256")])
def test_matmulnbits_block_limits(bits, group, message):
    rng = np.random.default_rng(0)
    model = matmul_model((1024, 16))
    with pytest.raises(OnnxqError, match=message):
        to_matmulnbits(model, {"/layers.0/MatMul": random_weight(16, 1024, bits, group, True, rng)})
    to_qdq(model, {"/layers.0/MatMul": random_weight(16, 1024, bits, group, True, rng)})  # DQ takes any block


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [16, 128, -1])
def test_float_zero_points_parity(bits, group):
    """Float zero points (any real value, here outside [0, 2^bits - 1] too) are written unpacked in A's dtype."""
    rng = np.random.default_rng(bits * 10 + group)
    model = matmul_model((80, 200, 48))
    weights = {}
    for i, (k, n) in enumerate([(80, 200), (200, 48)]):
        qw = random_weight(n, k, bits, group, False, rng)
        weights[f"/layers.{i}/MatMul"] = QuantizedWeight(qw.codes, qw.scales, rng.uniform(-3, (1 << bits) + 2, qw.zeros.shape), bits, group)
    out = to_matmulnbits(model, weights, accuracy_level=0)
    onnx.checker.check_model(out, full_check=True)
    zps = [t for t in out.graph.initializer if t.name.endswith("zero_points")]
    assert len(zps) == 2 and all(t.data_type == TensorProto.FLOAT for t in zps)
    x = rng.standard_normal((2, 3, 80)).astype(np.float32)
    w0, w1 = (dequant(weights[f"/layers.{i}/MatMul"]) for i in range(2))
    ref = np.maximum(x.astype(np.float64) @ w0.T, 0) @ w1.T
    assert rel_err(session(out).run(None, {"x": x})[0], ref) < 1e-4


def test_float_zero_points_refused_where_no_kernel():
    rng = np.random.default_rng(0)
    qw = random_weight(200, 80, 8, 16, False, rng)
    weights = {"/layers.0/MatMul": QuantizedWeight(qw.codes, qw.scales, qw.zeros.astype(np.float64), 8, 16)}
    with pytest.raises(OnnxqError, match="no 8-bit kernel with float zero points"):
        to_matmulnbits(matmul_model((80, 200)), weights)
    with pytest.raises(OnnxqError, match="no DequantizeLinear form"):
        to_qdq(matmul_model((80, 200)), weights)


@pytest.mark.parametrize("fmt", ["nbits", "qdq", "float"])
def test_output_bias_parity(fmt):
    """add_output_bias after MatMulNBits, QDQ or a float MatMul: ORT equals (x W0 + b0)+ W1 + b1 (ReLU between)."""
    rng = np.random.default_rng(7)
    model = matmul_model((80, 200, 48))
    weights = {f"/layers.{i}/MatMul": random_weight(n, k, 4, 32, False, rng) for i, (k, n) in enumerate([(80, 200), (200, 48)])}
    biases = {f"/layers.{i}/MatMul": rng.standard_normal(n).astype(np.float32) for i, n in enumerate([200, 48])}
    out = model if fmt == "float" else rewritten(model, weights, fmt)
    out = rewrite.add_output_bias(out, biases)
    onnx.checker.check_model(out, full_check=True)
    adds = [n for n in out.graph.node if n.op_type == "Add"]
    assert len(adds) == 2 and out.graph.output[0].name == adds[1].output[0]
    x = rng.standard_normal((2, 3, 80)).astype(np.float32)
    w0, w1 = ((dequant(weights[f"/layers.{i}/MatMul"]) if fmt != "float" else weight_of(model, f"/layers.{i}/MatMul").T)
              for i in range(2))
    b0, b1 = biases["/layers.0/MatMul"], biases["/layers.1/MatMul"]
    ref = np.maximum(x.astype(np.float64) @ w0.T + b0, 0) @ w1.T + b1
    assert rel_err(session(out).run(None, {"x": x})[0], ref) < 1e-4
    with pytest.raises(OnnxqError, match="no node of that name"):
        rewrite.add_output_bias(out, {"/nope/MatMul": b0})
