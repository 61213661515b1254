"""Presets and recipe files: a preset is exactly the flags docs/options.md spells for it, a recipe file sets fields
under command-line options, and the written model carries the complete recipe."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import onnxq.pipeline
from onnxq.cli import app
from onnxq.errors import OnnxqError
from onnxq.graph.metadata import read_provenance
from onnxq.recipe import PRESETS, QuantRecipe, build_recipe, load_recipe_file

OPTIONS_DOC = Path(__file__).resolve().parent.parent / "docs" / "options.md"
# the presets table of docs/options.md, one row per preset: "| `NAME` | `FLAGS` ... |" (wN-best: the best measured recipe)
DOC_FLAGS = dict(re.findall(r"^\| `([\w-]+)` \| `(--[^`]+)`", OPTIONS_DOC.read_text(), re.M))


def recipe_of(monkeypatch, args: list[str]) -> dict:
    """The recipe `onnxq quantize ARGS` would run (the pipeline replaced by a stub that records it)."""
    seen = {}

    def stub(model, recipe, output, **kw):
        seen.update(recipe.to_dict())
        raise OnnxqError("stub: recipe recorded")

    monkeypatch.setattr(onnxq.pipeline, "quantize", stub)
    done = CliRunner().invoke(app, ["quantize", "m.onnx", "-o", "q.onnx", *args])
    assert "recipe recorded" in done.output, done.output
    return seen


def test_options_doc_spells_every_preset():
    assert set(DOC_FLAGS) == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_is_the_documented_flags(monkeypatch, preset):
    assert recipe_of(monkeypatch, ["--preset", preset]) == recipe_of(monkeypatch, DOC_FLAGS[preset].split())


def test_options_override_preset_and_file(monkeypatch, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("algo: gptq\nbits: 3\ndamp: 0.05\n")
    got = recipe_of(monkeypatch, ["--preset", "fast", "--recipe", str(path), "--bits", "8"])
    assert (got["algo"], got["bits"], got["damp"]) == ("gptq", 8, 0.05)


def test_recipe_file_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "unknown.json").write_text(json.dumps({"bitz": 4}))
    for name, needle in (("bad.json", "not valid JSON"), ("list.json", "mapping"), ("unknown.json", "'bitz'")):
        with pytest.raises(OnnxqError, match=needle):
            load_recipe_file(tmp_path / name)
    with pytest.raises(OnnxqError, match="unknown preset"):
        build_recipe("fastest")


def test_target_fills_only_what_is_left_open():
    assert build_recipe(target="cpu").accuracy_level == 4
    assert build_recipe(target="cpu", accuracy_level=0).accuracy_level == 0
    assert build_recipe("w4-best", target="cpu").group_size == PRESETS["w4-best"]["group_size"]


def test_written_model_carries_the_whole_recipe(tmp_path):
    from tests.tiny import matmul_model

    import onnx

    onnx.save(matmul_model(), tmp_path / "m.onnx")
    (tmp_path / "r.json").write_text(json.dumps({"algo": "rtn", "bits": 8, "group_size": 32}))
    done = CliRunner().invoke(app, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                                    "--recipe", str(tmp_path / "r.json")])
    assert done.exit_code == 0, done.output
    meta = read_provenance(onnx.load(str(tmp_path / "q.onnx")))
    full = QuantRecipe(algo="rtn", bits=8, group_size=32).for_output(False).validate().to_dict()
    assert {k: meta["algorithm" if k == "algo" else k] for k in full if k not in ("device", "seed")} == \
        {k: v for k, v in full.items() if k not in ("device", "seed")}


def test_quantize_help_keeps_research_flags_in_the_advanced_panel():
    import typer.main

    command = typer.main.get_command(app).commands["quantize"]
    main = [p for p in command.params if getattr(p, "rich_help_panel", None) is None and p.param_type_name == "option"]
    assert len(main) + 1 <= 12  # + --help
