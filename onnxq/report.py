"""The eval job: float vs quantized perplexity, output error, size and latency, as JSON and Markdown."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import OnnxqError
from .graph.io import check_output_path, one_line, sibling_path, write_text_atomic


@dataclass
class ModelScore:
    """One model's measured numbers."""

    path: str
    ppl: float
    size_mb: float
    eval_seconds: float


@dataclass
class EvalReport:
    """Float vs quantized comparison on the same text and windows."""

    text: str
    tokens: int
    seq_len: int
    ep: str
    float: ModelScore | None
    quant: ModelScore | None
    output_error: dict = field(default_factory=dict)
    quantize: dict = field(default_factory=dict)
    special_tokens: bool = True  # windows start with the tokenizer's prefix ids (`prefix`, e.g. [BOS]; may be [])
    prefix: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    def markdown(self) -> str:
        """A small table: model, PPL, size, eval time."""
        rows = ["| model | PPL | size (MB) | eval time (s) |", "|---|---:|---:|---:|"]
        for tag, s in (("float", self.float), ("quantized", self.quant)):
            if s is not None:
                rows.append(f"| {tag} `{Path(s.path).name}` | {s.ppl:.3f} | {s.size_mb:.1f} | {s.eval_seconds:.1f} |")
        head = (
            f"Perplexity on `{self.text}`: {self.tokens} tokens in non-overlapping {self.seq_len}-token windows, "
            f"ONNX Runtime {self.ep.upper()} EP{self._prefix_words()}."
        )
        extra = []
        if self.output_error:
            e = self.output_error
            extra.append(
                "Output error (quantized vs float logits): "
                + ", ".join(f"{k} {v:.4g}" for k, v in e.items() if isinstance(v, (int, float)))
            )
        if self.quantize:
            q = self.quantize
            extra.append(
                f"Quantization: {q.get('total_seconds')} s total ({q.get('calib_seconds')} s calibration, "
                f"{q.get('solve_seconds')} s solve), peak RSS {q.get('peak_rss_mb')} MiB"
                + (f" (+ {q['helper_rss_mb']} MiB solver helper)" if q.get("helper_rss_mb") else "")
                + f", {q.get('calib_tokens')} calibration tokens."
            )
        return "\n".join([head, "", *rows, "", *extra]) + "\n"

    def _prefix_words(self) -> str:
        """How the windows start, in words ("" for text only, the tokenizer adding nothing)."""
        if not self.special_tokens:
            return "; no special tokens"
        return f"; each window starts with the tokenizer's prefix ids {self.prefix}, not scored" if self.prefix else ""

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Write `<stem>.json` and `<stem>.md`."""
        return write_report(stem, self.to_dict(), self.markdown())


def report_file(stem: str | Path, suffix: str) -> Path:
    """`<stem><suffix>`, where a stem ending in .json or .md is taken without it (`--report out/r.json`)."""
    return sibling_path(stem, suffix, (".json", ".md"))


def _report_paths(stem: str | Path) -> tuple[Path, Path]:
    """`<stem>.json` and `<stem>.md`."""
    return report_file(stem, ".json"), report_file(stem, ".md")


def check_report_path(stem: str | Path) -> None:
    """Fail early, in one line, if `<stem>.json` or `<stem>.md` could not be written."""
    for path in _report_paths(stem):
        if path.is_dir():
            raise OnnxqError(f"report {path} is a folder: choose another --report stem "
                             "(it writes <stem>.json and <stem>.md)")
        check_output_path(path)


def write_report(stem: str | Path, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.md`, each to a temp file in the same folder and then renamed."""
    paths = _report_paths(stem)
    try:
        for path, text in zip(paths, (json.dumps(data, indent=2), markdown)):
            write_text_atomic(path, text)
    except OSError as err:
        raise OnnxqError(f"cannot write the report {stem}: {one_line(err)}: choose a writable --report path") from None
    return paths


def evaluate(
    float_model: str | Path | None,
    quant_model: str | Path | None = None,
    *,
    text: str = "sotu-eval",
    tokens: int = 4096,
    seq_len: int = 512,
    ep: str = "cpu",
    tokenizer_from: str | Path | None = None,
    special_tokens: bool = True,
) -> EvalReport:
    """Score the float and/or quantized model on the first `tokens` tokens of `text` (same windows for both); with
    `special_tokens`, each window starts with the tokenizer's prefix ids (e.g. BOS), which are never scored."""
    from .models.export import load_tokenizer, resolve_model
    from .runtime.evaluate import file_size, output_error, perplexity
    from .calibrate.textdata import load_text, special_prefix, token_windows

    fpath = resolve_model(str(float_model)) if float_model else None
    qpath = Path(quant_model) if quant_model else None
    if qpath is not None and qpath.is_dir() and (qpath / "model.onnx").is_file():  # a generation-ready folder
        qpath = qpath / "model.onnx"
    tok = load_tokenizer(Path(tokenizer_from) if tokenizer_from else (fpath or qpath))
    windows = token_windows(tok, load_text(text), seq_len, max(tokens // seq_len, 1), special_tokens=special_tokens)
    prefix = special_prefix(tok) if special_tokens else []

    def score(p: Path) -> ModelScore:
        t = time.perf_counter()
        ppl = perplexity(p, windows, ep=ep, context=max(1, len(prefix)))
        return ModelScore(str(p), float(ppl), file_size(p) / 2**20, round(time.perf_counter() - t, 2))

    f = score(Path(fpath)) if fpath else None
    q = score(qpath) if qpath else None
    err = output_error(fpath, qpath, windows[:1], ep=ep) if fpath and qpath else {}
    return EvalReport(str(text), int(windows.size), seq_len, ep, f, q, err, special_tokens=special_tokens,
                      prefix=[int(i) for i in prefix])
