"""Loading and atomic saving of ONNX models (with external data), and detaching weights for proto-copying passes."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model, uses_external_data

from .errors import OnnxqError

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of serialized proto above which weights go to "<name>.data"
_MIN_EXTERNAL_BYTES = 1024  # smaller tensors stay inside the .onnx file
_ALIGN = 4096  # external tensors start on page boundaries (lets ORT memory-map them)


def load_model(path: str | os.PathLike, *, load_weights: bool = True) -> onnx.ModelProto:
    """Read an .onnx file; with `load_weights`, external data is read from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise OnnxqError(f"model file not found: {path} (pass the path of an existing .onnx file)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError) as err:
        raise OnnxqError(f"{path} is not a readable ONNX model (truncated or not ONNX): {one_line(err)}") from None
    if not model.HasField("graph") or not model.opset_import:
        raise OnnxqError(f"{path} is not an ONNX model (no graph or opset import): re-export it")
    if load_weights:
        _load_external_data(model, path)
    return model


def save_model_atomic(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write `model` to `path` through temp files in the same folder and `os.replace`; return the path.

    Weights go to one "<name>.data" file next to it when `external_data` is true, or (None) when the proto is
    larger than EXTERNAL_DATA_THRESHOLD. `source` is the path the model was read from; writing over it is refused.
    `model` is unchanged afterwards; on any failure no temp file is left behind.
    """
    path = Path(path)
    if source is not None and path.resolve() == Path(source).resolve():
        raise OnnxqError(f"output {path} is the input model: choose a different output path")
    if any(uses_external_data(t) for t in _get_all_tensors(model)):
        raise OnnxqError("the model's external weights are not loaded: load it with load_weights=True before saving")
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    temps: list[str] = []
    payloads: dict[str, bytes] = {}
    try:
        renames = []
        if external_data:
            data_path = path.with_name(path.name + ".data")
            temps.append(_temp_name(data_path))
            _write_external(model, temps[-1], data_path.name, payloads)
            renames.append((temps[-1], data_path))
        temps.append(_temp_name(path))
        with open(temps[-1], "xb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        renames.append((temps[-1], path))
        for tmp, final in renames:
            os.replace(tmp, final)
    except (OSError, ValueError) as err:
        raise OnnxqError(f"cannot write {path}: {one_line(err)}") from None
    finally:
        restore_weights(model, payloads)
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
    return path


def strip_weights(model: onnx.ModelProto, min_bytes: int = _MIN_EXTERNAL_BYTES) -> dict[str, bytes]:
    """Move the raw data of initializers >= min_bytes out of `model` (so copying passes stay small and < 2 GB)."""
    payloads = {}
    for t in _large_initializers(model, min_bytes):
        payloads[t.name] = t.raw_data
        t.ClearField("raw_data")
    return payloads


def restore_weights(model: onnx.ModelProto, payloads: dict[str, bytes]) -> None:
    """Put back what `strip_weights` (or an external-data save) took out, by initializer name."""
    if not payloads:
        return
    for t in model.graph.initializer:
        if t.name in payloads:
            del t.external_data[:]
            t.ClearField("data_location")
            t.raw_data = payloads[t.name]


def _write_external(model: onnx.ModelProto, tmp_data: str, location: str, payloads: dict[str, bytes]) -> None:
    """Write large initializers to `tmp_data` and point them at `location`; their bytes go to `payloads`."""
    with open(tmp_data, "xb") as f:
        for t in _large_initializers(model, _MIN_EXTERNAL_BYTES):
            offset = -(-f.tell() // _ALIGN) * _ALIGN
            f.seek(offset)
            data = payloads[t.name] = t.raw_data
            f.write(data)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
        f.flush()
        os.fsync(f.fileno())


def _large_initializers(model: onnx.ModelProto, min_bytes: int) -> Iterator[onnx.TensorProto]:
    return (t for t in model.graph.initializer if t.HasField("raw_data") and t.ByteSize() >= min_bytes)


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    for loc in sorted(locations):
        if not (path.parent / loc).is_file():
            raise OnnxqError(f"external data file {loc!r} of {path.name} is missing: keep it next to the .onnx file")
    try:
        load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as err:
        raise OnnxqError(f"cannot read the external data of {path}: {one_line(err)}") from None


def _temp_name(final: Path) -> str:
    """A fresh hidden name next to `final` (opened later with mode "xb", so the umask applies as usual)."""
    return str(final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))


def one_line(err: BaseException) -> str:
    """An exception's text on one line, at most 200 characters."""
    text = " ".join(str(err).split())
    return text[:200] or type(err).__name__
