"""The benchmark harness on a tiny model (seconds): job processes, scoring, latency with KV cache, plot, table.md."""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks import latency as L
from benchmarks import run as R
from benchmarks.job import first_line
from benchmarks.plot import pareto, points

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One run of the smoke suite, table.md included (written under the run's own results folder)."""
    tmp = tmp_path_factory.mktemp("bench")
    table = tmp / "results" / "table.md"
    rc = R.main(["--suite", "smoke", "--out", str(tmp / "results"), "--work", str(tmp / "work"),
                 "--update-table", "--table", str(table)])
    assert rc == 0
    (json_path,) = (tmp / "results").glob("*-smoke.json")
    return tmp, json.loads(json_path.read_text()), json_path, table


def _vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.inf


def test_smoke_rows(smoke):
    _, data, _, _ = smoke
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["float (fp32 export)", "onnxq:rtn W4 g32 asym", "ort:default W4 g32 asym",
                          "ort:default W3 g32 asym", "ort:gptq W2 g32 asym"]
    fp = rows["float (fp32 export)"]
    for name in ("float (fp32 export)", "onnxq:rtn W4 g32 asym", "ort:default W4 g32 asym"):
        r = rows[name]
        assert "error" not in r and "latency_error" not in r, r
        for key in ("ppl", "bpw", "size_mb"):
            assert math.isfinite(r[key]) and r[key] > 0
        lat = r["latency"]
        assert lat["prefill_tokens"] == 32 and lat["decode_tokens"] == 8 and lat["repeats"] == 3
        assert 0 < lat["decode_tok_s"]["min"] <= lat["decode_tok_s"]["median"] <= lat["decode_tok_s"]["max"]
        assert math.isfinite(lat["prefill_tok_s"]) and lat["prefill_tok_s"] > 0
        if r is not fp:
            assert r["seconds"] > 0 and r["peak_rss_mb"] > 0
            assert r["quantized_layers"] == 14 and r["formats"] == ["MatMulNBits"]
            assert r["transplant"]["replaced"] == 14 and r["transplant_rel_l2"] < 1e-5
            assert abs(r["ppl"] - fp["ppl"]) / fp["ppl"] < 0.05  # W4 g32 on a random model: nearly lossless
            # 4-bit codes + fp32 scale + 4-bit zero point per 32 weights
            assert r["bpw"] == pytest.approx(4 + (32 + 4) / 32, abs=1e-3)
            # peak RSS is the job's own, not inherited from this (larger) process
            assert r["peak_rss_mb"] < _vm_rss_mb()
    assert rows["onnxq:rtn W4 g32 asym"]["accuracy_level"] == [0]  # onnxq writes accuracy_level 0 (exact) unless a target asks otherwise
    assert rows["ort:default W4 g32 asym"]["accuracy_level"] == [0]
    assert rows["ort:default W3 g32 asym"]["error"] == "AssertionError: Only support 2, 4 or 8 bits quantization"
    assert rows["ort:gptq W2 g32 asym"]["unsupported"] and rows["ort:gptq W2 g32 asym"]["error"].startswith("Unsupported:")


def test_smoke_variants_and_outputs(smoke):
    tmp, data, json_path, table = smoke
    forms = [(v["label"], v["form"]) for v in data["variants"]]
    assert forms == [(lbl, f"MatMulNBits, accuracy_level {a}") for lbl in ("onnxq:rtn W4 g32 asym", "ort:default W4 g32 asym")
                     for a in (0, 4)]
    for v in data["variants"]:
        assert math.isfinite(v["ppl"]) and v["latency"]["decode_tok_s"]["median"] > 0
    head = data["header"]
    for key in ("command", "machine", "versions", "eval", "calibration", "latency"):
        assert head[key]
    assert head["command"] == "python -m benchmarks.run --suite smoke"
    assert "128 tokens" in head["eval"] and "256 tokens" in head["calibration"]
    png = json_path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    unmarked = lambda t: t.replace(" †", "").replace(" ‡", "")  # noqa: E731  (rows of a busy machine are marked)
    md = unmarked(json_path.with_suffix(".md").read_text())
    assert "| ort:default W3 g32 asym | failed: AssertionError: Only support 2, 4 or 8 bits quantization |" in md
    assert "| ort:gptq W2 g32 asym | not supported: ORT GPTQ packs" in md
    text = unmarked(table.read_text())
    assert "| onnxq:rtn W4 g32 asym | MatMulNBits acc 0 |" in text
    assert f"]({png.name})" in text and f"]({json_path.stem}.md)" in text  # links relative to table.md
    assert not list(table.parent.glob("*.tmp"))
    # the with-past copies are removed unless --keep
    assert not list((tmp / "work").glob("*-past.onnx"))


def test_cuda_fails_in_one_line(tmp_path, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    assert R.main(["--suite", "smoke", "--ep", "cuda", "--out", str(tmp_path), "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: execution provider 'cuda'") and "onnxruntime-gpu" in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_device_cuda_fails_in_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    assert R.main(["--suite", "smoke", "--device", "cuda", "--out", str(tmp_path), "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda: this torch sees no CUDA device") and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_solver_device_reaches_onnxq_jobs_only(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, **kw):
        seen.append(json.loads(cmd[3]))
        raise SystemExit  # stop before any work: only the job's config matters here

    monkeypatch.setattr(R.subprocess, "run", fake_run)
    for cfg in (R.SUITES["cuda"][0], R.SUITES["cuda"][1]):  # an ORT row, then an onnxq row
        with pytest.raises(SystemExit):
            R.run_job(cfg, tmp_path / "m.onnx", tmp_path / "o.onnx", calib_npy=tmp_path / "c.npy", ep="cuda", device="cuda")
    assert [c["tool"] for c in seen] == ["ort", "onnxq"]
    assert "device" not in seen[0] and seen[1]["device"] == "cuda" and seen[1]["ep"] == "cuda"


def test_table_shows_cpu_ep_ppl_when_run_off_cpu():
    rows = [{"label": "float (fp32 export)", "ppl": 22.0, "ppl_cpu_ep": 22.001},
            {"label": "onnxq:rtn W4 g128 asym", "ppl": 25.0, "ppl_cpu_ep": 25.002, "bpw": 4.25, "formats": ["MatMulNBits"]},
            {"label": "ort:hqq W3 g128 asym", "error": "boom"}]
    lines = R.table(rows)
    assert lines[0].split(" | ")[2:4] == ["PPL", "PPL (CPU EP)"]
    assert all(l.count("|") == lines[0].count("|") for l in lines)
    assert "| 25.00 | 25.00 | +3.00 | 4.250 |" in lines[3]
    assert "PPL (CPU EP)" not in R.table([{k: v for k, v in r.items() if k != "ppl_cpu_ep"} for r in rows])[0]


def test_latency_needs_past(smoke):
    from onnxq.errors import OnnxqError

    tmp, *_ = smoke
    with pytest.raises(OnnxqError, match="with-past"):
        L.measure(tmp / "work" / "tiny-llama" / "model.onnx", prefill=8, decode=2, context=4, repeats=1)


def test_restamp_and_transplant_refusal(smoke, tmp_path):
    from onnxq.errors import OnnxqError
    from onnxq.inspect import inspect_model

    tmp, *_ = smoke
    work = tmp / "work"
    quant = work / "smoke-0.onnx"  # onnxq rtn W4 g32, accuracy_level 4
    assert L.restamp(quant, tmp_path / "acc0.onnx", 0) == 14
    levels = {l["accuracy_level"] for l in inspect_model(tmp_path / "acc0.onnx")["layers"] if l["format"] != "float"}
    assert levels == {0}
    with pytest.raises(OnnxqError, match="no quantized layer"):
        L.transplant(work / "tiny-llama" / "model.onnx", work / "tiny-llama-past" / "model.onnx", tmp_path / "x.onnx")
    from onnxq import QuantRecipe
    from onnxq.pipeline import quantize

    rotated = tmp_path / "rot.onnx"
    quantize(work / "tiny-llama" / "model.onnx", QuantRecipe(algo="rtn", bits=4, group_size=32, rotate=True), rotated,
             progress=False)
    with pytest.raises(OnnxqError, match="--rotate.*quantize the with-past export"):
        L.transplant(rotated, work / "tiny-llama-past" / "model.onnx", tmp_path / "y.onnx")


def test_first_line_and_pareto():
    assert first_line(ValueError("\n  bad thing\nmore")) == "ValueError: bad thing"
    assert first_line(AssertionError()) == "AssertionError"
    rows = [{"label": "float (fp32 export)", "tool": "float", "ppl": 10.0, "bpw": 32.0}]
    rows += [{"label": f"onnxq:gptq W{b} g128 asym", "tool": "onnxq", "ppl": p, "bpw": b + 0.3}
             for b, p in ((2, 40.0), (3, 14.0), (4, 11.0), (8, 10.1))]
    rows += [{"label": "onnxq:rtn W4 g32 asym", "tool": "onnxq", "ppl": 12.0, "bpw": 5.1},  # dominated
             {"label": "ort:hqq W4 g128 asym", "tool": "ort", "ppl": float("nan"), "bpw": 4.3},  # not plottable
             {"label": "ort:rtn W3 g128 asym", "tool": "ort", "error": "NotHonored: ..."}]
    pts = points(rows)
    assert len(pts) == 5
    assert [p["bpw"] for p in pareto(pts)] == [2.3, 3.3, 4.3, 8.3]


def test_byte_tokens_windows():
    from onnxq.calibrate.textdata import token_windows

    w = token_windows(R.ByteTokens(), "hello world, " * 20, 16, 3)
    assert w.shape == (3, 16) and w.dtype == np.int64 and w.max() < 256


def test_resume_runs_only_missing_rows(smoke, tmp_path):
    tmp, data, json_path, _ = smoke
    cut = tmp_path / json_path.name
    kept = data["rows"][:2]  # float and onnxq rtn; pretend the run stopped there
    kept[1] = {**kept[1], "ppl": 123.0, "cpu_share": {}}  # a marker a rerun would overwrite
    R.write(cut.with_suffix(""), data["header"], kept, [])
    assert data["header"]["rows_planned"] == 5
    assert "**Partial run: 2 of 5 rows so far.**" in cut.with_suffix(".md").read_text()
    rc = R.main(["--suite", "smoke", "--resume", str(cut), "--work", str(tmp / "work"), "--no-latency", "--no-plot"])
    assert rc == 0
    out = json.loads(cut.read_text())
    assert [r["label"] for r in out["rows"]] == [r["label"] for r in data["rows"]]
    assert out["rows"][1]["ppl"] == 123.0  # kept, not rerun
    assert out["rows"][2]["ppl"] == pytest.approx(data["rows"][2]["ppl"], rel=1e-6)  # rerun, same PPL
    assert out["header"]["command"] == data["header"]["command"] and len(out["header"]["resumed"]) == 1
    assert "| onnxq:rtn W4 g32 asym | MatMulNBits acc 0 | 123.00 |" in cut.with_suffix(".md").read_text()
    assert "Partial run" not in cut.with_suffix(".md").read_text()


def test_resume_of_a_missing_file_fails_in_one_line(tmp_path, capsys):
    assert R.main(["--suite", "smoke", "--resume", str(tmp_path / "nope.json"), "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume") and "no such results file" in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_a_corrupt_resume_file_fails_before_any_work(tmp_path, capsys):
    """--resume with no value reads today's file of the suite: a broken one fails in one line before the model loads."""
    out = tmp_path / "results"
    out.mkdir()
    (out / f"{dt.date.today().isoformat()}-smoke.json").write_text("{not json")
    work = tmp_path / "work"
    assert R.main(["--suite", "smoke", "--resume", "--out", str(out), "--work", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume") and "not a results JSON" in err and "\n" not in err
    assert not work.exists()


def test_resume_reruns_busy_rows_and_rows_of_another_cpu(smoke, tmp_path):
    tmp, data, json_path, _ = smoke
    cut = tmp_path / json_path.name
    rows = [dict(r, cpu_share={}) for r in data["rows"]]
    rows[1] = {**rows[1], "ppl": 123.0}  # clean: kept
    rows[2] = {**rows[2], "ppl": 456.0, "cpu_share": {"other_cpu": 0.4, "steal": 0.0}}  # busy: rerun
    rows[3] = {**rows[3], "cpu": "Some Other CPU [avx512f], 2 cores"}  # another CPU: rerun
    R.write(cut.with_suffix(""), data["header"], rows, [])
    md = cut.with_suffix(".md").read_text()
    assert f"| {rows[2]['label']} † |" in md and f"| {rows[3]['label']} ‡ |" in md
    assert f"{rows[2]['label']}: 40% other, 0% steal" in md and "on Some Other CPU [avx512f], 2 cores" in md
    rc = R.main(["--suite", "smoke", "--resume", str(cut), "--rerun-busy", "--work", str(tmp / "work"),
                 "--no-latency", "--no-plot"])
    assert rc == 0
    out = json.loads(cut.read_text())["rows"]
    assert out[1]["ppl"] == 123.0
    assert out[2]["ppl"] == pytest.approx(data["rows"][2]["ppl"], rel=1e-6)
    assert out[3]["cpu"] == R.cpu_name() and set(out[2]["cpu_share"]) == {"other_cpu", "steal"}


def test_cpu_share_arithmetic(monkeypatch):
    hz, n = os.sysconf("SC_CLK_TCK"), os.cpu_count()
    ticks = lambda busy, steal: [busy, 0, 0, 1000, 0, 0, 0, steal]  # noqa: E731
    snaps = iter([(0.0, ticks(0, 0), 0.0), (10.0, ticks(int(8 * n * hz), int(n * hz)), 3.0 * n)])
    monkeypatch.setattr(R.CpuShare, "_now", staticmethod(lambda: next(snaps)))
    share = R.CpuShare().shares()  # 8 s per core busy, 3 s per core our own: 5 of 10 s per core by others
    assert share == {"other_cpu": 0.5, "steal": 0.1}
    assert R.busy({"cpu_share": share}) and not R.busy({"cpu_share": {"other_cpu": 0.05, "steal": 0.0}})


def test_cpu_share_sees_another_process():
    import subprocess
    import sys
    import time

    share = R.CpuShare()
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"])
    time.sleep(1.2)  # the burner is not waited for: its CPU time is not ours
    seen = share.shares()
    burner.wait()
    assert seen["other_cpu"] >= 0.8 / (1.2 * os.cpu_count()) - 0.05


def test_help_prints(capsys):
    with pytest.raises(SystemExit) as stop:
        R.main(["--help"])
    assert stop.value.code == 0
    assert "--rerun-busy" in capsys.readouterr().out


def test_a_resumed_run_cut_short_again_keeps_every_row(smoke, tmp_path, monkeypatch):
    """--rerun-busy reruns rows 1 and 2; the run dies while rerunning row 2: the file still has all five rows, row 1
    new, row 2 still the old (busy) one, rows 3 and 4 kept."""
    tmp, data, json_path, _ = smoke
    cut = tmp_path / json_path.name
    rows = [dict(r, cpu_share={}) for r in data["rows"]]
    rows[1] = {**rows[1], "ppl": 111.0, "cpu_share": {"other_cpu": 0.5, "steal": 0.0}}
    rows[2] = {**rows[2], "ppl": 222.0, "cpu_share": {"other_cpu": 0.5, "steal": 0.0}}
    rows[3], rows[4] = {**rows[3], "ppl": 333.0}, {**rows[4], "ppl": 444.0}
    R.write(cut.with_suffix(""), data["header"], rows, [])
    real, calls = R.run_job, []

    def dies_on_the_second_job(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(R, "run_job", dies_on_the_second_job)
    with pytest.raises(KeyboardInterrupt):
        R.main(["--suite", "smoke", "--resume", str(cut), "--rerun-busy", "--work", str(tmp / "work"),
                "--no-latency", "--no-plot"])
    out = json.loads(cut.read_text())["rows"]
    assert [r["label"] for r in out] == [r["label"] for r in data["rows"]]
    assert out[1]["ppl"] == pytest.approx(data["rows"][1]["ppl"], rel=1e-6)  # rerun
    assert [r["ppl"] for r in out[2:]] == [222.0, 333.0, 444.0]


def test_a_resume_with_skip_keeps_the_skipped_rows_of_the_file(smoke, tmp_path):
    tmp, data, json_path, _ = smoke
    cut = tmp_path / json_path.name
    rows = [dict(r, cpu_share={}) for r in data["rows"]]
    skipped = rows[3]["label"]
    assert sum(skipped in r["label"] for r in rows) == 1
    R.write(cut.with_suffix(""), data["header"], rows[:2] + rows[3:], [])  # row 2 missing
    rc = R.main(["--suite", "smoke", "--resume", str(cut), "--skip", skipped, "--work", str(tmp / "work"),
                 "--no-latency", "--no-plot"])
    assert rc == 0
    out = json.loads(cut.read_text())
    assert [r["label"] for r in out["rows"]] == [r["label"] for r in data["rows"]]  # row 2 run, row 3 kept
    assert out["header"]["rows_planned"] == data["header"]["rows_planned"]


def test_decode_with_the_cache_bound_to_a_device_matches_numpy(tmp_path):
    """The IOBinding decode (the KV cache stays on the EP's device; used on CUDA) gives the numpy path's logits;
    checked here with the cache bound to the CPU."""
    from onnxq.runtime.session import make_session

    _, past = R.tiny_models(tmp_path)
    session = make_session(past, "cpu")
    tokens = np.arange(24, dtype=np.int64) * 7 % 256
    t_host, host = L.decode_steps(session, tokens, 12, 6)
    t_bound, bound = L.decode_steps(session, tokens, 12, 6, device="cpu")
    assert host.shape == bound.shape == (1, 1, 256) and t_host > 0 and t_bound > 0
    np.testing.assert_allclose(bound, host, rtol=1e-5, atol=1e-5)
    _, shorter = L.decode_steps(session, tokens, 12, 5, device="cpu")
    assert not np.allclose(shorter, bound)  # the cache really advanced: another position, other logits


def _solver_row(algo: str, bits: int, group: int, ppl: float, **kw) -> dict:
    cfg = dict(tool="onnxq", algo=algo, bits=bits, group_size=group, sym=False, format="nbits", **kw)
    return {"label": R.label(cfg), **cfg, "ppl": ppl}


def test_solver_order_names_the_pair_that_breaks_it():
    rows = [{"label": "float (fp32 export)", "tool": "float", "ppl": 20.0}]
    rows += [_solver_row(a, 3, 128, p) for a, p in (("rtn", 90.0), ("gptq", 34.0), ("boa", 34.0), ("turboboa", 31.0))]
    rows += [_solver_row(a, 2, 64, p) for a, p in (("rtn", 1e5), ("gptq", 108.0), ("boa", 115.0), ("turboboa", 71.0))]
    rows += [_solver_row("rtn", 2, 64, 1.0, float_zero=True),  # float zero points and gso rows are not in the chain
             _solver_row("gptq", 2, 64, 1.0, refine_scales=True),
             _solver_row("rtn", 2, -1, 5.0)]  # only one solver at W2 pc: no line
    lines = R.solver_order(rows)
    w3, w2 = (next(l for l in lines if l.startswith(f"- {s}:")) for s in ("W3 g128", "W2 g64"))
    assert w3.endswith(": holds")  # BoA = GPTQ is allowed (≤)
    assert w2.endswith("does not hold (boa 115.000 > gptq 108.000)")
    assert not any(l.startswith("- W2 pc") for l in lines)
    assert R.solver_order(rows[:1]) == []


def test_render_rewrites_outputs_from_the_json_alone(smoke, tmp_path, capsys):
    tmp, data, json_path, _ = smoke
    copy = tmp_path / json_path.name
    shutil.copy(json_path, copy)
    table = tmp_path / "table.md"
    assert R.main(["--render", str(copy), "--update-table", "--table", str(table)]) == 0
    assert copy.with_suffix(".md").read_text() == json_path.with_suffix(".md").read_text()
    assert copy.with_suffix(".png").stat().st_size > 0
    assert data["rows"][1]["label"] in table.read_text()
    copy.write_text("{not json")
    assert R.main(["--render", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a results JSON" in err[0]


def test_render_keeps_the_dots_of_a_results_name(smoke, tmp_path):
    _, _, json_path, _ = smoke
    copy = tmp_path / "w3-d0.1.json"
    shutil.copy(json_path, copy)
    assert R.main(["--render", str(copy)]) == 0
    assert (tmp_path / "w3-d0.1.md").is_file() and (tmp_path / "w3-d0.1.png").is_file()
    assert not (tmp_path / "w3-d0.md").exists()


def test_quant_repeats_quote_the_median_and_check_identical_files(tmp_path):
    """--quant-repeats 3: every quantized row keeps three wall times, quotes their median, and repeats byte-identically."""
    rc = R.main(["--suite", "smoke", "--only", "W4", "--quant-repeats", "3", "--out", str(tmp_path / "results"),
                 "--work", str(tmp_path / "work"), "--no-latency", "--no-plot"])
    assert rc == 0
    (json_path,) = (tmp_path / "results").glob("*-smoke.json")
    data = json.loads(json_path.read_text())
    quantized = [r for r in data["rows"] if r["tool"] != "float"]
    assert [r["label"] for r in quantized] == ["onnxq:rtn W4 g32 asym", "ort:default W4 g32 asym"]
    for r in quantized:
        assert len(r["seconds_runs"]) == 3 and r["repeats_identical"] is True, r
        assert r["seconds"] == pytest.approx(float(np.median(r["seconds_runs"])), abs=0.01)
        assert r["peak_rss_mb"] == pytest.approx(float(np.median(r["peak_rss_mb_runs"])), abs=0.1)
        cell = f"{r['seconds']:.1f} [{min(r['seconds_runs']):.1f}–{max(r['seconds_runs']):.1f}]"
        assert cell in json_path.with_suffix(".md").read_text()
    assert "median [min–max] of 3 runs" in data["header"]["quant time"]
    assert data["header"]["command"].endswith("--quant-repeats 3 --no-latency")
    assert R.main(["--suite", "smoke", "--quant-repeats", "0"]) == 2


def test_file_digest_sees_external_data(tmp_path):
    a, b = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    for p, data in ((a, b"w1"), (b, b"w2")):
        p.parent.mkdir()
        p.write_bytes(b"graph")
        p.with_name(p.name + ".data").write_bytes(data)
    assert R.file_digest(a) != R.file_digest(b)
    b.with_name(b.name + ".data").write_bytes(b"w1")
    assert R.file_digest(a) == R.file_digest(b)


def test_resume_keeps_the_quant_repeats_of_the_file(smoke, tmp_path, capsys):
    """A file timed over one run cannot be finished with --quant-repeats 3 (its rows would mix single runs and medians)."""
    tmp, data, json_path, _ = smoke
    cut = tmp_path / json_path.name
    R.write(cut.with_suffix(""), data["header"], data["rows"][:2], [])
    assert R.main(["--suite", "smoke", "--resume", str(cut), "--quant-repeats", "3", "--work", str(tmp / "work")]) == 2
    err = capsys.readouterr().err.strip()
    assert "give --quant-repeats 1" in err and "\n" not in err


def test_stop_by_leaves_rows_that_would_end_too_late(smoke, tmp_path, capsys):
    """--stop-by with estimates: the row estimated at a day is not started, the others run; the file is partial and
    says how to finish it; every new row records its scoring time."""
    tmp, data, json_path, _ = smoke
    cut = tmp_path / json_path.name
    R.write(cut.with_suffix(""), data["header"], data["rows"][:1], [])
    long = data["rows"][2]["label"]
    est = tmp_path / "earlier.json"
    est.write_text(json.dumps({"rows": [{"label": long, "seconds": 86400.0}], "header": {}, "variants": []}))
    rc = R.main(["--suite", "smoke", "--resume", str(cut), "--stop-by", "23:59", "--estimate-from", str(est),
                 "--work", str(tmp / "work"), "--no-latency", "--no-plot"])
    assert rc == 0
    out = json.loads(cut.read_text())
    labels = [r["label"] for r in out["rows"]]
    assert long not in labels and len(labels) == len(data["rows"]) - 1
    assert all(r["score_seconds"] >= 0 for r in out["rows"][1:])
    assert f"not started ({long})" in capsys.readouterr().out
    assert "**Partial run:" in cut.with_suffix(".md").read_text()


def test_stop_by_in_the_past_starts_nothing_and_bad_values_fail_in_one_line(smoke, tmp_path, capsys):
    tmp, data, json_path, _ = smoke
    cut = tmp_path / json_path.name
    R.write(cut.with_suffix(""), data["header"], data["rows"][:2], [])
    rc = R.main(["--suite", "smoke", "--resume", str(cut), "--stop-by", "2020-01-01T00:00",
                 "--work", str(tmp / "work"), "--no-latency", "--no-plot"])
    assert rc == 0 and len(json.loads(cut.read_text())["rows"]) == 2
    capsys.readouterr()
    for bad, says in ((["--stop-by", "soon"], "not a time"), (["--stop-by", "25:00"], "not a time"),
                      (["--estimate-from", str(tmp_path / "nope.json"), "--stop-by", "23:00"], "not a results JSON"),
                      (["--estimate-from", str(json_path)], "give --stop-by WHEN too")):
        assert R.main(["--suite", "smoke", *bad, "--work", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {bad[0]}") and says in err and "\n" not in err


def test_readme_links_the_generated_table():
    """The full table lives in benchmarks/results/table.md (generated), and the README links to it."""
    text = (ROOT / "benchmarks" / "results" / "table.md").read_text()
    assert "do not edit" in text and text.count("| onnxq:turboboa ") >= 7
    assert "(benchmarks/results/table.md)" in (ROOT / "README.md").read_text()
    assert R.TABLE == ROOT / "benchmarks" / "results" / "table.md"


def test_memory_benchmark_reads_the_report_and_samples_both_processes(tmp_path):
    """benchmarks.memory on a tiny Llama: the report's peak, the sampled sums (never below the process's own RSS at
    the samples), and the same output file with one solver lane."""
    from benchmarks import memory
    from tests.tiny import tiny_llama_onnx

    model = tiny_llama_onnx(tmp_path)
    assert memory.main(["--model", str(model), "--algos", "rtn", "rtn:1", "--work", str(tmp_path / "w"),
                        "--out", str(tmp_path), "--name", "m"]) == 0
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["algo"] for r in rows] == ["rtn", "rtn:1"]
    assert all(r["process_mib"] > 50 and r["sum_pss_mib"] > 50 and r["helper_mib"] == 0 for r in rows)
    assert rows[0]["output_sha1"] == rows[1]["output_sha1"]
    assert "| rtn:1 |" in (tmp_path / "m.md").read_text()


def test_graph_load_runs_each_loader_on_the_same_file(tmp_path, capfd):
    """benchmarks.graph_load on a tiny Llama: one table row per loader, each counting the same initializers."""
    from benchmarks import graph_load
    from tests.tiny import tiny_llama_onnx

    assert graph_load.main(["--model", str(tiny_llama_onnx(tmp_path))]) == 0
    rows = [line.split("|")[1:-1] for line in capfd.readouterr().out.splitlines() if line.startswith("| onnx")]
    assert [r[0].strip() for r in rows] == list(graph_load.LOADERS)
    assert len({r[1].strip() for r in rows}) == 1 and all(float(r[3]) > 0 for r in rows)
