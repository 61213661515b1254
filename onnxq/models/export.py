"""GGUF → fp32 Hugging Face folder → ONNX (optimum), cached and written atomically; model and tokenizer lookup."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from onnxq.errors import OnnxqError
from onnxq.graph.io import atomic_dir, write_text_atomic

from .registry import REGISTRY, cache_dir, get, gguf_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def _offline() -> None:
    """Never reach a hub: every load below is from local files."""
    os.environ["HF_HUB_OFFLINE"] = "1"


def hf_folder(name: str) -> Path:
    """Registry model `name` as an fp32 safetensors Hugging Face folder, converted from its GGUF once and cached."""
    final = cache_dir() / "hf" / name
    if (final / "config.json").is_file():
        fix_registry_tokenizer(final)  # caches written before the fix
        return final
    gguf = gguf_path(name)
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(final) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # transformers refuses to save a GGUF-loaded model; its weights are already dequantized fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        fix_registry_tokenizer(tmp)
        (tmp / "tokenizer.model").unlink(missing_ok=True)  # a 98 MB copy nothing here reads
    return final


# SmolLM2's own tokenizer conventions, which its GGUF conversion loses: no BOS in normal use, <|im_end|> ends a turn,
# a GPT-2 byte-level tokenizer (the conversion names it Llama, prepends <|im_start|> and chains Metaspace decoders)
_TOKENIZER_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "add_prefix_space": False}
_EOS = ("<|im_end|>", 2)
_BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


def fix_registry_tokenizer(folder: Path) -> None:
    """Give the GGUF-converted tokenizer files of a registry model in `folder` the model's own conventions (no BOS
    added, its EOS, a ByteLevel decoder, GPT2Tokenizer); idempotent: tokenizer_config.json, written last, says done."""
    cfg_path, tok_path, map_path = (folder / f for f in ("tokenizer_config.json", "tokenizer.json",
                                                         "special_tokens_map.json"))
    if not (cfg_path.is_file() and tok_path.is_file()):
        return
    cfg = json.loads(cfg_path.read_text())
    fixed = cfg | _TOKENIZER_CONFIG | {"eos_token": _with_content(cfg.get("eos_token"), _EOS[0])}
    fixed |= {"eos_token_id": _EOS[1]} if "eos_token_id" in cfg else {}
    if fixed == cfg:
        return
    tok = json.loads(tok_path.read_text())
    if (tok.get("post_processor") or {}).get("type") == "TemplateProcessing":
        tok["post_processor"] = None  # it prepends <|im_start|> to every text
    tok["decoder"] = _BYTE_LEVEL_DECODER
    _write_json(tok_path, tok)
    if map_path.is_file():
        special = json.loads(map_path.read_text())
        _write_json(map_path, special | {"eos_token": _with_content(special.get("eos_token"), _EOS[0])})
    _write_json(cfg_path, fixed)


def _with_content(token: str | dict | None, text: str) -> str | dict:
    """`text` in the form `token` has: a plain string, or an AddedToken dict with its content replaced."""
    return token | {"content": text} if isinstance(token, dict) else text


def _write_json(path: Path, data: dict) -> None:
    """Write `data` as JSON to `path` atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _registry_cache(folder: Path) -> bool:
    """Whether `folder` is a registry model's cached conversion or export (`cache_dir()/{hf,onnx}/<name>[-past]`)."""
    root, folder = cache_dir().resolve(), folder.resolve()
    return folder.parent in (root / "hf", root / "onnx") and folder.name.removesuffix("-past") in REGISTRY


def _fingerprint(folder: Path) -> str:
    """Short hash of a folder's path and its files' sizes and times, so an edited folder is exported anew."""
    h = hashlib.sha1(str(folder.resolve()).encode())
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:10]


def export_onnx(source: str | Path, out_dir: str | Path | None = None, *, with_past: bool = False) -> Path:
    """Export a registry model or a Hugging Face folder with optimum; returns `<out_dir>/model.onnx`.

    The default `out_dir` is `cache_dir()/onnx/<name>[-past]`; an existing export there is reused. A registry
    model's tokenizer files beside it follow the model's own conventions (`fix_registry_tokenizer`).
    """
    folder = Path(source)
    registry = not folder.is_dir()
    if registry:
        name = get(str(source)).name
        folder = hf_folder(name)
    else:
        name = f"{folder.name}-{_fingerprint(folder)}"
    out = Path(out_dir) if out_dir is not None else cache_dir() / "onnx" / (name + ("-past" if with_past else ""))
    if (out / "model.onnx").is_file():
        if registry:
            fix_registry_tokenizer(out)  # exports written before the fix
        return out / "model.onnx"
    if out.is_dir() and any(out.iterdir()):
        raise OnnxqError(f"output folder {out} is not empty and holds no model.onnx: give a new or empty folder")
    if not (folder / "config.json").is_file():
        raise OnnxqError(f"{folder} is not a Hugging Face model folder (no config.json): give a folder from save_pretrained")
    _offline()
    from optimum.exporters.onnx import main_export

    task = "text-generation-with-past" if with_past else "text-generation"
    with atomic_dir(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch tracer chatter about shapes; the result is checked by perplexity
        try:
            main_export(str(folder), output=tmp, task=task, local_files_only=True, do_validation=False)
        except Exception as err:  # optimum raises many types; the user needs one line
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise OnnxqError(f"ONNX export of {folder} failed ({type(err).__name__}: {msg}): "
                             "check that it is a causal LM that optimum supports") from err
        if registry:
            fix_registry_tokenizer(tmp)
    return out / "model.onnx"


def resolve_model(spec: str | Path) -> Path:
    """A .onnx file, a folder holding model.onnx, a Hugging Face folder (exported) or a registry name (exported)."""
    path = Path(spec)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise OnnxqError(f"model file '{spec}' not found or not a file: give an existing .onnx file")
        return path
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        if (path / "config.json").is_file():
            return export_onnx(path)
        raise OnnxqError(f"folder '{spec}' holds neither model.onnx nor a Hugging Face config.json: give a model folder")
    return export_onnx(get(str(spec)).name)


def _vocab_size(model_path: Path) -> int | None:
    """Last dimension of the model's logits output, if static (read without the weights)."""
    from ..graph.io import load_weightless

    model = load_weightless(model_path)[0]
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None


def _knowing_vocab(tokenizer, model_path: Path):
    """`tokenizer` told the model's vocabulary size, so special tokens a tokenizer class invents beyond it (a Llama
    class guessed from config.json adds "<s>" to a byte vocabulary) are not taken as the model's BOS."""
    try:
        tokenizer.onnxq_model_vocab = _vocab_size(model_path) if model_path.is_file() else None
    except Exception:  # an unreadable model is reported by whoever loads it; here it only means no limit
        tokenizer.onnxq_model_vocab = None
    return tokenizer


def load_tokenizer(model_path: str | Path) -> PreTrainedTokenizerFast:
    """Tokenizer saved beside the .onnx file, else that of the registry model with the same vocabulary size."""
    path = Path(model_path)
    if path.is_dir():
        path = path / "model.onnx"
    folder = path.parent
    _offline()
    from transformers import AutoTokenizer

    if _registry_cache(folder):
        fix_registry_tokenizer(folder)  # caches written before the fix
    if (folder / "tokenizer.json").is_file():
        if (folder / "tokenizer_config.json").is_file() or (folder / "config.json").is_file():
            return _knowing_vocab(AutoTokenizer.from_pretrained(folder, local_files_only=True), path)
        # tokenizer.json alone: AutoTokenizer would guess the class from the folder's name
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        except Exception as err:  # tokenizers raises its own exception type for a corrupt file
            raise OnnxqError(f"cannot read {folder / 'tokenizer.json'} ({type(err).__name__}): copy a valid "
                             "tokenizer.json of the source model") from None
    if path.is_file():
        vocab = _vocab_size(path)
        for entry in REGISTRY.values():
            if entry.vocab_size == vocab:
                return AutoTokenizer.from_pretrained(hf_folder(entry.name), local_files_only=True)
    raise OnnxqError(f"no tokenizer for {path}: copy the source model's tokenizer.json and tokenizer_config.json "
                     f"into {folder}")
