"""benchmarks.compare: deterministic columns must repeat, times become ratios (synthetic results files)."""
from __future__ import annotations

import json

import pytest

from benchmarks import compare as C


def _row(label, ppl=25.0, seconds=10.0, decode=(30.0, 28.0, 32.0), prefill_ms=(1000.0, 900.0, 1100.0), **kw):
    lat = {"decode_tok_s": dict(zip(("median", "min", "max"), decode)), "prefill_tokens": 512,
           "prefill_ms": dict(zip(("median", "min", "max"), prefill_ms))}
    return {"label": label, "ppl": ppl, "bpw": 4.5, "size_mb": 100.0, "seconds": seconds, "latency": lat, **kw}


def _file(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text(json.dumps({"header": {"command": "python -m benchmarks.run --suite x", "date": "d",
                                           "machine": "m"}, "rows": rows, "variants": []}))
    return path


def test_identical_runs_agree_and_ratios_are_rerun_over_first(tmp_path):
    a = _file(tmp_path, "a.json", [_row("x"), _row("y", error="failed: E: boom\nmore"), _row("only in a")])
    b = _file(tmp_path, "b.json", [_row("x", ppl=25.001, seconds=12.0, decode=(15.0, 14.0, 16.0),
                                        prefill_ms=(500.0, 450.0, 550.0)), _row("y", error="failed: E: boom")])
    out = tmp_path / "cmp.md"
    assert C.main([str(a), str(b), "-o", str(out)]) == 0
    (x, y) = C.compare(json.loads(a.read_text()), json.loads(b.read_text()))
    assert not x.mismatches and not y.mismatches
    assert x.ratios["seconds"] == pytest.approx(1.2) and x.ratios["decode"] == pytest.approx(0.5)
    assert x.ratios["prefill"] == pytest.approx(2.0)
    assert x.overlap == {"decode": False, "prefill": False}
    text = out.read_text()
    assert "| y | same error |" in text and "only in a" not in text
    assert "agree on 2" in text and "quantization time, rerun / first: 1.20–1.20" in text


@pytest.mark.parametrize("change, field", [({"ppl": 25.1}, "ppl"), ({"bpw": 4.25}, "bpw"), ({"ppl": None}, "ppl"),
                                           ({"error": "failed: other"}, "error")])
def test_a_deterministic_difference_fails(tmp_path, change, field):
    a = _file(tmp_path, "a.json", [_row("x")])
    b = _file(tmp_path, "b.json", [{**_row("x"), **change}])
    assert C.main([str(a), str(b), "-o", str(tmp_path / "c.md")]) == 1
    assert field in C.compare(json.loads(a.read_text()), json.loads(b.read_text()))[0].mismatches
    assert f"differ on 1: x ({field}" in (tmp_path / "c.md").read_text()


def test_bad_inputs_fail_in_one_line(tmp_path, capsys):
    a = _file(tmp_path, "a.json", [_row("x")])
    (tmp_path / "bad.json").write_text("{not json")
    assert C.main([str(a), str(tmp_path / "bad.json")]) == 2
    assert C.main([str(a), str(_file(tmp_path, "b.json", [_row("z")]))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: cannot read results file") and "no row label in common" in err[1]


def test_errors_match_across_work_file_names_and_cut_lengths():
    a = _row("x", error="evaluation failed: cannot load quick-5.onnx (bad kernel): check it or re")
    b = _row("x", error="evaluation failed: cannot load full-8.onnx (bad kernel): check it or re-")
    c = _row("x", error="evaluation failed: cannot load full-8.onnx (other kernel): check it or re-")
    assert not C.compare_rows(a, b).mismatches and C.compare_rows(a, c).mismatches == ["error"]


def test_variants_are_compared_as_rows():
    variant = {"label": "x", "form": "MatMulNBits, accuracy_level 4", "ppl": 26.0,
               "latency": _row("x")["latency"]}
    first = {"header": {}, "rows": [_row("x")], "variants": [variant]}
    same = C.compare(first, {"header": {}, "rows": [_row("x")], "variants": [dict(variant)]})
    moved = C.compare(first, {"header": {}, "rows": [_row("x")], "variants": [{**variant, "ppl": 26.5}]})
    assert [d.label for d in same] == ["x", "x · MatMulNBits, accuracy_level 4"]
    assert not same[1].mismatches and same[1].ratios["decode"] == pytest.approx(1.0)
    assert moved[1].mismatches == ["ppl"]
