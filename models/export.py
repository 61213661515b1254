"""GGUF → fp32 Hugging Face folder → ONNX (optimum), cached and written atomically; model and tokenizer lookup."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import onnx

from onnxq.errors import OnnxqError

from .registry import REGISTRY, cache_dir, get, gguf_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def _offline() -> None:
    """Never reach a hub: every load below is from local files."""
    os.environ["HF_HUB_OFFLINE"] = "1"


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; it becomes `final` only if the body completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        yield tmp
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # else a concurrent run finished the same folder first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hf_folder(name: str) -> Path:
    """Registry model `name` as an fp32 safetensors Hugging Face folder, converted from its GGUF once and cached."""
    final = cache_dir() / "hf" / name
    if (final / "config.json").is_file():
        return final
    gguf = gguf_path(name)
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _atomic_dir(final) as tmp:
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
        (tmp / "tokenizer.model").unlink(missing_ok=True)  # a 98 MB copy nothing here reads
    return final


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

    The default `out_dir` is `cache_dir()/onnx/<name>[-past]`; an existing export there is reused.
    """
    folder = Path(source)
    if folder.is_dir():
        name = f"{folder.name}-{_fingerprint(folder)}"
    else:
        name = get(str(source)).name
        folder = hf_folder(name)
    out = Path(out_dir) if out_dir is not None else cache_dir() / "onnx" / (name + ("-past" if with_past else ""))
    if (out / "model.onnx").is_file():
        return out / "model.onnx"
    if out.is_dir() and any(out.iterdir()):
        raise OnnxqError(f"output folder {out} is not empty and holds no model.onnx: give a new or empty folder")
    if not (folder / "config.json").is_file():
        raise OnnxqError(f"{folder} is not a Hugging Face model folder (no config.json): give a folder from save_pretrained")
    _offline()
    from optimum.exporters.onnx import main_export

    task = "text-generation-with-past" if with_past else "text-generation"
    with _atomic_dir(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch tracer chatter about shapes; the result is checked by perplexity
        try:
            main_export(str(folder), output=tmp, task=task, local_files_only=True, do_validation=False)
        except Exception as err:  # optimum raises many types; the user needs one line
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise OnnxqError(f"ONNX export of {folder} failed ({type(err).__name__}: {msg}): "
                             "check that it is a causal LM that optimum supports") from err
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
    """Last dimension of the model's logits output, if static."""
    model = onnx.load(str(model_path), load_external_data=False)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None


def load_tokenizer(model_path: str | Path) -> PreTrainedTokenizerFast:
    """Tokenizer saved beside the .onnx file, else that of the registry model with the same vocabulary size."""
    path = Path(model_path)
    if path.is_dir():
        path = path / "model.onnx"
    folder = path.parent
    _offline()
    from transformers import AutoTokenizer

    if (folder / "tokenizer.json").is_file():
        if (folder / "tokenizer_config.json").is_file() or (folder / "config.json").is_file():
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
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
