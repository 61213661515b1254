"""Vendored SOTU split, text loading and token windows."""
import numpy as np
import pytest

from onnxq.errors import OnnxqError
from onnxq.calibrate.textdata import (
    CALIB_YEARS, EVAL_YEARS, load_text, sotu_dir, sotu_files, special_prefix, token_windows,
)
from tests.tiny import byte_tokenizer


class PositionTokenizer:
    """One token per word whose id is the word's position, so windows show where they came from."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = list(range(len(text.split())))
        return {"input_ids": ([-1] if add_special_tokens else []) + ids}


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_vendored_split_is_disjoint_and_complete():
    years = [int(p.name[:4]) for p in sotu_dir().glob("*.txt")]
    calib = {int(p.name[:4]) for p in sotu_files(CALIB_YEARS)}
    held_out = {int(p.name[:4]) for p in sotu_files(EVAL_YEARS)}
    assert calib == set(range(1990, 2017)) and held_out == set(range(2017, 2022))
    assert not calib & held_out
    assert sorted(years) == sorted(calib | held_out)  # every vendored speech is in exactly one set
    assert sum(p.stat().st_size for p in sotu_dir().iterdir()) < 2_000_000
    assert "0.2.3" in (sotu_dir() / "PROVENANCE.md").read_text()


def test_eval_text_never_appears_in_calibration_text():
    calib, held_out = load_text("sotu-calib"), load_text("sotu-eval")
    for path in sotu_files(EVAL_YEARS):
        speech = path.read_text(encoding="utf-8").strip()
        assert speech in held_out
        middle = len(speech) // 2
        assert speech[middle: middle + 200] not in calib
    assert len(calib) > 5 * len(held_out)


def test_load_text_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "skip.md").write_text("not text")
    assert load_text(tmp_path / "b.txt") == "second"
    assert load_text(str(tmp_path)) == "first\n\nsecond"


@pytest.mark.parametrize("content", [None, "", " \n\t "])
def test_load_text_errors(tmp_path, content):
    source = tmp_path / "t.txt"
    if content is not None:
        source.write_text(content)
    with pytest.raises(OnnxqError):
        load_text(source)


def test_load_text_empty_folder(tmp_path):
    with pytest.raises(OnnxqError, match="empty"):
        load_text(tmp_path)


def test_contiguous_windows_start_at_the_beginning():
    windows = token_windows(PositionTokenizer(), words(105), 10, special_tokens=False)
    assert windows.dtype == np.int64
    np.testing.assert_array_equal(windows, np.arange(100).reshape(10, 10))  # no special token, tail dropped
    np.testing.assert_array_equal(token_windows(PositionTokenizer(), words(105), 10, 3, special_tokens=False),
                                  np.arange(30).reshape(3, 10))


def test_random_windows_are_disjoint_runs_and_seeded():
    tok, text = PositionTokenizer(), words(1000)
    windows = token_windows(tok, text, 16, 20, seed=3, random=True, special_tokens=False)
    assert windows.shape == (20, 16)
    assert (np.diff(windows, axis=1) == 1).all()  # each window is a contiguous run of the text
    starts = windows[:, 0]
    assert (np.diff(starts) >= 16).all() and starts[0] >= 0 and windows.max() < 1000
    np.testing.assert_array_equal(windows, token_windows(tok, text, 16, 20, seed=3, random=True, special_tokens=False))
    assert not np.array_equal(windows, token_windows(tok, text, 16, 20, seed=4, random=True, special_tokens=False))
    assert not np.array_equal(windows, token_windows(tok, text, 16, 20, special_tokens=False))


def test_random_windows_fill_an_exact_fit():
    windows = token_windows(PositionTokenizer(), words(64), 16, 4, seed=1, random=True, special_tokens=False)
    np.testing.assert_array_equal(windows, np.arange(64).reshape(4, 16))


def test_window_errors():
    with pytest.raises(OnnxqError, match="calibration text has 5 tokens; need at least 10"):
        token_windows(PositionTokenizer(), words(5), 10, special_tokens=False)
    with pytest.raises(OnnxqError, match="room for 3 windows"):
        token_windows(PositionTokenizer(), words(35), 10, 4, special_tokens=False)
    with pytest.raises(OnnxqError):
        token_windows(PositionTokenizer(), words(35), 10, 0, random=True)
    with pytest.raises(OnnxqError, match="no room for text after the tokenizer's 1 prefix tokens"):
        token_windows(PositionTokenizer(), words(35), 1)


class SuffixTokenizer(PositionTokenizer):
    """Adds an end-of-sequence id after the text (and nothing before it) in normal use."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": super().__call__(text, False)["input_ids"] + ([-2] if add_special_tokens else [])}


def test_special_prefix_is_what_the_tokenizer_puts_before_a_text():
    assert special_prefix(PositionTokenizer()) == [-1]
    assert special_prefix(SuffixTokenizer()) == []
    assert special_prefix(byte_tokenizer(bos=True)) == [0]
    assert special_prefix(byte_tokenizer()) == []


@pytest.mark.parametrize("random", [False, True])
def test_windows_start_with_the_prefix_then_text(random):
    windows = token_windows(PositionTokenizer(), words(100), 10, 5, seed=2, random=random)
    assert windows.shape == (5, 10) and windows.dtype == np.int64
    assert (windows[:, 0] == -1).all()  # the prefix, then 9 contiguous text tokens
    assert (np.diff(windows[:, 1:], axis=1) == 1).all() and (np.diff(windows[:, 1]) >= 9).all()
    if not random:
        np.testing.assert_array_equal(windows[:, 1:], np.arange(45).reshape(5, 9))
    np.testing.assert_array_equal(token_windows(SuffixTokenizer(), words(100), 10, 5),
                                  token_windows(SuffixTokenizer(), words(100), 10, 5, special_tokens=False))


def test_bos_windows_of_a_real_tokenizer():
    tok, text = byte_tokenizer(bos=True), "hello world, " * 20
    windows = token_windows(tok, text, 16, 4)
    assert (windows[:, 0] == 0).all()
    np.testing.assert_array_equal(windows[:, 1:].reshape(-1), tok(text, add_special_tokens=False)["input_ids"][:60])
    assert (token_windows(tok, text, 16, 4, special_tokens=False)[:, 0] != 0).all()
