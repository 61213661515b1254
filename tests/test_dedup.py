"""Copies of one weight (a tied embedding / LM head written twice) become one tensor in normalize and in the file."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxq import QuantRecipe
from onnxq.graph.io import load_model, save_model_atomic
from onnxq.graph.normalize import dedupe_weights, duplicate_candidates, normalize
from onnxq.pipeline import quantize
from onnxq.runtime.evaluate import file_size
from onnxq.runtime.session import make_session, model_feeds
from tests.helpers import check_same_outputs
from tests.tiny import matmul_model, tied_embedding_model, tiny_llama_onnx

from onnxq.graph import normalize as NORMALIZE


def two_copies(model: onnx.ModelProto, *, transposed: bool = True) -> onnx.ModelProto:
    """`model` with each initializer-fed Transpose replaced by a second initializer holding its result (or, with
    `transposed=False`, by a byte-identical copy of the source that the Transpose reads)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]:
        value = numpy_helper.to_array(inits[node.input[0]])
        if transposed:
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value.T), node.output[0]))
            model.graph.node.remove(node)
        else:
            model.graph.initializer.append(numpy_helper.from_array(value, node.input[0] + ".copy"))
            node.input[0] = node.input[0] + ".copy"
    return model


def init_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def test_transposed_copy_becomes_a_transpose_of_the_table():
    model = two_copies(tied_embedding_model())
    assert dedupe_weights(model.graph) == [("/lm_head/Transpose_output_0", "embed.weight", True)]
    assert init_names(model) == {"embed.weight"}
    assert [(n.op_type, n.name) for n in model.graph.node] == [
        ("Gather", "/embed/Gather"), ("Transpose", "/lm_head/Transpose"), ("MatMul", "/lm_head/MatMul")]
    check_same_outputs(tied_embedding_model(), model)


@pytest.mark.parametrize("keep_tied", [True, False])
def test_normalize_treats_the_copy_as_the_exporter_s_tied_head(keep_tied):
    """Same graph as normalizing optimum's deduplicated form: shared with keep_tied, else one materialized weight."""
    got = normalize(two_copies(tied_embedding_model()), keep_tied=keep_tied)
    want = normalize(tied_embedding_model(), keep_tied=keep_tied)
    wiring = lambda m: [(n.op_type, n.name, list(n.input), list(n.output)) for n in m.graph.node]  # noqa: E731
    assert wiring(got) == wiring(want)
    assert init_names(got) == init_names(want) == ({"embed.weight"} if keep_tied else
                                                     {"embed.weight", "/lm_head/Transpose_output_0"})
    check_same_outputs(tied_embedding_model(), got)


def test_identical_copy_is_read_under_one_name():
    model = two_copies(tied_embedding_model(), transposed=False)
    assert dedupe_weights(model.graph) == [("embed.weight.copy", "embed.weight", False)]
    assert init_names(model) == {"embed.weight"}
    assert [n.input[0] for n in model.graph.node[:2]] == ["embed.weight", "embed.weight"]
    check_same_outputs(tied_embedding_model(), model)


def test_near_copies_and_shared_layer_weights_stay_apart():
    model = two_copies(tied_embedding_model())
    copy = next(t for t in model.graph.initializer if t.name != "embed.weight")
    value = numpy_helper.to_array(copy).copy()
    value[3, 5] = np.nextafter(value[3, 5], np.inf)  # one ulp, at an element the probes skip
    copy.CopyFrom(numpy_helper.from_array(value, copy.name))
    assert dedupe_weights(model.graph) == [] and len(model.graph.initializer) == 2
    layers = matmul_model((48, 48, 48))  # two layers with equal weights: each stays its own, quantized on its own
    layers.graph.initializer[1].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(layers.graph.initializer[0]),
                                                                 layers.graph.initializer[1].name))
    assert dedupe_weights(layers.graph) == [] and len(layers.graph.initializer) == 2


def test_candidates_are_found_from_external_data_without_loading(tmp_path, monkeypatch):
    save_model_atomic(two_copies(tied_embedding_model()), tmp_path / "m.onnx", external_data=True)
    lazy = load_model(tmp_path / "m.onnx", load_weights=False)
    assert duplicate_candidates(lazy, tmp_path) == {"embed.weight", "/lm_head/Transpose_output_0"}
    assert dedupe_weights(lazy.graph) == []  # not loaded: left alone, no error
    probed, probe = [], NORMALIZE._loaded_probe
    monkeypatch.setattr(NORMALIZE, "_loaded_probe", lambda t, flat: probed.append((t.name, len(flat))) or probe(t, flat))
    untied = load_model(tiny_llama_onnx(tmp_path), load_weights=False)  # embedding [256, 64], head [64, 256]
    assert duplicate_candidates(untied, tmp_path) == set()
    head = next(n.input[1] for n in untied.graph.node if n.name == "/lm_head/MatMul")
    # 64 elements of the table and of the head, as is and transposed; the other layers (equal shapes) are not read
    assert sorted(probed) == sorted([("model.embed_tokens.weight", 64), (head, 64)] * 2)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """The tiny tied Llama exported by optimum (one table), and the same model with the head's copy written out."""
    folder = tmp_path_factory.mktemp("tied")
    one = tiny_llama_onnx(folder, vocab=258, tied=True)
    two = one.with_name("two.onnx")
    save_model_atomic(two_copies(onnx.load(str(one))), two)
    return one, two


def _quantize(src, out, **recipe):
    quantize(src, QuantRecipe(algo="rtn", bits=4, group_size=32, **recipe), out, progress=False)
    return out


def _logits(path, ids):
    session = make_session(path)
    return session.run(["logits"], model_feeds(session, ids))[0]


def test_quantized_file_holds_one_copy(tied_llama, tmp_path, monkeypatch):
    one, two = tied_llama
    copy_bytes = 258 * 64 * 4
    assert file_size(two) - file_size(one) == pytest.approx(copy_bytes, rel=0.05)
    deduped = _quantize(two, tmp_path / "dedup.onnx")
    reference = _quantize(one, tmp_path / "one.onnx")
    monkeypatch.setattr(NORMALIZE, "dedupe_weights", lambda graph, names=None: [])
    kept = _quantize(two, tmp_path / "kept.onnx")
    assert file_size(deduped) == pytest.approx(file_size(reference), abs=256)
    assert file_size(kept) - file_size(deduped) == pytest.approx(copy_bytes, rel=0.05)
    ids = np.random.default_rng(0).integers(0, 258, (2, 16))
    np.testing.assert_allclose(_logits(deduped, ids), _logits(kept, ids), rtol=0, atol=1e-5)  # float head either way
    np.testing.assert_allclose(_logits(two, ids), _logits(one, ids), rtol=0, atol=1e-5)


def test_quantized_head_reads_no_float_copy(tied_llama, tmp_path):
    """With the head quantized too, the copy is materialized from the table and replaced by MatMulNBits."""
    one, two = tied_llama
    deduped = _quantize(two, tmp_path / "dedup.onnx", exclude=[])
    reference = _quantize(one, tmp_path / "one.onnx", exclude=[])
    model = onnx.load(str(deduped))
    head = next(n for n in model.graph.node if n.name.startswith("/lm_head/"))
    assert head.op_type == "MatMulNBits" and init_names(model) >= {"model.embed_tokens.weight"}
    assert file_size(deduped) == pytest.approx(file_size(reference), abs=256)
    ids = np.random.default_rng(0).integers(0, 258, (2, 16))
    np.testing.assert_allclose(_logits(deduped, ids), _logits(reference, ids), rtol=0, atol=1e-5)


def test_copies_in_external_data_are_loaded_and_merged(tied_llama, tmp_path):
    """The pipeline reads the likely copies from the data file before normalize and writes one table."""
    _, two = tied_llama
    src = save_model_atomic(onnx.load(str(two)), tmp_path / "src" / "model.onnx", external_data=True)
    out = _quantize(src, tmp_path / "q.onnx")
    tables = [t.name for t in onnx.load(str(out)).graph.initializer if list(t.dims) in ([258, 64], [64, 258])]
    assert tables == ["model.embed_tokens.weight"]
    ids = np.random.default_rng(0).integers(0, 258, (2, 16))
    np.testing.assert_allclose(_logits(out, ids), _logits(_quantize(two, tmp_path / "inline.onnx"), ids), atol=1e-5)
