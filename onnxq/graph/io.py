"""Loading and atomic saving of ONNX models (with external data), and detaching weights for proto-copying passes."""
from __future__ import annotations

import functools
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx.external_data_helper import (
    ExternalDataInfo, _get_all_tensors, load_external_data_for_model, load_external_data_for_tensor, uses_external_data,
)

from ..errors import OnnxqError

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of serialized proto above which weights go to "<name>.data"
_MIN_EXTERNAL_BYTES = 1024  # smaller tensors stay inside the .onnx file
_ALIGN = 4096  # external tensors start on page boundaries (lets ORT memory-map them)


def stored_bytes(nbytes: int, external: bool, *, was_external: bool = False) -> int:
    """Bytes a tensor of `nbytes` takes in a saved model: inline, or padded to a page in the external-data file
    (where the model goes external: tensors from `_MIN_EXTERNAL_BYTES` up, and any already external in the source)."""
    outside = external and (was_external or nbytes >= _MIN_EXTERNAL_BYTES)
    return -(-nbytes // _ALIGN) * _ALIGN if outside else nbytes


def load_model(path: str | os.PathLike, *, load_weights: bool = True) -> onnx.ModelProto:
    """Read an .onnx file; with `load_weights`, external data is read from the file's folder."""
    path = Path(path)
    if path.is_dir():
        raise OnnxqError(f"{path} is a folder, not a model file: pass the path of the .onnx file in it")
    if not path.is_file():
        raise OnnxqError(f"model file not found: {path} (pass the path of an existing .onnx file)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError) as err:
        raise OnnxqError(f"{path} is not a readable ONNX model (truncated or not ONNX): {one_line(err)}") from None
    if not model.HasField("graph") or not model.opset_import:
        raise OnnxqError(f"{path} is not an ONNX model (no graph or opset import): re-export it")
    check_graph(model, path.name)
    if load_weights:
        _load_external_data(model, path)
    return model


def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """`load_model(path, load_weights=False)` that also fails, with one line, on missing or truncated external data."""
    model = load_model(path, load_weights=False)
    check_external_data(model, path)
    return model


# bits per element of tensor types whose raw_data size follows from the dims (others are not size-checked)
_BITS = {
    onnx.TensorProto.FLOAT: 32, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT16: 16,
    onnx.TensorProto.INT16: 16, onnx.TensorProto.INT32: 32, onnx.TensorProto.INT64: 64, onnx.TensorProto.BOOL: 8,
    onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.DOUBLE: 64, onnx.TensorProto.UINT32: 32,
    onnx.TensorProto.UINT64: 64, onnx.TensorProto.BFLOAT16: 16, onnx.TensorProto.COMPLEX64: 64,
    onnx.TensorProto.COMPLEX128: 128, onnx.TensorProto.STRING: 0,  # strings live in string_data, never raw_data
    **{getattr(onnx.TensorProto, n): b for n, b in (
        ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2), ("FLOAT8E4M3FN", 8),
        ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8), ("FLOAT8E5M2FNUZ", 8), ("FLOAT8E8M0", 8),
    ) if hasattr(onnx.TensorProto, n)},
}
_SCHEMA_DOMAINS = ("", "ai.onnx.ml")  # domains whose op schemas onnx knows; others (com.microsoft, ...) pass as is


def check_graph(model: onnx.ModelProto, name: str = "the model", *, ops: bool = False,
                sizes: Mapping[str, int] | None = None) -> None:
    """Cheap structural checks of the main graph (no weight data read, nothing copied), so that a malformed model
    fails here with one line instead of deep inside analysis or ONNX Runtime: valid tensor types and dims, raw data
    sizes, every node with an output, every node input defined before use, every tensor produced once, every graph
    output produced. With `ops` (for models about to run), also: every node's domain imported, and ops of the ONNX
    domains known at the imported opset with valid input/output counts and attribute names and types. `sizes` gives
    the stored bytes of initializers whose data is elsewhere (`load_weightless`)."""
    g = model.graph
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    fix = "re-export the model or repair it"

    def fail(problem: str) -> None:
        raise OnnxqError(f"{name} is malformed: {problem}: {fix}")

    if ops and "" not in opsets:
        fail("no opset import for the default ONNX domain")
    valid = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
    known = {i.name for i in g.input}
    for t in g.initializer:
        if t.data_type not in valid:
            fail(f"initializer {t.name!r} has data type {t.data_type}, which is not an ONNX type")
        if any(d < 0 for d in t.dims):
            fail(f"initializer {t.name!r} has a negative dimension {list(t.dims)}")
        bits, count = _BITS.get(t.data_type), int(np.prod(t.dims, dtype=np.int64))
        stored = (_external_length(t) if uses_external_data(t) else len(t.raw_data) if t.HasField("raw_data")
                  else (sizes or {}).get(t.name))
        if bits is not None and stored is not None and stored != -(-count * bits // 8):
            fail(f"initializer {t.name!r} holds {stored} bytes, its shape {list(t.dims)} needs {-(-count * bits // 8)}")
        known.add(t.name)
    for vi in list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type not in valid:
            fail(f"graph input/output {vi.name!r} has element type {vi.type.tensor_type.elem_type}")
    produced, upfront = set(), set(known)
    for i, node in enumerate(g.node):
        label = repr(node.name) if node.name else f"#{i}"
        domain = "" if node.domain == "ai.onnx" else node.domain
        if not any(node.output):
            fail(f"node {label} ({node.op_type}) has no output")
        if ops and domain not in opsets:
            fail(f"node {label} uses domain {node.domain!r}, which has no opset import")
        if ops and domain in _SCHEMA_DOMAINS:
            _check_node(node, label, opsets[domain], domain, fail)
        for t in node.input:
            if t and t not in known:
                fail(f"input {t!r} of node {label} is not a graph input, an initializer or an earlier node's output")
        for t in node.output:
            if t and (t in produced or t in upfront):
                fail(f"tensor {t!r} is produced twice (node {label} and an earlier node, input or initializer)")
            produced.add(t)
        known.update(t for t in node.output if t)
    for o in g.output:
        if o.name not in known:
            fail(f"graph output {o.name!r} is not produced by any node")


def _check_node(node: onnx.NodeProto, label: str, version: int, domain: str, fail) -> None:
    """Op known at the imported opset (to ONNX, or to ONNX Runtime in that domain), input/output counts and
    attribute names/types as its schema says."""
    schema = _schema(node.op_type, version, domain)
    if schema is None:
        fail(f"node {label} has op {node.op_type!r}, which neither opset {version} of {domain or 'ai.onnx'!r} "
             "nor ONNX Runtime defines")
        return
    if not schema.min_input <= len(node.input) <= schema.max_input:
        fail(f"node {label} ({node.op_type}) has {len(node.input)} inputs, the op takes {schema.min_input}-{schema.max_input}")
    if not schema.min_output <= len(node.output) <= schema.max_output:
        fail(f"node {label} ({node.op_type}) has {len(node.output)} outputs, the op gives {schema.min_output}-{schema.max_output}")
    for a in node.attribute:
        spec = schema.attributes.get(a.name)
        if spec is None:
            fail(f"node {label} ({node.op_type}) has an unknown attribute {a.name!r}")
        elif a.type != int(spec.type) and not a.ref_attr_name:
            fail(f"node {label} ({node.op_type}) attribute {a.name!r} has the wrong type")
    given = {a.name for a in node.attribute}
    for key, spec in schema.attributes.items():
        if spec.required and key not in given:
            fail(f"node {label} ({node.op_type}) lacks the required attribute {key!r}")


def _schema(op: str, version: int, domain: str):
    """The ONNX schema of `op` at `version`, else ONNX Runtime's own op of that name in `domain` (the contrib ops it
    registers in the default domain, e.g. SimplifiedLayerNormalization from onnxruntime-genai's builder), else None."""
    try:
        return onnx.defs.get_schema(op, version, domain)
    except onnx.defs.SchemaError:
        return max((s for s in _ort_schemas().get((domain, op), ()) if s.since_version <= version),
                   key=lambda s: s.since_version, default=None)


@functools.cache
def _ort_schemas() -> dict[tuple[str, str], list]:
    """ONNX Runtime's op schemas in the ONNX domains, by (domain, op)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    out: dict[tuple[str, str], list] = {}
    for s in get_all_operator_schema():
        if s.domain in _SCHEMA_DOMAINS:
            out.setdefault((s.domain, s.name), []).append(s)
    return out


def _external_length(t: onnx.TensorProto) -> int | None:
    """The `length` an external tensor declares, or None."""
    value = next((e.value for e in t.external_data if e.key == "length"), None)
    return int(value) if value is not None and value.isdigit() else None


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


class Weights:
    """Where the data of a weightless model's initializers is: external data files in `folder` (the model's folder)
    and `memory`, bytes by initializer name (`FileSpans`: held, or read from the source file on demand; a plain
    mapping given here is held)."""

    def __init__(self, folder: str | os.PathLike, memory: MutableMapping[str, bytes] | None = None):
        self.folder = Path(folder)
        self.memory = memory if isinstance(memory, FileSpans) else FileSpans.holding(memory or {})

    def detached(self, t: onnx.TensorProto) -> bool:
        """Whether `t` is an initializer whose data is in `memory` (moved out with `detach_weights`, or never read)."""
        return t.name in self.memory and not t.HasField("raw_data") and not uses_external_data(t)

    def nbytes(self, name: str) -> int:
        """Length of the data of detached initializer `name`."""
        return self.memory.length(name)

    def read(self, name: str, start: int, size: int) -> bytes:
        """Bytes [start, start + size) of the data of detached initializer `name`."""
        return self.memory.read(name, start, size)

    def copy_to(self, name: str, out) -> int:
        """Write the data of detached initializer `name` to file `out` (in chunks from a file); returns its length."""
        return self.memory.copy_to(name, out)

    def array(self, t: onnx.TensorProto) -> np.ndarray | None:
        """The data of detached or external initializer `t` as an array, read in one copy (a view of bytes held in
        memory); None for element types numpy does not store as ONNX does (bfloat16, 4-bit, float8, strings)."""
        if t.data_type not in _NUMPY_TYPES:
            return None
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        count = int(np.prod(t.dims, dtype=np.int64))
        spans = self.memory
        if self.detached(t) and t.name in spans.held:
            data = np.frombuffer(spans.held[t.name], dtype)
        elif self.detached(t) and t.name in spans.transposes:
            data = spans.transposed(t.name).reshape(-1)
        else:
            if self.detached(t):
                (offset, length), file = spans.spans[t.name], spans.path
            else:
                info, file = _external_file(t, self.folder)
                offset, length = info.offset or 0, info.length
            data = np.empty(count, dtype)
            if length is not None and length != data.nbytes:
                raise OnnxqError(f"tensor {t.name!r} holds {length} bytes, its shape {list(t.dims)} needs "
                                 f"{data.nbytes}: re-export the model")
            try:
                with open(file, "rb") as f:
                    f.seek(offset)
                    complete = f.readinto(memoryview(data).cast("B")) == data.nbytes
            except OSError as err:
                raise OnnxqError(f"cannot read the data of tensor {t.name!r}: {one_line(err)}") from None
            if not complete:
                raise OnnxqError(f"{Path(file).name} ends inside tensor {t.name!r}: the file is truncated")
        if data.size != count:
            raise OnnxqError(f"tensor {t.name!r} holds {data.nbytes} bytes, its shape {list(t.dims)} needs "
                             f"{count * dtype.itemsize}: re-export the model")
        return data.reshape(tuple(t.dims))

    def release(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` with its large inline initializers detached here; drop `model`. Tensors equal to their
        bytes in the source file, or to the transpose of a matrix there (a tied head made from its embedding), are
        read from the file again when needed instead of being held in memory."""
        inits = {t.name: t for t in model.graph.initializer}
        for name, data in _detached(model):  # one tensor's bytes at a time: most go straight back to the file
            if not self.memory.reattach(name, data) and not self._retranspose(inits[name], data, inits):
                self.memory[name] = data
            del data
        return _slim_copy(model)

    def _retranspose(self, t: onnx.TensorProto, data: bytes, inits: Mapping[str, onnx.TensorProto]) -> bool:
        """Whether matrix `t` (its `data`) is now read as the transpose of another of `inits`' matrices in the file."""
        if len(t.dims) != 2 or t.data_type not in _NUMPY_TYPES:
            return False
        dims = list(reversed(t.dims))
        candidates = [n for n, u in inits.items() if u.data_type == t.data_type and list(u.dims) == dims]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        return self.memory.retranspose(t.name, data, dtype, tuple(t.dims), [n for n in candidates if n != t.name])


class FileSpans(MutableMapping):
    """Initializer bytes by name, read on demand from spans of one file (a model's inline weights left on disk; no
    file: none), or made on demand as the transpose of a matrix there; a name set to bytes is held in memory instead."""

    def __init__(self, path: str | os.PathLike | None, spans: dict[str, tuple[int, int]]):
        self.path = None if path is None else Path(path)
        self.spans = dict(spans)  # name -> (offset, length) in `path`
        self.origin = dict(spans)  # every span the file has, also of names since set or deleted
        self.held: dict[str, bytes] = {}
        self.transposes: dict[str, tuple[str, np.dtype, tuple[int, int]]] = {}  # name -> origin [r, c] it is .T of

    @classmethod
    def holding(cls, data: Mapping[str, bytes]) -> FileSpans:
        """A store of `data` alone, held in memory (no file)."""
        store = cls(None, {})
        store.held.update(data)
        return store

    def __getitem__(self, name: str) -> bytes:
        if name in self.held:
            return self.held[name]
        return self.read(name, 0, self.length(name))

    def __setitem__(self, name: str, data: bytes) -> None:
        self.spans.pop(name, None)
        self.transposes.pop(name, None)
        self.held[name] = data

    def __delitem__(self, name: str) -> None:
        if self.held.pop(name, None) is None and self.transposes.pop(name, None) is None:
            del self.spans[name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self.held, *self.transposes, *(n for n in self.spans if n not in self.held)])

    def __len__(self) -> int:
        return len(self.held) + len(self.transposes) + len(self.spans)

    def __contains__(self, name: object) -> bool:
        return name in self.held or name in self.transposes or name in self.spans

    def clear(self) -> None:
        self.held.clear()
        self.transposes.clear()
        self.spans.clear()

    def length(self, name: str) -> int:
        """Bytes of `name`'s data."""
        if name in self.transposes:
            _, dtype, (rows, cols) = self.transposes[name]
            return rows * cols * dtype.itemsize
        return len(self.held[name]) if name in self.held else self.spans[name][1]

    def read(self, name: str, start: int, size: int) -> bytes:
        """Bytes [start, start + size) of `name`'s data."""
        if name in self.held:
            return self.held[name][start : start + size]
        if name in self.transposes:
            return self._transposed_bytes(name, start, size)
        return self._pread(name, *self.spans[name], start, size)

    def _transposed_bytes(self, name: str, start: int, size: int) -> bytes:
        """Bytes [start, start + size) of a transposed entry: a few elements read one by one from its origin (a
        probe), more from the whole transpose."""
        src, dtype, (rows, cols) = self.transposes[name]
        end = min(start + size, rows * cols * dtype.itemsize)
        first, last = start // dtype.itemsize, -(-end // dtype.itemsize)
        if last - first > _FEW:
            return self.transposed(name).reshape(-1).view(np.uint8)[start:end].tobytes()
        at = lambda e: (e % rows * cols + e // rows) * dtype.itemsize  # noqa: E731  element e of the [c, r] transpose
        data = b"".join(self._pread(src, *self.origin[src], at(e), dtype.itemsize) for e in range(first, last))
        return data[start - first * dtype.itemsize : end - first * dtype.itemsize]

    def _pread(self, name: str, offset: int, length: int, start: int, size: int) -> bytes:
        """Bytes [start, start + size) of the span (offset, length) of the file that holds `name`'s data."""
        size = max(0, min(size, length - start))
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), size, offset + start)
        if len(data) != size:
            raise OnnxqError(f"{self.path.name} ends inside tensor {name!r}: the file is truncated; copy it again")
        return data

    def transposed(self, name: str) -> np.ndarray:
        """The data of a transposed entry as a [c, r] array, built from its origin matrix a slab of rows at a time."""
        src, dtype, (rows, cols) = self.transposes[name]
        out = np.empty((cols, rows), dtype)
        step = max(1, _SLAB // (cols * dtype.itemsize))
        for r in range(0, rows, step):
            slab = self._pread(src, *self.origin[src], r * cols * dtype.itemsize, step * cols * dtype.itemsize)
            out[:, r : r + step] = np.frombuffer(slab, dtype).reshape(-1, cols).T
        return out

    def retranspose(self, name: str, data: bytes, dtype: np.dtype, shape: tuple[int, int],
                    candidates: Iterable[str]) -> bool:
        """Make `name` (data of `shape`) the transpose of a candidate's matrix in the file if it equals it; whether
        it does (one row of each candidate rules most out, then slabs compare the rest)."""
        bits = np.dtype(f"u{dtype.itemsize}")  # compared bit for bit (-0.0 is not 0.0 here)
        held = np.frombuffer(data, bits).reshape(shape)
        row = shape[0] * dtype.itemsize  # bytes of one row of the candidate: one column of `name`

        def same(src: str, c: int, n: int) -> bool:  # candidate rows [c, c + n) == columns [c, c + n) of `name`
            got = np.frombuffer(self._pread(src, *self.origin[src], c * row, n * row), bits)
            return np.array_equal(got, held[:, c : c + n].T.reshape(-1))

        step = max(1, _SLAB // row)
        for src in candidates:
            if self.origin.get(src, (0, -1))[1] != len(data) or not same(src, 0, 1):
                continue
            if all(same(src, c, step) for c in range(0, shape[1], step)):
                self.held.pop(name, None)
                self.spans.pop(name, None)
                self.transposes[name] = (src, dtype, (shape[1], shape[0]))
                return True
        return False

    def copy_to(self, name: str, out) -> int:
        """Write `name`'s data to file `out` in chunks; returns its length."""
        if name in self.held:
            out.write(self.held[name])
            return len(self.held[name])
        if name in self.transposes:
            data = self.transposed(name)
            out.write(data.data)
            return data.nbytes
        length = self.spans[name][1]
        for start in range(0, length, _CHUNK):
            out.write(self.read(name, start, _CHUNK))
        return length

    def reattach(self, name: str, data: bytes) -> bool:
        """Read `name` from the file again if `data` equals its bytes there; whether it does."""
        if name not in self.origin or self.origin[name][1] != len(data):
            return False
        self.held.pop(name, None)
        self.transposes.pop(name, None)
        self.spans[name] = self.origin[name]
        view = memoryview(data)
        if all(self.read(name, i, _CHUNK) == view[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)):
            return True
        del self.spans[name]
        return False


_CHUNK = 64 << 20  # bytes per read when copying tensor data between files
_SLAB = 8 << 20  # bytes per read when comparing or transposing a matrix (each slab has a strided copy beside it)
_FEW = 4096  # elements of a transposed entry read one by one (a duplicate probe reads 64) rather than transposing it all
_NUMPY_TYPES = {getattr(onnx.TensorProto, n) for n in (
    "FLOAT", "FLOAT16", "DOUBLE", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64", "BOOL")}


def load_weightless(path: str | os.PathLike) -> tuple[onnx.ModelProto, Weights]:
    """`load_model(path, load_weights=False)` without its large inline initializers' data, which stays in the file:
    a small proto and the `Weights` that read each tensor from the file (or its external data) when asked."""
    path = Path(path)
    if path.suffix == ".onnx" and path.is_file():
        try:
            slim, spans = _weightless_bytes(path)
            model = onnx.ModelProto.FromString(slim)
        except (ValueError, IndexError, DecodeError, RuntimeError, OSError):
            model = None  # load_model says what is wrong with the file
        if model is not None and model.HasField("graph") and model.opset_import:
            check_graph(model, path.name, sizes={k: n for k, (_, n) in spans.items()})
            return model, Weights(path.parent, FileSpans(path, spans))
    model, memory = detach_weights(load_model(path, load_weights=False))
    return model, Weights(path.parent, memory)


# ---- the protobuf wire format, for the three levels that hold weights: model.graph (7), graph.initializer (5),
# tensor.raw_data (9); everything else is copied through as bytes -------------------------------------------------

_GRAPH, _INITIALIZER, _NAME, _RAW_DATA, _EXTERNAL_DATA = 7, 5, 8, 9, 13


def _varint(buf, pos: int) -> tuple[int, int]:
    """The varint at `pos` in `buf` and the position after it."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, field start, payload start, field end) of each field of the message in buf[start:end]; the
    payload of a length-delimited field is buf[payload start:field end]."""
    pos = start
    while pos < end:
        key, p = _varint(buf, pos)
        kind = key & 7
        if kind == 0:
            stop = _varint(buf, p)[1]
        elif kind in (1, 5):
            stop = p + (8 if kind == 1 else 4)
        elif kind == 2:
            n, p = _varint(buf, p)
            stop = p + n
        else:
            raise ValueError(f"unsupported wire type {kind}")  # groups: not in ONNX
        if stop > end:
            raise ValueError("field runs past its message")
        yield key >> 3, pos, p, stop
        pos = stop


def _length_delimited(number: int, parts: list) -> list:
    """Field `number` holding the concatenation of `parts` (bytes, or (name, length) placeholders)."""
    size = sum(len(x) if isinstance(x, bytes) else x[1] for x in parts)
    return [_put_varint(number << 3 | 2) + _put_varint(size), *parts]


def _weightless_bytes(path: Path) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The serialized model in `path` without the raw data of initializers holding at least `_MIN_EXTERNAL_BYTES`, and
    where that data is: name -> (offset, length) in the file."""
    import mmap

    spans: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if hasattr(buf, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            buf.madvise(mmap.MADV_RANDOM)  # no read-ahead: only the pages holding the fields are read
        out = []
        graphs = 0
        for number, start, payload, stop in _fields(buf, 0, len(buf)):
            if number != _GRAPH:
                out.append(buf[start:stop])
                continue
            graphs += 1
            parts = []
            for inner, s2, p2, e2 in _fields(buf, payload, stop):
                tensor = _weightless_tensor(buf, p2, e2, spans) if inner == _INITIALIZER else None
                parts += [buf[s2:e2]] if tensor is None else _length_delimited(_INITIALIZER, tensor)
            out += _length_delimited(_GRAPH, parts)
        if graphs > 1:
            raise ValueError("graph field repeated")  # protobuf would merge them: let it
        return b"".join(out), spans


def _weightless_tensor(buf, start: int, end: int, spans: dict) -> list[bytes] | None:
    """A TensorProto's fields without a large raw_data (whose span goes to `spans`), or None to keep it as is."""
    fields = list(_fields(buf, start, end))
    if any(f[0] == _EXTERNAL_DATA for f in fields):
        return None
    raw = [f for f in fields if f[0] == _RAW_DATA]
    names = [f for f in fields if f[0] == _NAME]
    if len(raw) != 1 or len(names) != 1 or raw[0][3] - raw[0][2] < _MIN_EXTERNAL_BYTES:
        return None
    name = bytes(buf[names[0][2] : names[0][3]]).decode()
    if name in spans:
        raise ValueError(f"initializer {name!r} appears twice")
    spans[name] = (raw[0][2], raw[0][3] - raw[0][2])
    return [buf[s:e] for number, s, _, e in fields if number != _RAW_DATA]


def _spliced(model: onnx.ModelProto, weights: Weights) -> list:
    """`model` serialized as its initializers' data detached in `weights` were back in it: byte strings and
    (name, length) placeholders for that data, in file order (fields are written in field-number order)."""
    detached = {t.name: t for t in model.graph.initializer if weights.detached(t)}
    buf = model.SerializeToString()
    if not detached:
        return [buf]
    out = []
    for number, start, payload, stop in _fields(buf, 0, len(buf)):
        if number != _GRAPH:
            out.append(buf[start:stop])
            continue
        parts = []
        for inner, s2, p2, e2 in _fields(buf, payload, stop):
            name = _tensor_name(buf, p2, e2) if inner == _INITIALIZER else None
            if name not in detached:
                parts.append(buf[s2:e2])
                continue
            fields = list(_fields(buf, p2, e2))
            data = _length_delimited(_RAW_DATA, [(name, weights.nbytes(name))])
            at = next((i for i, f in enumerate(fields) if f[0] > _RAW_DATA), len(fields))
            tensor = [buf[f[1] : f[3]] for f in fields[:at]] + data + [buf[f[1] : f[3]] for f in fields[at:]]
            parts += _length_delimited(_INITIALIZER, tensor)
        out += _length_delimited(_GRAPH, parts)
    return out


def _tensor_name(buf, start: int, end: int) -> str | None:
    return next((bytes(buf[p:e]).decode() for n, _, p, e in _fields(buf, start, end) if n == _NAME), None)


def detach_weights(model: onnx.ModelProto, keep: Iterable[str] = ()) -> tuple[onnx.ModelProto, dict[str, bytes]]:
    """A weightless copy of `model` and the raw data of its large inline initializers (except `keep`) by name.

    With the upb protobuf runtime, clearing a field does not free its memory (only dropping the whole message does),
    so weight-free copies for shape inference and the like would leave garbage as big as the weights; a small proto
    plus `Weights(folder, memory)` avoids that. `model` is left without those weights: drop it.
    """
    memory = dict(_detached(model, keep))
    return _slim_copy(model), memory


def _detached(model: onnx.ModelProto, keep: Iterable[str] = ()) -> Iterator[tuple[str, bytes]]:
    """Name and raw data of each large inline initializer of `model` (except `keep`), cleared from it as it goes."""
    keep = set(keep)
    for t in _large_initializers(model, _MIN_EXTERNAL_BYTES):
        if t.name not in keep:
            data = t.raw_data
            t.ClearField("raw_data")
            yield t.name, data
            del data


def _slim_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A fresh copy of `model`: with the upb runtime, the only way to free what ClearField left."""
    slim = onnx.ModelProto()
    slim.CopyFrom(model)  # copies only what is left: graph, small tensors, metadata
    return slim


def read_array(tensor: onnx.TensorProto, folder: str | os.PathLike | Weights) -> np.ndarray:
    """The value of `tensor` as a numpy array, reading its data from `folder` (the model's folder, or `Weights`)."""
    store = folder if isinstance(folder, Weights) else Weights(folder)
    if not uses_external_data(tensor) and not store.detached(tensor):
        return numpy_helper.to_array(tensor)
    array = store.array(tensor)  # one read into the array, for the element types numpy stores as ONNX does
    if array is not None:
        return array if array.flags.writeable else array.copy()
    loaded = onnx.TensorProto()
    loaded.CopyFrom(tensor)  # no payload to copy: the data is on disk or in the store
    load_tensor_data([loaded], store)
    return numpy_helper.to_array(loaded)


def load_tensor_data(tensors: Iterable[onnx.TensorProto], folder: str | os.PathLike | Weights) -> None:
    """Read the data of each tensor that lacks it (from the model's `folder`, or `Weights`) into the tensor, in place."""
    store = folder if isinstance(folder, Weights) else Weights(folder)
    for t in tensors:
        if store.detached(t):
            t.raw_data = store.memory[t.name]
        elif uses_external_data(t):
            _external_file(t, store.folder)  # a clear error for a missing file or an unsafe location
            try:
                load_external_data_for_tensor(t, str(store.folder))
            except (OSError, ValueError) as err:
                raise OnnxqError(f"cannot read the external data of tensor {t.name!r}: {one_line(err)}") from None


def existing_parent(path: str | os.PathLike) -> Path:
    """The nearest folder above `path` that exists (where writing it would create the missing ones)."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


@contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `final` that becomes `final` only if the body completes; a failure leaves nothing.

    An earlier folder at `final` is replaced with `replace` (an output); without, it is kept (a cache that a
    concurrent run has just finished), unless it is empty."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs and caches are ordinary folders
    old = None
    try:
        yield tmp
        if final.is_dir() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
        elif final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        try:
            os.replace(tmp, final)
        except OSError:
            if old is not None:
                os.replace(old / final.name, final)  # the earlier output stays as it was
            if replace or not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and final.is_dir():  # else the earlier output stays in `old` rather than being lost
            shutil.rmtree(old, ignore_errors=True)


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
    folder = existing_parent(path)
    if not folder.is_dir():
        raise OnnxqError(f"cannot write {path}: {folder} is not a folder: choose a path inside a folder")
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
    weights: Weights | None = None,
) -> Path:
    """Write `model` to `path` through temp files in the same folder and `os.replace`; return the path.

    Weights go to one "<name>.data" file next to it when `external_data` is true, or (None) when the proto is
    larger than EXTERNAL_DATA_THRESHOLD or still refers to external data. `source` is the path the model was read
    from; writing over it is refused, and initializers not loaded (`load_model(..., load_weights=False)`) are copied
    from its external files in chunks, so a lazily loaded model is saved without holding its weights in memory.
    Initializers detached in `weights` are written from there (as `restore_weights` would put them back), one at
    a time. `model` is unchanged afterwards; on any failure no temp file is left behind.
    """
    path = Path(path)
    if source is not None and path.resolve() == Path(source).resolve():
        raise OnnxqError(f"output {path} is the input model: choose a different output path")
    streamed = any(uses_external_data(t) for t in _get_all_tensors(model))
    if streamed and (source is None or _external_outside_initializers(model)):
        raise OnnxqError("the model's external weights are not loaded: load it with load_weights=True before saving")
    weights = weights or Weights(".")
    for t in model.graph.initializer:
        if weights.detached(t):  # what restore_weights does before putting the data back
            del t.external_data[:]
            t.ClearField("data_location")
    pieces = None
    if external_data is None:
        pieces = _spliced(model, weights)
        size = sum(len(x) if isinstance(x, bytes) else x[1] for x in pieces)
        external_data = streamed or size > EXTERNAL_DATA_THRESHOLD
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
            _write_external(model, temps[-1], data_path.name, payloads, moved,
                            None if source is None else Path(source).parent, weights)
            renames.append((temps[-1], data_path))
            pieces = [model.SerializeToString()]
        temps.append(_temp_name(path))
        with open(temps[-1], "xb") as f:
            for piece in pieces or _spliced(model, weights):
                if isinstance(piece, bytes):
                    f.write(piece)
                else:
                    weights.copy_to(piece[0], f)
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
    weights: Weights,
) -> None:
    """Write large initializers to `tmp_data` and point them at `location`; their bytes go to `payloads`.

    Initializers whose data is still in the source model's external files are copied over in chunks (never held in
    memory whole); their old `external_data` entries go to `moved`, and those detached in `weights` get `moved`
    entries without any (they return to detached).
    """
    with open(tmp_data, "xb") as f:
        streamed = [t for t in model.graph.initializer if uses_external_data(t)]
        inline = [t for t in model.graph.initializer
                  if weights.detached(t) or t.HasField("raw_data") and t.ByteSize() >= _MIN_EXTERNAL_BYTES]
        for t in [*inline, *streamed]:
            offset = -(-f.tell() // _ALIGN) * _ALIGN
            f.seek(offset)
            if uses_external_data(t):
                moved[t.name] = [(e.key, e.value) for e in t.external_data]
                length = _copy_external(t, source_dir, f)
                del t.external_data[:]
            elif weights.detached(t):
                moved[t.name] = []
                length = weights.copy_to(t.name, f)
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
    """Point tensors copied by `_copy_external` back at the source model's files (or, with no entries, at none)."""
    for t in model.graph.initializer:
        if t.name in moved:
            del t.external_data[:]
            if not moved[t.name]:
                t.ClearField("data_location")
                continue
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


def sibling_path(path: str | os.PathLike, suffix: str, replaces: tuple[str, ...] = ()) -> Path:
    """`path` with `suffix` added to its name, after dropping an ending in `replaces`; other dots stay
    (`r-d0.1` -> `r-d0.1.json`, not `r-d0.json`)."""
    path = Path(path)
    if path.suffix in replaces:
        path = path.with_suffix("")
    return path.with_name(path.name + suffix)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temp file in the same folder and a rename; a failure leaves no file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(_temp_name(path))
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_name(final: Path) -> str:
    """A fresh hidden name next to `final` (opened later with mode "xb", so the umask applies as usual)."""
    return str(final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))


def one_line(err: BaseException) -> str:
    """An exception's text on one line, at most 200 characters."""
    text = " ".join(str(err).split())
    return text[:200] or type(err).__name__
