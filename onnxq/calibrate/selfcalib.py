"""Data-free calibration (`--calib self`): token windows sampled from the float model itself with ONNX Runtime.

All n sequences run as one batch through the model's KV-cache (with-past) export: optimum's, exported once per
registry name or Hugging Face folder into the cache (`onnxq.models.export.export_onnx`). A `.onnx` input uses its own
graph: its KV-cache inputs if it has them, else the `<folder>-past` export beside it (the cache's layout), else every
step recomputes the whole prefix on the no-past graph, which costs about seq_len/2 cached runs and is refused beyond
RECOMPUTE_MAX_LEN tokens. Each window starts as the text windows do: with the ids the tokenizer puts before a text
(`special_prefix`, e.g. BOS); a tokenizer that adds none starts each window with a seeded choice among common document
openings (STARTS). Special tokens (EOS, BOS, chat markers) are never sampled, so every window is text to its end.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import OnnxqError
from ..graph.io import sibling_path

# The sampler's settings: plain softmax (temperature 1) over the whole vocabulary (top_k 0), as LLM-QAT's data-free
# generation samples. Measured on SmolLM2, TurboBoA W4 g128 (benchmarks/results/selfcalib-2026-12-04*.md): top-k 50
# (Hugging Face generate()'s default) 26.41, the whole distribution 25.41, SOTU text 24.66; at W3 g128 temperature
# 0.9 / 1.0 / 1.2 gave 41.16 / 37.58 / 43.54 (selfcalib-2026-12-05-variants.md).
TEMPERATURE = 1.0
TOP_K = 0  # 0: no top-k restriction
STARTS = ("The", "In", "A", "It", "This", "We", "I", "When", "There", "One")  # openings where the tokenizer adds no BOS
RECOMPUTE_MAX_LEN = 64  # a graph without KV cache: longer windows cost over 32x a cached run; refused


def self_calibration(model: str | Path, recipe, *, ep: str = "cpu",
                     progress: bool = False) -> tuple[np.ndarray, float, str]:
    """`quantize`'s `--calib self`: windows of `recipe`'s size and seed, the seconds they took and their text."""
    from ..models.export import load_tokenizer

    windows, seconds = generate_windows(model, recipe.calib_windows, recipe.calib_seq_len, seed=recipe.seed, ep=ep,
                                        special_tokens=recipe.special_tokens, progress=progress)
    return windows, seconds, windows_text(load_tokenizer(generation_graph(model)), windows)


def generate_windows(model_source: str | Path, n: int, seq_len: int, *, seed: int, temperature: float = TEMPERATURE,
                     top_k: int = TOP_K, ep: str = "cpu", start_ids: Sequence[int] | None = None,
                     special_tokens: bool = True, progress: bool = False) -> tuple[np.ndarray, float]:
    """`[n, seq_len]` int64 windows sampled from the float model in one batch, and the seconds taken (export included).

    `start_ids` (ids every window starts with) replaces the default start; same seed, same windows. `progress`: a
    bar over the sampled positions."""
    from ..models.export import load_tokenizer
    from ..runtime.session import make_session

    t0 = time.perf_counter()
    if temperature <= 0 or top_k < 0:
        raise OnnxqError(f"sampling needs temperature > 0 and top_k >= 0 (0: all), not {temperature} and {top_k}: fix them")
    path = generation_graph(model_source)
    tokenizer = load_tokenizer(path)
    rng = np.random.default_rng(seed)
    starts = ([list(start_ids)] * n if start_ids is not None
              else start_tokens(tokenizer, n, rng, special_tokens=special_tokens))
    session = make_session(path, ep)
    step = make_stepper(session, seq_len)
    banned = banned_ids(tokenizer)

    def pick(logits: np.ndarray) -> np.ndarray:
        ids = [*banned, *range(len(tokenizer), logits.shape[1])]  # ids past the tokenizer's are padding
        return sample(logits, rng, temperature=temperature, top_k=top_k, banned=ids)

    windows = decode(step, starts, seq_len, pick, progress=progress)
    return windows, time.perf_counter() - t0


def generation_graph(source: str | Path) -> Path:
    """The graph to sample from: a registry name's or HF folder's with-past export (cached), else the .onnx itself
    or the `<folder>-past/model.onnx` export beside it."""
    from ..models.export import export_onnx

    path = Path(str(source))
    onnx_path = path if path.suffix == ".onnx" else path / "model.onnx"
    if onnx_path.is_file():
        sibling = onnx_path.parent.with_name(onnx_path.parent.name + "-past") / "model.onnx"
        return sibling if sibling.is_file() else onnx_path
    return export_onnx(str(source), with_past=True)


def start_tokens(tokenizer, n: int, rng: np.random.Generator, *, special_tokens: bool = True) -> list[list[int]]:
    """Each window's first ids: the tokenizer's `special_prefix` (e.g. BOS), else a seeded choice among STARTS."""
    from .textdata import special_prefix

    prefix = special_prefix(tokenizer) if special_tokens else []
    if prefix:
        return [prefix] * n
    words = [tokenizer(w, add_special_tokens=False, verbose=False)["input_ids"] for w in STARTS]
    words = [w for w in words if w]
    return [list(words[i]) for i in rng.integers(len(words), size=n)]


def banned_ids(tokenizer) -> list[int]:
    """Ids never sampled: the tokenizer's special tokens (BOS, EOS, padding, chat markers)."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return sorted(special | set(tokenizer.all_special_ids))


def sample(logits: np.ndarray, rng: np.random.Generator, *, temperature: float, top_k: int,
           banned: Sequence[int] = ()) -> np.ndarray:
    """One id per row of `logits` [b, V]: a draw from softmax(logits / temperature) over the row's top_k ids (0: all)
    not `banned`, in float64; one uniform number per row."""
    z = logits.astype(np.float64) / temperature
    banned = sorted({i for i in banned if i < z.shape[1]})
    z[:, banned] = -np.inf
    k = z.shape[1] - len(banned) if top_k == 0 else min(top_k, z.shape[1] - len(banned))
    top = np.argpartition(-z, k - 1, axis=1)[:, :k]
    zt = np.take_along_axis(z, top, axis=1)
    cdf = np.cumsum(np.exp(zt - zt.max(axis=1, keepdims=True)), axis=1)
    u = rng.random(len(z))[:, None] * cdf[:, -1:]
    pick = np.minimum((cdf <= u).sum(axis=1), k - 1)
    return top[np.arange(len(z)), pick]


def decode(step: Callable[[np.ndarray], np.ndarray], starts: list[list[int]], seq_len: int,
           pick: Callable[[np.ndarray], np.ndarray], *, progress: bool = False) -> np.ndarray:
    """`[len(starts), seq_len]` ids: row r begins with starts[r], then `pick` of `step`'s logits after each column."""
    from tqdm import tqdm

    tokens = np.zeros((len(starts), seq_len), np.int64)
    tokens[:, 0] = [s[0] for s in starts]
    for t in tqdm(range(1, seq_len), desc="sampling calibration", unit="token", disable=not progress):
        tokens[:, t] = pick(step(tokens[:, t - 1]))
        for r, s in enumerate(starts):
            if t < len(s):
                tokens[r, t] = s[t]
    return tokens


def make_stepper(session, seq_len: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function taking the next id of every row ([b]) and returning the logits after it ([b, V]): through the KV
    cache where the graph has one, else recomputing the prefix (refused beyond RECOMPUTE_MAX_LEN tokens)."""
    if any(i.name.startswith("past_key_values") for i in session.get_inputs()):
        return _cached_stepper(session)
    if seq_len > RECOMPUTE_MAX_LEN:
        raise OnnxqError(f"--calib self on a graph without KV cache recomputes every prefix ({seq_len}-token windows: "
                         f"~{seq_len // 2}x a cached run): give the HF folder or registry name, put its with-past "
                         f"export (onnxq export --with-past) beside it as <folder>-past, or use --calib-seq-len "
                         f"<= {RECOMPUTE_MAX_LEN}")
    return _recompute_stepper(session)


def _cached_stepper(session) -> Callable[[np.ndarray], np.ndarray]:
    """Stepper over a with-past graph: each present.* output is fed back as past_key_values.*."""
    from ..runtime.session import model_feeds

    names = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    present = {n: n.replace("past_key_values", "present") for n in names if n.startswith("past_key_values")}
    state: dict = {}

    def step(ids: np.ndarray) -> np.ndarray:
        b, pos = len(ids), state.get("pos", 0)
        feeds = model_feeds(session, ids[:, None])  # the first step's empty cache; dtypes of every input
        if pos:
            now = {"attention_mask": np.ones((b, pos + 1)), "position_ids": np.full((b, 1), pos)}
            feeds |= {k: v.astype(feeds[k].dtype) for k, v in now.items() if k in feeds} | state["past"]
        outs = dict(zip(outputs, session.run(None, feeds)))
        state.update(pos=pos + 1, past={p: outs[q] for p, q in present.items()})
        return outs[outputs[0]][:, -1]

    return step


def _recompute_stepper(session) -> Callable[[np.ndarray], np.ndarray]:
    """Stepper over a graph without KV cache: each step runs the whole prefix again."""
    from ..runtime.session import model_feeds

    logits = session.get_outputs()[0].name
    columns: list[np.ndarray] = []

    def step(ids: np.ndarray) -> np.ndarray:
        columns.append(ids)
        return session.run([logits], model_feeds(session, np.stack(columns, axis=1)))[0][:, -1]

    return step


def windows_text(tokenizer, windows: np.ndarray) -> str:
    """The windows decoded for reading (special tokens shown), each under a `--- window i ---` line."""
    return "".join(f"--- window {i + 1} ---\n{tokenizer.decode(row.tolist(), skip_special_tokens=False)}\n"
                   for i, row in enumerate(windows))


def calib_text_path(output: str | Path) -> Path:
    """Where the CLI writes the generated text without a report: `<output without .onnx>.calib.txt` (a folder
    output: `<folder>.calib.txt` beside it)."""
    return sibling_path(output, ".calib.txt", (".onnx",))

