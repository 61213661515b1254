"""Calibration and evaluation text: the vendored SOTU slice or user files, cut into token windows."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import OnnxqError

CALIB_YEARS = range(1990, 2017)
EVAL_YEARS = range(2017, 2022)
BUILTIN = {"sotu-calib": CALIB_YEARS, "sotu-eval": EVAL_YEARS}


def sotu_dir() -> Path:
    """The vendored speeches: `onnxq/models/data/sotu` when installed, `models/data/sotu` in a checkout."""
    here = Path(__file__).resolve().parent
    for root in (here / "models", here.parent / "models"):
        if (root / "data" / "sotu").is_dir():
            return root / "data" / "sotu"
    raise OnnxqError("the vendored SOTU text is missing: reinstall onnxq or give a text file")


def sotu_files(years: range) -> list[Path]:
    """Vendored speeches whose name starts with a year in `years`, oldest first."""
    return sorted(p for p in sotu_dir().glob("*.txt") if int(p.name[:4]) in years)


def _read(files: list[Path]) -> str:
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)


def load_text(source: str | Path) -> str:
    """Text of "sotu-calib", "sotu-eval", a text file or a directory of .txt files (joined by blank lines)."""
    if str(source) in BUILTIN:
        text = _read(sotu_files(BUILTIN[str(source)]))
    else:
        path = Path(source)
        if path.is_file():
            text = _read([path])
        elif path.is_dir():
            text = _read(sorted(path.glob("*.txt")))
        else:
            raise OnnxqError(f"text '{source}' not found: give sotu-calib, sotu-eval, a text file or a folder of .txt files")
    if not text.strip():
        raise OnnxqError(f"text '{source}' is empty: give a file or folder with some text in it")
    return text


def token_windows(tokenizer: Any, text: str, seq_len: int, n_windows: int | None = None, *,
                  seed: int = 0, random: bool = False) -> np.ndarray:
    """Non-overlapping `[n, seq_len]` int64 token windows: contiguous from the start, or at seeded random offsets.

    `n_windows=None` takes every window that fits; no special tokens are added.
    """
    ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
    fit = len(ids) // seq_len
    if fit == 0:
        raise OnnxqError(f"calibration text has {len(ids)} tokens; need at least {seq_len}: give more text with --calib")
    n = fit if n_windows is None else n_windows
    if not 0 < n <= fit:
        raise OnnxqError(f"text has {len(ids)} tokens, room for {fit} windows of {seq_len}, not {n}: "
                         "give more text with --calib or ask for fewer windows")
    if not random:
        return ids[: n * seq_len].reshape(n, seq_len)
    # Uniform over all placements of n disjoint windows: n sorted picks among slack + n slots, spread apart.
    picks = np.sort(np.random.default_rng(seed).choice(len(ids) - n * seq_len + n, size=n, replace=False))
    starts = picks + np.arange(n) * (seq_len - 1)
    return np.stack([ids[s: s + seq_len] for s in starts])
