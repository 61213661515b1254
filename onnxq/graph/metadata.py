"""Provenance of a quantized model, stored as "onnxq.*" entries of `metadata_props`."""
from __future__ import annotations

import json
from typing import Any

import onnx

PREFIX = "onnxq."


def add_provenance(model: onnx.ModelProto, info: dict[str, Any]) -> onnx.ModelProto:
    """Write each item as key "onnxq.<key>" (replacing an older value); in place, returns `model`.

    Strings are stored as they are, everything else (numbers, lists, dicts, numpy values, ...) as JSON; a string
    that would itself parse as JSON is stored JSON-quoted, so `read_provenance` gives back what was written.
    """
    replaced = {PREFIX + key for key in info}
    entries = [(p.key, p.value) for p in model.metadata_props if p.key not in replaced]
    for key, value in info.items():
        text = value if isinstance(value, str) and not _is_json(value) else json.dumps(value, sort_keys=True, default=_plain)
        entries.append((PREFIX + key, text))
    del model.metadata_props[:]
    for key, text in entries:
        model.metadata_props.add(key=key, value=text)
    return model


def read_provenance(model: onnx.ModelProto) -> dict[str, Any]:
    """The "onnxq.*" entries of `metadata_props`, prefix removed and JSON values decoded."""
    return {
        p.key.removeprefix(PREFIX): json.loads(p.value) if _is_json(p.value) else p.value
        for p in model.metadata_props
        if p.key.startswith(PREFIX)
    }


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _plain(value: Any) -> Any:
    """JSON fallback: numpy scalars/arrays via `tolist()`, anything else (paths, ...) as its string."""
    return value.tolist() if hasattr(value, "tolist") else str(value)
