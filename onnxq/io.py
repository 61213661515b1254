"""Loading and atomic saving of ONNX models (with external data), and detaching weights for proto-copying passes."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx.external_data_helper import (
    ExternalDataInfo, _get_all_tensors, load_external_data_for_model, load_external_data_for_tensor, uses_external_data,
)

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


def check_external_data(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Check, without reading them, that the external files of `model` (read from `path`) hold every tensor's bytes."""
    folder = Path(path).parent
    sizes: dict[Path, int] = {}
    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        info, file = _external_file(t, folder)
        if file not in sizes:
            sizes[file] = file.stat().st_size
        end = (info.offset or 0) + (info.length or 0)
        if end > sizes[file]:
            raise OnnxqError(f"external data file {file.name!r} is truncated ({sizes[file]} bytes, tensor {t.name!r} "
                             f"needs {end}): copy the complete file next to {Path(path).name}")


def read_array(tensor: onnx.TensorProto, folder: str | os.PathLike) -> np.ndarray:
    """The value of `tensor` as a numpy array, reading external data from `folder` (the model's folder) if needed."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    loaded = onnx.TensorProto()
    loaded.CopyFrom(tensor)  # no payload to copy: the data is on disk
    load_tensor_data([loaded], folder)
    return numpy_helper.to_array(loaded)


def load_tensor_data(tensors: Iterable[onnx.TensorProto], folder: str | os.PathLike) -> None:
    """Read the external data of each tensor (from the model's `folder`) into the tensor itself, in place."""
    for t in tensors:
        if uses_external_data(t):
            _external_file(t, Path(folder))  # a clear error for a missing file or an unsafe location
            try:
                load_external_data_for_tensor(t, str(folder))
            except (OSError, ValueError) as err:
                raise OnnxqError(f"cannot read the external data of tensor {t.name!r}: {one_line(err)}") from None


def check_output_path(
    path: str | os.PathLike, source: str | os.PathLike | None = None, model: onnx.ModelProto | None = None
) -> None:
    """Fail early (before any work) if `path` cannot be written or would overwrite `model`, read from `source`."""
    path = Path(path)
    if path.is_dir():
        raise OnnxqError(f"output {path} is a folder: give a file path such as {path / 'model.onnx'}")
    if source is not None:
        src = Path(source).resolve()
        if path.resolve() == src:
            raise OnnxqError(f"output {path} is the input model: choose a different output path")
        data = path.with_name(path.name + ".data").resolve()
        locations = {e.value for t in _get_all_tensors(model) if uses_external_data(t)
                     for e in t.external_data if e.key == "location"} if model is not None else set()
        if data == src or any(data == (src.parent / f).resolve() for f in locations):
            raise OnnxqError(f"output {path} would overwrite the input model's external data: choose another name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OnnxqError(f"cannot write {path}: {folder} is not a folder")
    if folder == path.parent:
        probe = _temp_name(path)
        try:
            open(probe, "xb").close()
        except OSError as err:
            raise OnnxqError(f"cannot write {path}: {one_line(err)}: choose a writable folder") from None
        Path(probe).unlink(missing_ok=True)
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxqError(f"cannot create the output folder for {path}: {folder} is not writable")


def save_model_atomic(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write `model` to `path` through temp files in the same folder and `os.replace`; return the path.

    Weights go to one "<name>.data" file next to it when `external_data` is true, or (None) when the proto is
    larger than EXTERNAL_DATA_THRESHOLD or still refers to external data. `source` is the path the model was read
    from; writing over it is refused, and initializers not loaded (`load_model(..., load_weights=False)`) are copied
    from its external files in chunks, so a lazily loaded model is saved without holding its weights in memory.
    `model` is unchanged afterwards; on any failure no temp file is left behind.
    """
    path = Path(path)
    if source is not None and path.resolve() == Path(source).resolve():
        raise OnnxqError(f"output {path} is the input model: choose a different output path")
    streamed = any(uses_external_data(t) for t in _get_all_tensors(model))
    if streamed and (source is None or _external_outside_initializers(model)):
        raise OnnxqError("the model's external weights are not loaded: load it with load_weights=True before saving")
    if external_data is None:
        external_data = streamed or model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    elif streamed and not external_data:
        raise OnnxqError("the model's weights are still on disk (loaded lazily): save it with external data")
    temps: list[str] = []
    payloads: dict[str, bytes] = {}
    moved: dict[str, list[tuple[str, str]]] = {}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        renames = []
        if external_data:
            data_path = path.with_name(path.name + ".data")
            temps.append(_temp_name(data_path))
            _write_external(model, temps[-1], data_path.name, payloads, moved, None if source is None else Path(source).parent)
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
        _restore_locations(model, moved)
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


def _write_external(
    model: onnx.ModelProto,
    tmp_data: str,
    location: str,
    payloads: dict[str, bytes],
    moved: dict[str, list[tuple[str, str]]],
    source_dir: Path | None,
) -> None:
    """Write large initializers to `tmp_data` and point them at `location`; their bytes go to `payloads`.

    Initializers whose data is still in the source model's external files are copied over in chunks (never held in
    memory whole); their old `external_data` entries go to `moved`.
    """
    with open(tmp_data, "xb") as f:
        streamed = [t for t in model.graph.initializer if uses_external_data(t)]
        for t in [*_large_initializers(model, _MIN_EXTERNAL_BYTES), *streamed]:
            offset = -(-f.tell() // _ALIGN) * _ALIGN
            f.seek(offset)
            if uses_external_data(t):
                moved[t.name] = [(e.key, e.value) for e in t.external_data]
                length = _copy_external(t, source_dir, f)
                del t.external_data[:]
            else:
                data = payloads[t.name] = t.raw_data
                f.write(data)
                length = len(data)
                t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
        f.flush()
        os.fsync(f.fileno())


def _copy_external(t: onnx.TensorProto, source_dir: Path, out) -> int:
    """Append the bytes of external tensor `t` (stored under `source_dir`) to file `out` in chunks; returns the length."""
    info, file = _external_file(t, source_dir)
    length = info.length if info.length is not None else file.stat().st_size - (info.offset or 0)
    with open(file, "rb") as src:
        src.seek(info.offset or 0)
        left = length
        while left:
            chunk = src.read(min(left, 64 << 20))
            if not chunk:
                raise OnnxqError(f"external data of {t.name!r} in {file.name} ends early: the data file is truncated")
            out.write(chunk)
            left -= len(chunk)
    return length


def _restore_locations(model: onnx.ModelProto, moved: dict[str, list[tuple[str, str]]]) -> None:
    """Point tensors copied by `_copy_external` back at the source model's files."""
    for t in model.graph.initializer:
        if t.name in moved:
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in moved[t.name]:
                t.external_data.add(key=key, value=value)


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


def _external_file(t: onnx.TensorProto, folder: Path) -> tuple[ExternalDataInfo, Path]:
    """External data info of `t` and its file under `folder`; one-line errors for missing or unsafe locations."""
    info = ExternalDataInfo(t)
    loc = Path(info.location)
    if not info.location or loc.is_absolute() or ".." in loc.parts:
        raise OnnxqError(f"tensor {t.name!r} has an invalid external data location {info.location!r}: re-export the model")
    file = folder / loc
    if not file.is_file():
        raise OnnxqError(f"external data file {info.location!r} of tensor {t.name!r} is missing: "
                         f"keep it next to the .onnx file in {folder}")
    return info, file


def _external_outside_initializers(model: onnx.ModelProto) -> bool:
    """Whether some external tensor is not a main-graph initializer (a Constant value, a subgraph initializer)."""
    count = lambda tensors: sum(1 for t in tensors if uses_external_data(t))  # noqa: E731
    return count(_get_all_tensors(model)) != count(model.graph.initializer)


def _temp_name(final: Path) -> str:
    """A fresh hidden name next to `final` (opened later with mode "xb", so the umask applies as usual)."""
    return str(final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))


def one_line(err: BaseException) -> str:
    """An exception's text on one line, at most 200 characters."""
    text = " ".join(str(err).split())
    return text[:200] or type(err).__name__
