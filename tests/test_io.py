"""load_model's one-line errors, atomic saves with and without external data, weight detaching, provenance."""
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from onnxq.graph import io
from onnxq.errors import OnnxqError
from onnxq.graph.io import load_model, restore_weights, save_model_atomic, strip_weights
from onnxq.graph.metadata import add_provenance, read_provenance
from tests.tiny import matmul_model


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert [n.name for n in a.graph.node] == [n.name for n in b.graph.node]


def one_line_error(call, match: str) -> str:
    with pytest.raises(OnnxqError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.fixture
def external(tmp_path):
    """A model saved with its weights in model.onnx.data."""
    path = tmp_path / "model.onnx"
    save_model_atomic(matmul_model(), path, external_data=True)
    return path


def test_missing_file(tmp_path):
    one_line_error(lambda: load_model(tmp_path / "nope.onnx"), "not found")
    one_line_error(lambda: load_model(tmp_path), "is a folder")


@pytest.mark.parametrize("content", [b"\xff\xfe garbage \x00\x01" * 50, b"", b"hello, I am a text file\n"])
def test_not_onnx(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    one_line_error(lambda: load_model(path), "not (a readable ONNX|an ONNX) model")


def test_truncated(tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(matmul_model().SerializeToString()[:5000])
    one_line_error(lambda: load_model(path), "truncated or not ONNX")


def test_missing_external_data(external):
    (external.parent / "model.onnx.data").unlink()
    message = one_line_error(lambda: load_model(external), "missing")
    assert "model.onnx.data" in message
    lazy = load_model(external, load_weights=False)  # the graph alone still loads
    assert any(uses_external_data(t) for t in lazy.graph.initializer)


def test_truncated_external_data(external):
    data = external.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    one_line_error(lambda: load_model(external), "external data")


def test_round_trip(tmp_path):
    model = matmul_model()
    assert save_model_atomic(model, tmp_path / "sub" / "m.onnx") == tmp_path / "sub" / "m.onnx"
    assert_same(load_model(tmp_path / "sub" / "m.onnx"), model)
    assert sorted(os.listdir(tmp_path / "sub")) == ["m.onnx"]


def test_external_data_round_trip(external):
    assert sorted(os.listdir(external.parent)) == ["model.onnx", "model.onnx.data"]
    graph_only = onnx.load(str(external), load_external_data=False)
    assert all(uses_external_data(t) for t in graph_only.graph.initializer)
    assert external.stat().st_size < 2000 < (external.parent / "model.onnx.data").stat().st_size
    model = load_model(external)
    assert_same(model, matmul_model())
    x = np.ones((1, 2, 80), np.float32)
    by_path = ort.InferenceSession(str(external)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(by_path, ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0])


def test_saving_leaves_the_model_unchanged(tmp_path):
    model = matmul_model()
    save_model_atomic(model, tmp_path / "m.onnx", external_data=True)
    assert not any(uses_external_data(t) for t in model.graph.initializer)
    assert model.SerializeToString() == matmul_model().SerializeToString()


def test_external_data_chosen_by_size(tmp_path, monkeypatch):
    save_model_atomic(matmul_model(), tmp_path / "small.onnx")
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    save_model_atomic(matmul_model(), tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data", "small.onnx"]


@pytest.mark.parametrize("external_data", [False, True])
@pytest.mark.parametrize("broken", ["replace", "fsync"])
def test_failed_save_leaves_no_temp_files(tmp_path, monkeypatch, external_data, broken):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, broken, fail)
    model = matmul_model()
    one_line_error(lambda: save_model_atomic(model, target, external_data=external_data), "cannot write .*No space left")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"] and target.read_bytes() == b"previous"
    assert model.SerializeToString() == matmul_model().SerializeToString()  # weights put back


def test_text_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "calib.txt"
    io.write_text_atomic(target, "naïve text\n")
    assert target.read_text(encoding="utf-8") == "naïve text\n"
    monkeypatch.setattr(io.os, "replace", lambda *_: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        io.write_text_atomic(target, "new")
    assert os.listdir(target.parent) == ["calib.txt"] and target.read_text(encoding="utf-8") == "naïve text\n"


def test_refuses_to_overwrite_the_source(external):
    before = external.read_bytes()
    one_line_error(lambda: save_model_atomic(load_model(external), external, source=external), "is the input model")
    assert external.read_bytes() == before


def test_refuses_unloaded_external_weights(external, tmp_path):
    lazy = load_model(external, load_weights=False)
    one_line_error(lambda: save_model_atomic(lazy, tmp_path / "copy.onnx"), "not loaded")


def test_strip_and_restore_weights():
    model = matmul_model()
    payloads = strip_weights(model)
    assert set(payloads) == {"layers.0.weight", "layers.1.weight"}
    assert model.ByteSize() < 1000
    restore_weights(model, payloads)
    assert model.SerializeToString() == matmul_model().SerializeToString()


def test_provenance_survives_a_save(tmp_path):
    model = matmul_model()
    model.metadata_props.add(key="author", value="someone")
    info = {"algorithm": "gptq", "bits": 4, "sym": False, "text": "4", "damp": 0.01, "layers": np.int64(14),
            "calibration": {"windows": 32, "seq_len": 512}, "exclude": ["lm_head"], "note": None}
    add_provenance(model, info)
    add_provenance(model, {"bits": 3})
    props = {p.key: p.value for p in model.metadata_props}
    assert props["onnxq.algorithm"] == "gptq" and props["onnxq.bits"] == "3" and props["onnxq.text"] == '"4"'
    assert props["onnxq.calibration"] == '{"seq_len": 512, "windows": 32}' and props["author"] == "someone"
    save_model_atomic(model, tmp_path / "m.onnx")
    assert read_provenance(load_model(tmp_path / "m.onnx")) == info | {"bits": 3}


# ---- weightless loading: inline weights stay in the file until read --------------------------------------------


@pytest.fixture
def inline(tmp_path):
    """A small decoder saved with its weights inline, with metadata after the graph."""
    from tests.tiny import small

    model = small()
    model.metadata_props.add(key="author", value="someone")
    path = tmp_path / "src" / "model.onnx"
    save_model_atomic(model, path)
    return path


def test_weightless_load_leaves_the_weights_in_the_file(inline):
    lazy, store = io.load_weightless(inline)
    full = load_model(inline)
    assert isinstance(store.memory, io.FileSpans) and len(store.memory) == 16  # 14 projections, embedding, head
    assert lazy.ByteSize() < full.ByteSize() // 10
    for t in lazy.graph.initializer:
        want = next(u for u in full.graph.initializer if u.name == t.name)
        np.testing.assert_array_equal(io.read_array(t, store), numpy_helper.to_array(want))
    assert lazy.SerializeToString() == io.detach_weights(full)[0].SerializeToString()  # as detaching them gives


@pytest.mark.parametrize("external_data", [None, False, True])
def test_saving_detached_weights_writes_the_same_file(inline, tmp_path, external_data):
    """Tensors left in the source file are spliced into the output as if put back with restore_weights."""
    lazy, store = io.load_weightless(inline)
    lazy.graph.initializer.append(numpy_helper.from_array(np.arange(600, dtype=np.float32), "extra"))
    before = lazy.SerializeToString()
    save_model_atomic(lazy, tmp_path / "lazy" / "m.onnx", weights=store, external_data=external_data)
    assert lazy.SerializeToString() == before
    full = load_model(inline)
    full.graph.initializer.append(numpy_helper.from_array(np.arange(600, dtype=np.float32), "extra"))
    save_model_atomic(full, tmp_path / "full" / "m.onnx", external_data=external_data)
    names = sorted(os.listdir(tmp_path / "full"))
    assert names == sorted(os.listdir(tmp_path / "lazy")) == (["m.onnx", "m.onnx.data"] if external_data else ["m.onnx"])
    for name in names:
        assert (tmp_path / "lazy" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_size_threshold_counts_detached_weights(inline, tmp_path, monkeypatch):
    lazy, store = io.load_weightless(inline)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", inline.stat().st_size - 1)
    save_model_atomic(lazy, tmp_path / "m.onnx", weights=store)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "src"]


@pytest.mark.parametrize("content", [b"\xff\xfe garbage \x00\x01" * 50, b"", b"hello, I am a text file\n"])
def test_weightless_load_of_a_bad_file_fails_as_load_model_does(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    one_line_error(lambda: io.load_weightless(path), "not (a readable ONNX|an ONNX) model")
    path.write_bytes(matmul_model().SerializeToString()[:5000])
    one_line_error(lambda: io.load_weightless(path), "truncated or not ONNX")


def test_released_tensors_go_back_to_the_file(inline):
    lazy, store = io.load_weightless(inline)
    names = [t.name for t in lazy.graph.initializer if store.detached(t)][:2]
    io.load_tensor_data([t for t in lazy.graph.initializer if t.name in names], store)
    for name in names:
        del store.memory[name]
    changed = next(t for t in lazy.graph.initializer if t.name == names[1])
    changed.raw_data = bytes(len(changed.raw_data))
    lazy = store.release(lazy)
    assert names[0] in store.memory.spans and store.memory.held.keys() == {names[1]}
    assert all(store.detached(t) for t in lazy.graph.initializer if t.name in names)


def test_a_transpose_of_a_file_matrix_is_read_from_the_file(inline, tmp_path, monkeypatch):
    """A head made from its embedding (or any matrix equal to another's transpose) is not held after release."""
    monkeypatch.setattr(io, "_SLAB", 256)  # several slabs per matrix
    lazy, store = io.load_weightless(inline)
    full = load_model(inline)
    arrays = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
    almost = arrays["model.embed_tokens.weight"].T.copy()
    almost[-1, -1] += 1
    made = {"head": arrays["model.embed_tokens.weight"].T, "k_t": arrays["/model/layers.1/self_attn/k_proj.weight"].T,
            "almost": almost}
    for model in (lazy, full):
        model.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in made.items())
    lazy = store.release(lazy)
    assert store.memory.transposes.keys() == {"head", "k_t"} and store.memory.held.keys() == {"almost"}
    assert store.memory.transposes["k_t"][0] == "/model/layers.1/self_attn/k_proj.weight"
    for t in lazy.graph.initializer:
        if t.name in made:
            assert io.read_array(t, store).tobytes() == np.ascontiguousarray(made[t.name]).tobytes()
            assert store.memory[t.name] == np.ascontiguousarray(made[t.name]).tobytes()
    save_model_atomic(lazy, tmp_path / "lazy.onnx", weights=store)
    save_model_atomic(full, tmp_path / "full.onnx")
    assert (tmp_path / "lazy.onnx").read_bytes() == (tmp_path / "full.onnx").read_bytes()


def test_a_few_bytes_of_a_transpose_are_read_without_building_it(inline, monkeypatch):
    """A probe of a transposed entry reads its elements from the origin matrix; a long read builds the transpose."""
    lazy, store = io.load_weightless(inline)
    table = numpy_helper.to_array(next(t for t in load_model(inline).graph.initializer
                                       if t.name == "model.embed_tokens.weight"))
    lazy.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), "head"))
    store.release(lazy)
    expected = np.ascontiguousarray(table.T).tobytes()
    built = []
    monkeypatch.setattr(store.memory, "transposed", lambda n: built.append(n) or io.FileSpans.transposed(store.memory, n))
    for start, size in [(0, 4), (6, 5), (4 * table.shape[0] - 2, 9), (len(expected) - 3, 10)]:
        assert store.memory.read("head", start, size) == expected[start : start + size]
    assert built == []
    assert store.memory.read("head", 10, 4 * io._FEW + 8) == expected[10 : 10 + 4 * io._FEW + 8] and built == ["head"]


@pytest.mark.parametrize("path, suffix, replaces, expected", [
    ("out/w3-d0.1", ".json", (".json", ".md"), "out/w3-d0.1.json"),  # a dot inside a name stays
    ("out/r.json", ".md", (".json", ".md"), "out/r.md"),  # a given ending is replaced
    ("out/smollm2-v1.5", ".calib.txt", (".onnx",), "out/smollm2-v1.5.calib.txt"),  # a folder output
    ("out/q.onnx", ".calib.txt", (".onnx",), "out/q.calib.txt"),
])
def test_sibling_paths_add_their_suffix(path, suffix, replaces, expected):
    assert io.sibling_path(path, suffix, replaces) == Path(expected)


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.onnx").write_text(text)
    return path


@pytest.mark.parametrize("replace", [True, False])
def test_a_failed_folder_write_leaves_nothing_and_keeps_the_earlier_folder(tmp_path, replace):
    earlier = _folder(tmp_path / "out", "earlier")
    with pytest.raises(RuntimeError), io.atomic_dir(earlier, replace=replace) as tmp:
        (tmp / "model.onnx").write_text("half")
        raise RuntimeError("solver failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (earlier / "model.onnx").read_text() == "earlier"


def test_an_output_folder_replaces_the_earlier_one_and_a_cache_keeps_it(tmp_path):
    for replace, kept in ((True, "new"), (False, "earlier")):
        final = _folder(tmp_path / str(replace), "earlier")
        with io.atomic_dir(final, replace=replace) as tmp:
            (tmp / "model.onnx").write_text("new")
        assert (final / "model.onnx").read_text() == kept
    with io.atomic_dir(tmp_path / "empty-then-new") as tmp:  # an empty folder is no finished cache
        (tmp_path / "empty-then-new").mkdir()
        (tmp / "model.onnx").write_text("new")
    assert (tmp_path / "empty-then-new" / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["False", "True", "empty-then-new"]  # no temp folder left


def test_an_output_whose_final_rename_fails_puts_the_earlier_folder_back(tmp_path, monkeypatch):
    earlier = _folder(tmp_path / "out", "earlier")
    real = os.replace

    def failing(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"), io.atomic_dir(earlier, replace=True) as tmp:
        (tmp / "model.onnx").write_text("new")
    assert (earlier / "model.onnx").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
