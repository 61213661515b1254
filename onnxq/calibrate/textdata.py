"""Calibration and evaluation text: the vendored SOTU slice or user files, cut into token windows."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OnnxqError

CALIB_YEARS = range(1990, 2017)
EVAL_YEARS = range(2017, 2022)
BUILTIN = {"sotu-calib": CALIB_YEARS, "sotu-eval": EVAL_YEARS}


def sotu_dir() -> Path:
    """The vendored speeches, `onnxq/models/data/sotu`."""
    path = Path(__file__).resolve().parents[1] / "models" / "data" / "sotu"
    if not path.is_dir():
        raise OnnxqError("the vendored SOTU text is missing: reinstall onnxq or give a text file")
    return path


def sotu_files(years: range) -> list[Path]:
    """Vendored speeches whose name starts with a year in `years`, oldest first."""
    return sorted(p for p in sotu_dir().glob("*.txt") if int(p.name[:4]) in years)


def _read(files: list[Path]) -> str:
    """The files' texts joined by blank lines; a file that is not UTF-8 fails in one line."""
    texts = []
    for p in files:
        try:
            texts.append(p.read_text(encoding="utf-8").strip())
        except UnicodeDecodeError as err:
            raise OnnxqError(f"text file {p} is not UTF-8 (byte {err.start}): save it as UTF-8") from None
    return "\n\n".join(texts)


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


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids `tokenizer` puts before a text in normal use (e.g. [BOS]); [] if it adds none."""
    plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if at is None:
        raise OnnxqError("the tokenizer encodes a text differently with and without its special tokens: "
                         "pass special_tokens=False (--no-special-tokens)")
    limit = getattr(tokenizer, "onnxq_model_vocab", None)
    if limit and any(i >= limit for i in full[:at]):  # not a token of the model: the tokenizer class invented it
        return []
    return list(full[:at])


def token_windows(tokenizer: Any, text: str, seq_len: int, n_windows: int | None = None, *,
                  seed: int = 0, random: bool = False, special_tokens: bool = True) -> np.ndarray:
    """Non-overlapping `[n, seq_len]` int64 token windows: contiguous from the start, or at seeded random offsets.

    With `special_tokens`, each window starts with the tokenizer's `special_prefix` (e.g. BOS), then seq_len minus
    that many text tokens; without, text tokens only. `n_windows=None` takes every window that fits.
    """
    prefix = np.asarray(special_prefix(tokenizer) if special_tokens else [], dtype=np.int64)
    body = seq_len - len(prefix)
    if body < 1:
        raise OnnxqError(f"windows of {seq_len} tokens leave no room for text after the tokenizer's {len(prefix)} "
                         "prefix tokens: use a longer sequence length")
    ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
    fit = len(ids) // body
    if fit == 0:
        raise OnnxqError(f"calibration text has {len(ids)} tokens; need at least {body}: give more text with --calib")
    n = fit if n_windows is None else n_windows
    if not 0 < n <= fit:
        raise OnnxqError(f"text has {len(ids)} tokens, room for {fit} windows of {body}, not {n}: "
                         "give more text with --calib or ask for fewer windows")
    if random:  # uniform over all placements of n disjoint windows: n sorted picks among slack + n slots, spread apart
        picks = np.sort(np.random.default_rng(seed).choice(len(ids) - n * body + n, size=n, replace=False))
        windows = np.stack([ids[s: s + body] for s in picks + np.arange(n) * (body - 1)])
    else:
        windows = ids[: n * body].reshape(n, body)
    return np.concatenate([np.broadcast_to(prefix, (n, len(prefix))), windows], axis=1)
