"""Sessions, feeds, perplexity against torch, output error and file size on a tiny random Llama."""
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from transformers import LlamaConfig, LlamaForCausalLM

from onnxq.errors import OnnxqError
from onnxq.models.export import export_onnx
from onnxq.runtime.evaluate import file_size, output_error, perplexity
from onnxq.runtime.session import make_session, model_feeds, providers_for

VOCAB = 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer GQA Llama with peaked logits, its HF folder and its ONNX exports with and without past."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "hf")
    return model, export_onnx(root / "hf", root / "onnx"), export_onnx(root / "hf", root / "past", with_past=True)


@pytest.fixture
def windows():
    return np.random.default_rng(0).integers(0, VOCAB, (3, 24), dtype=np.int64)


def torch_perplexity(model, windows: np.ndarray, context: int = 1) -> float:
    """Reference: each row a fresh sequence, tokens context..L-1 predicted, NLL pooled over rows."""
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        logits = model(ids).logits.double()
    return math.exp(torch.nn.functional.cross_entropy(logits[:, context - 1:-1].reshape(-1, VOCAB),
                                                      ids[:, context:].reshape(-1)))


def test_perplexity_matches_torch(tiny, windows):
    model, path, past_path = tiny
    ref = torch_perplexity(model, windows)
    assert perplexity(path, windows) == pytest.approx(ref, rel=1e-4)
    assert perplexity(past_path, windows) == pytest.approx(ref, rel=1e-4)  # empty past fed correctly
    assert perplexity(path, windows[:1]) == pytest.approx(torch_perplexity(model, windows[:1]), rel=1e-4)


def test_perplexity_skips_the_context_tokens(tiny, windows):
    """Windows that start with a tokenizer's prefix ids (context 3 here) never score predictions of them."""
    model, path, _ = tiny
    assert perplexity(path, windows, context=3) == pytest.approx(torch_perplexity(model, windows, 3), rel=1e-4)
    for context in (0, 24):
        with pytest.raises(OnnxqError, match="leaves nothing to predict"):
            perplexity(path, windows, context=context)


def test_feeds_for_a_with_past_model(tiny):
    session = make_session(tiny[2])
    feeds = model_feeds(session, np.array([[5, 6, 7]]))
    np.testing.assert_array_equal(feeds["position_ids"], [[0, 1, 2]])
    np.testing.assert_array_equal(feeds["attention_mask"], [[1, 1, 1]])
    past = {k: v.shape for k, v in feeds.items() if k.startswith("past_key_values")}
    assert len(past) == 4 and set(past.values()) == {(1, 2, 0, 16)}  # 2 layers × key/value, 2 KV heads, head_dim 16


def test_output_error_of_a_model_with_itself_is_zero(tiny, windows):
    err = output_error(tiny[1], tiny[1], windows)
    assert err == {"rel_l2": 0.0, "max_abs": 0.0, "top1_agreement": 1.0, "tokens": windows.size}


def test_output_error_sees_a_perturbed_weight(tiny, windows):
    proto = onnx.load(str(tiny[1]))
    inits = {i.name: i for i in proto.graph.initializer}
    init = next(inits[n.input[1]] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    err = output_error(tiny[1], proto, windows)
    assert err["rel_l2"] > 1e-3 and err["max_abs"] > 0 and err["top1_agreement"] <= 1.0
    assert perplexity(proto, windows) != pytest.approx(perplexity(tiny[1], windows), rel=1e-4)


def test_bad_windows_are_rejected(tiny):
    with pytest.raises(OnnxqError):
        perplexity(tiny[1], np.zeros((0, 8), dtype=np.int64))
    with pytest.raises(OnnxqError):
        perplexity(tiny[1], np.zeros((2, 1), dtype=np.int64))


def test_providers():
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(OnnxqError, match="unknown execution provider"):
        providers_for("tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(OnnxqError, match="onnxruntime-gpu"):
            providers_for("cuda")


def test_make_session_missing_file(tmp_path):
    with pytest.raises(OnnxqError, match="not found"):
        make_session(tmp_path / "nope.onnx")


def test_file_size_counts_external_data(tiny, tmp_path):
    assert file_size(tiny[1]) == tiny[1].stat().st_size
    proto = onnx.load(str(tiny[1]))
    onnx.save_model(proto, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    graph_only = (tmp_path / "ext.onnx").stat().st_size
    assert file_size(tmp_path / "ext.onnx") == graph_only + (tmp_path / "ext.onnx.data").stat().st_size
    assert graph_only < tiny[1].stat().st_size / 2  # the weights really moved out


def test_perplexity_with_ort_fusion_off(tiny, windows, tmp_path):
    """QDQ runs fused into int8-activation MatMulNBits by default; with QDQSelectorActionTransformer disabled it
    computes exactly what the same codes written as MatMulNBits at accuracy_level 0 compute."""
    from onnxq import QuantRecipe
    from onnxq.pipeline import quantize

    _, path, _ = tiny
    for fmt in ("qdq", "nbits"):
        quantize(path, QuantRecipe(algo="rtn", bits=4, group_size=32, format=fmt), tmp_path / f"{fmt}.onnx", progress=False)
    exact = perplexity(tmp_path / "nbits.onnx", windows)
    unfused = perplexity(tmp_path / "qdq.onnx", windows, disabled_optimizers=["QDQSelectorActionTransformer"])
    fused = perplexity(tmp_path / "qdq.onnx", windows)
    assert unfused == pytest.approx(exact, rel=1e-5)
    assert abs(fused - exact) > 1e-5 * exact


@pytest.fixture(scope="module")
def bos_llama(tmp_path_factory):
    """The tiny Llama (vocab 258) with a byte tokenizer that puts <s> (id 0) before every text, as Llama's do."""
    from tests.tiny import byte_tokenizer, tiny_llama_onnx

    path = tiny_llama_onnx(tmp_path_factory.mktemp("bos"), vocab=258)
    byte_tokenizer(bos=True).save_pretrained(path.parent)
    return path


def test_eval_windows_start_with_the_tokenizer_s_bos(bos_llama):
    from onnxq.models.export import load_tokenizer
    from onnxq.report import evaluate
    from onnxq.calibrate.textdata import load_text, token_windows

    rep = evaluate(bos_llama, tokens=96, seq_len=32)
    windows = token_windows(load_tokenizer(bos_llama), load_text("sotu-eval"), 32, 3)
    assert (windows[:, 0] == 0).all() and rep.tokens == windows.size
    assert rep.special_tokens and rep.prefix == [0] and rep.to_dict()["prefix"] == [0]
    assert rep.float.ppl == pytest.approx(perplexity(bos_llama, windows), rel=1e-9)  # BOS never predicted
    assert "prefix ids [0]" in rep.markdown()
    off = evaluate(bos_llama, tokens=96, seq_len=32, special_tokens=False)
    assert not off.special_tokens and off.prefix == [] and "no special tokens" in off.markdown()
    assert off.float.ppl != pytest.approx(rep.float.ppl, rel=1e-6)


@pytest.mark.parametrize("flag,special,prefix", [([], True, [0]), (["--no-special-tokens"], False, [])])
def test_cli_eval_records_the_special_tokens(bos_llama, tmp_path, flag, special, prefix):
    import json

    from typer.testing import CliRunner

    from onnxq.cli import app

    res = CliRunner().invoke(app, ["eval", str(bos_llama), "--tokens", "64", "--seq-len", "32", *flag,
                                   "--report", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["special_tokens"] is special and data["prefix"] == prefix
