"""Fuzzing: mutated small decoders (nodes dropped, duplicated, reordered or retyped, dims and dtypes changed,
initializers removed, garbage attributes and inputs) go to the analysis, the attention map, inspect and the
quantizer. Each either works or raises OnnxqError; any other exception is a bug. A failed quantize writes nothing."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxq import OnnxqError, QuantRecipe
from onnxq.analysis.layers import linear_layers, partition
from onnxq.analysis.attention import attention_blocks
from onnxq.inspect import inspect_model
from onnxq.pipeline import quantize
from tests.tiny import decoder_model

VOCAB = 32
_DTYPES = [TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT8, TensorProto.BOOL,
           TensorProto.STRING, TensorProto.UINT4, 0, 999]
_OPS = ["Add", "Relu", "MatMul", "Softmax", "Gemm", "Reshape", "Attention", "NoSuchOp", ""]


def _base() -> onnx.ModelProto:
    return decoder_model(layers=2, hidden=16, heads=2, intermediate=32, vocab=VOCAB)


BASE = _base().SerializeToString()


def _garbage_attribute(draw) -> onnx.AttributeProto:
    name = draw(st.sampled_from(["perm", "axis", "to", "value", "transB", "alpha", "num_heads", "block_size", "x"]))
    value = draw(st.one_of(
        st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.text(max_size=4),
        st.lists(st.integers(-9, 9), min_size=1, max_size=5),
        st.builds(lambda n: helper.make_tensor("t", TensorProto.FLOAT, [n], [1.0] * n), st.integers(0, 3)),
    ))
    return helper.make_attribute(name, value)


@st.composite
def mutated(draw) -> onnx.ModelProto:
    """The base decoder with 1-4 random structural mutations."""
    model = onnx.ModelProto()
    model.ParseFromString(BASE)
    g = model.graph
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from([
            "drop_node", "dup_node", "swap_nodes", "op_type", "domain", "input_name", "attribute", "node_io",
            "init_dims", "init_reshape", "init_dtype", "drop_init", "io_dim", "io_dtype", "drop_output", "opset",
        ]))
        nodes, inits = g.node, g.initializer
        if kind in ("drop_node", "dup_node", "op_type", "domain", "input_name", "attribute", "node_io") and len(nodes):
            i = draw(st.integers(0, len(nodes) - 1))
            if kind == "drop_node":
                del nodes[i]
            elif kind == "dup_node":
                copy = onnx.NodeProto()
                copy.CopyFrom(nodes[i])
                order = list(nodes)
                order.insert(draw(st.integers(0, len(order))), copy)
                del nodes[:]
                nodes.extend(order)
            elif kind == "op_type":
                nodes[i].op_type = draw(st.sampled_from(_OPS))
            elif kind == "domain":
                nodes[i].domain = draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "bogus"]))
            elif kind == "input_name" and len(nodes[i].input):
                j = draw(st.integers(0, len(nodes[i].input) - 1))
                nodes[i].input[j] = draw(st.sampled_from(["", "nowhere", "input_ids", "logits", *nodes[0].output[:1]]))
            elif kind == "node_io":  # cut a node's inputs or outputs short
                field = nodes[i].input if draw(st.booleans()) else nodes[i].output
                del field[draw(st.integers(0, len(field))):]
            elif kind == "attribute":
                attr = _garbage_attribute(draw)
                keep = [a for a in nodes[i].attribute if a.name != attr.name]
                del nodes[i].attribute[:]
                nodes[i].attribute.extend(keep + [attr])
        elif kind == "swap_nodes" and len(nodes) > 1:
            i, j = draw(st.integers(0, len(nodes) - 1)), draw(st.integers(0, len(nodes) - 1))
            a, b = onnx.NodeProto(), onnx.NodeProto()
            a.CopyFrom(nodes[i])
            b.CopyFrom(nodes[j])
            nodes[i].CopyFrom(b)
            nodes[j].CopyFrom(a)
        elif kind in ("init_dims", "init_reshape", "init_dtype", "drop_init") and len(inits):
            i = draw(st.integers(0, len(inits) - 1))
            if kind == "init_dims":  # data no longer matches the shape
                del inits[i].dims[:]
                inits[i].dims.extend(draw(st.lists(st.integers(0, 64), max_size=4)))
            elif kind == "init_reshape":  # same data, another consistent shape (a weight [K, N] read as [N, K], ...)
                dims = list(inits[i].dims)
                new = draw(st.sampled_from([dims[::-1], [int(np.prod(dims))], [1, *dims], dims[:-1] + [1, dims[-1]]] if dims else [[1]]))
                del inits[i].dims[:]
                inits[i].dims.extend(new)
            elif kind == "init_dtype":
                inits[i].data_type = draw(st.sampled_from(_DTYPES))
            else:
                del inits[i]
        elif kind in ("io_dim", "io_dtype") and len(g.output):
            vi = draw(st.sampled_from([g.input[0], g.output[0]]))
            t = vi.type.tensor_type
            if kind == "io_dtype":
                t.elem_type = draw(st.sampled_from(_DTYPES))
            elif len(t.shape.dim):
                d = t.shape.dim[draw(st.integers(0, len(t.shape.dim) - 1))]
                d.dim_value = draw(st.integers(0, 50))
        elif kind == "drop_output":
            del g.output[:]
        elif kind == "opset":
            model.opset_import[0].version = draw(st.sampled_from([1, 7, 13, 21, 99]))
    return model


FUZZ = settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _save(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@FUZZ
@given(mutated())
def test_analysis_attention_inspect(model):
    for fn in (linear_layers, partition, attention_blocks):
        try:
            fn(model)
        except OnnxqError:
            pass
    with tempfile.TemporaryDirectory() as tmp:
        path = _save(model, Path(tmp))
        for target in (None, "cpu"):
            try:
                inspect_model(path, target=target, diff=path)
            except OnnxqError:
                pass


@settings(FUZZ, max_examples=50)
@given(mutated(), st.sampled_from(["rtn", "gptq", "boa", "turboboa"]), st.sampled_from(["nbits", "qdq"]))
def test_quantize(model, algo, fmt):
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 8)).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        src = _save(model, Path(tmp))
        out = Path(tmp) / "out" / "q.onnx"
        try:
            quantize(src, QuantRecipe(algo=algo, format=fmt, group_size=16, rows_per_block=4), out, windows=ids, progress=False)
        except OnnxqError as err:
            assert "\n" not in str(err)
            assert not out.parent.exists() or not any(out.parent.iterdir())
        else:
            assert out.is_file()


def test_base_model_quantizes(tmp_path):
    """The unmutated seed graph is valid and quantizes (so the fuzzers start from a working model)."""
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 8)).astype(np.int64)
    rep = quantize(_save(_base(), tmp_path), QuantRecipe(algo="gptq", group_size=16), tmp_path / "q.onnx", windows=ids, progress=False)
    assert rep.layers == 14
