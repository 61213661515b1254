"""`--calib self`: windows sampled from the float model are reproducible, the sampler draws what it should, the KV-cache
loop computes the full forward, and a quantize run on them is byte-identical for a fixed seed."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxq.cli import app
from onnxq.errors import OnnxqError
from onnxq.models.export import export_onnx
from onnxq.graph.metadata import read_provenance
from onnxq.pipeline import quantize
from onnxq.recipe import QuantRecipe
from onnxq.runtime.session import make_session, model_feeds
from onnxq.calibrate.selfcalib import (
    RECOMPUTE_MAX_LEN, STARTS, TEMPERATURE, TOP_K, generate_windows, make_stepper, sample,
)
from tests.tiny import byte_tokenizer, tiny_llama_hf, tiny_llama_onnx


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny tied Llama HF folder (byte tokenizer, no BOS added); its exports go to a module-wide temp cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNXQ_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield tiny_llama_hf(tmp_path_factory.mktemp("hf"))


def test_windows_are_reproducible_text_from_a_start(hf):
    a, seconds = generate_windows(hf, 6, 24, seed=0)
    b, _ = generate_windows(hf, 6, 24, seed=0)
    c, _ = generate_windows(hf, 6, 24, seed=1)
    assert a.shape == (6, 24) and a.dtype == np.int64 and seconds > 0
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 2 and a.max() < 258  # byte tokens only: <s> (0) and </s> (1) are never sampled
    starts = [byte_tokenizer()(w, add_special_tokens=False)["input_ids"] for w in STARTS]  # the tokenizer adds no BOS
    assert all(any(list(row[:len(s)]) == s for s in starts) for row in a.tolist())
    given, _ = generate_windows(hf, 2, 8, seed=0, start_ids=[5, 6])
    assert (given[:, :2] == [5, 6]).all()


def test_sampling_shows_progress_without_changing_the_windows(hf, capsys):
    quiet, _ = generate_windows(hf, 2, 12, seed=0)
    assert "sampling calibration" not in capsys.readouterr().err
    shown, _ = generate_windows(hf, 2, 12, seed=0, progress=True)
    assert "sampling calibration" in capsys.readouterr().err and np.array_equal(quiet, shown)


def test_windows_start_with_the_bos_the_tokenizer_adds(hf, tmp_path):
    folder = tiny_llama_hf(tmp_path)
    byte_tokenizer(bos=True).save_pretrained(folder)
    w, _ = generate_windows(folder, 3, 16, seed=0)
    assert (w[:, 0] == 0).all() and w[:, 1:].min() >= 2


def test_sampling_keeps_top_k_and_temperature():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(20).astype(np.float32) * 3
    draws = sample(np.tile(logits, (50_000, 1)), np.random.default_rng(1), temperature=0.7, top_k=5)
    top = np.argsort(-logits)[:5]
    p = np.exp((logits[top] - logits[top].max()) / 0.7)
    p /= p.sum()
    assert set(draws.tolist()) <= set(top.tolist())
    freq = np.array([(draws == t).mean() for t in top])
    assert np.abs(freq - p).max() < 0.01
    banned = sample(np.tile(logits, (2000, 1)), rng, temperature=1.0, top_k=5, banned=top[:2].tolist())
    assert set(banned.tolist()) <= set(np.argsort(-logits)[2:7].tolist())
    greedy = sample(np.tile(logits, (1000, 1)), rng, temperature=1e-3, top_k=20)
    assert (greedy == logits.argmax()).all()


def test_top_k_zero_samples_the_whole_distribution():
    logits = np.linspace(-1.0, 1.0, 8)
    draws = sample(np.tile(logits, (80_000, 1)), np.random.default_rng(2), temperature=1.0, top_k=0, banned=[7])
    p = np.exp(logits[:7]) / np.exp(logits[:7]).sum()
    freq = np.array([(draws == t).mean() for t in range(8)])
    assert freq[7] == 0 and np.abs(freq[:7] - p).max() < 0.01


def test_cached_steps_equal_the_full_forward(hf):
    ids = np.random.default_rng(0).integers(2, 258, (2, 12))
    full = _full_logits(export_onnx(hf), ids)
    for session in (make_session(export_onnx(hf, with_past=True)), make_session(export_onnx(hf))):
        step = make_stepper(session, ids.shape[1])
        steps = np.stack([step(ids[:, t]) for t in range(ids.shape[1])], axis=1)
        assert np.abs(steps - full).max() < 1e-4


def test_graph_without_cache_recomputes_short_windows_only(tmp_path):
    path = tiny_llama_onnx(tmp_path, vocab=258)
    byte_tokenizer().save_pretrained(path.parent)
    w, _ = generate_windows(path, 2, 16, seed=0)
    assert w.shape == (2, 16)
    with pytest.raises(OnnxqError, match="without KV cache"):
        generate_windows(path, 2, RECOMPUTE_MAX_LEN + 1, seed=0)


def test_quantize_on_self_generated_windows_is_reproducible(hf, tmp_path):
    recipe = lambda: QuantRecipe(algo="gptq", bits=4, group_size=32, calib_windows=4, calib_seq_len=32)  # noqa: E731
    reps = [quantize(str(hf), recipe(), tmp_path / f"q{i}.onnx", calib="self", progress=False) for i in range(2)]
    assert (tmp_path / "q0.onnx").read_bytes() == (tmp_path / "q1.onnx").read_bytes()
    rep = reps[0]
    assert rep.calib_text == reps[1].calib_text and rep.calib_text.count("--- window ") == 4
    assert 0 < rep.calib_generation_seconds <= rep.total_seconds and rep.calib_tokens == 4 * 32
    calibration = read_provenance(onnx.load(str(tmp_path / "q0.onnx")))["calibration"]
    assert calibration == {"text": "self", "windows": 4, "seq_len": 32, "seed": 0, "temperature": TEMPERATURE,
                           "top_k": TOP_K}


def test_cli_writes_the_generated_text_beside_the_output(hf, tmp_path):
    out = tmp_path / "q.onnx"
    args = ["quantize", str(hf), "-o", str(out), "--algo", "gptq", "--calib", "self", "--calib-windows", "2",
            "--calib-seq-len", "16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "q.calib.txt").read_text(encoding="utf-8")
    assert text.startswith("--- window 1 ---\n") and text.count("--- window ") == 2
    assert read_provenance(onnx.load(str(out)))["calibration"]["text"] == "self"


def test_cli_keeps_the_dots_of_a_report_stem(hf, tmp_path):
    """`--report out/w3-d0.1` writes w3-d0.1.json/.md/.calib.txt, not w3-d0.* (a dot is not an extension there)."""
    args = ["quantize", str(hf), "-o", str(tmp_path / "q-v1.5.onnx"), "--algo", "gptq", "--calib", "self",
            "--calib-windows", "2", "--calib-seq-len", "16", "--report", str(tmp_path / "w3-d0.1")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("w3-*")) == ["w3-d0.1.calib.txt", "w3-d0.1.json", "w3-d0.1.md"]


def _full_logits(path, ids: np.ndarray) -> np.ndarray:
    session = make_session(path)
    return session.run(["logits"], model_feeds(session, ids))[0]
