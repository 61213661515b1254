"""`onnxq` command line: export, quantize, eval, inspect."""
from __future__ import annotations

import functools
from inspect import Parameter, signature
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import OnnxqError
from .recipe import ALGORITHMS, PRESETS, QuantRecipe, build_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ONNX post-training weight quantization.")
console = Console(stderr=True)


def _guarded(fn):
    """Turn OnnxqError and Ctrl-C into a one-line message and a non-zero exit."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OnnxqError as err:
            console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            console.print("[red]interrupted:[/red] no output file was written")
            raise typer.Exit(130)

    return run


@app.command()
@_guarded
def export(
    model: str = typer.Argument(..., help="registry name (smollm2) or Hugging Face folder"),
    with_past: bool = typer.Option(False, help="export with KV-cache inputs (text-generation-with-past)"),
) -> None:
    """Export a model to ONNX (cached) and print the path."""
    from .models.export import export_onnx

    print(export_onnx(model, with_past=with_past))


_D = QuantRecipe()
ADV = "Advanced (research options; presets and recipe files set them too)"
_NOT_RECIPE = {"model", "output", "preset", "recipe", "calib", "ep", "eval", "report"}


# The Advanced help panel: (name, type, default, flag declarations, help); recipe fields default to QuantRecipe's.
ADVANCED = [
    ("exclude", Optional[list[str]], None, (),
     "regex of layers (node name or role) left in float (default: lm_head for a .onnx file, none for a folder)"),
    ("sym", bool, _D.sym, ("--sym/--asym",),
     "symmetric or asymmetric (zero points) grid"),
    ("float_zero", bool, _D.float_zero, ("--float-zero/--int-zero",),
     "asymmetric MatMulNBits with float zero points: each group's grid spans its exact min-max range (2-4 bits; "
     "+32 bits per group instead of +bits)"),
    ("v_int_zero", bool, _D.v_int_zero, (),
     "with --float-zero: attention value projections keep integer zero points (measured better on SmolLM2 with"
     " the default calibration)"),
    ("format", str, _D.format, (),
     "nbits (com.microsoft MatMulNBits) or qdq (DequantizeLinear + MatMul)"),
    ("grid", Optional[str], None, (),
     "scale search: minmax, mse or hessian (default: rtn minmax, gptq mse, boa/turboboa hessian)"),
    ("calib_windows", int, _D.calib_windows, (),
     "number of calibration windows (x seq-len tokens)"),
    ("calib_seq_len", int, _D.calib_seq_len, (),
     "tokens per calibration window"),
    ("special_tokens", bool, _D.special_tokens, ("--special-tokens/--no-special-tokens",),
     "start each calibration and --eval window with the prefix (e.g. BOS) the tokenizer adds for normal use"),
    ("act_order", Optional[bool], None, ("--act-order/--no-act-order",),
     "process columns (and BoA/TurboBoA rows) by Hessian diagonal (default: on except for rtn); static groups "
     "keep the layout"),
    ("refine_scales", bool, _D.refine_scales, (),
     "two-stage group-scale optimisation (gso stage 2)"),
    ("refine_codes", int, _D.refine_codes, (),
     "sweeps of coordinate descent on the integer codes after the solve (grids fixed; each sweep never raises "
     "the layer objective)"),
    ("block_tune", int, _D.block_tune, (),
     "epochs of Adam on each block's group scales (and float zero points), codes fixed, so the quantized "
     "block's output matches the float block's on the calibration inputs"),
    ("block_tune_alpha", float, _D.block_tune_alpha, (),
     "weight of the float model's block output (float inputs) in the --block-tune target; the rest is the "
     "float block on the quantized inputs"),
    ("v_row_factor", bool, _D.v_row_factor, (),
     "boa/turboboa: weight V's output rows by W_O (BoA's row factor W_O,hᵀW_O,h) instead of treating them as "
     "independent"),
    ("up_row_factor", bool, _D.up_row_factor, (),
     "turboboa: couple each gated MLP's up_proj rows through the down projection, row Hessian (J Jᵀ) ⊙ E[a aᵀ]"
     " (a = act(gate), J = product to output)"),
    ("true_sequential", bool, _D.true_sequential, (),
     "re-capture each layer group's inputs after the block's earlier layers are quantized (more calibration "
     "passes)"),
    ("bias_correction", bool, _D.bias_correction, (),
     "solve on centred activation statistics and add the output bias that removes each layer's mean error"),
    ("rotate", bool, _D.rotate, (),
     "rotate the residual stream (random Hadamard, RMSNorm scales folded) and each head's values, and online "
     "each MLP down projection's input, before quantizing: same float function, fewer weight outliers "
     "(pre-RMSNorm decoders only; adds small float MatMuls; .onnx output only)"),
    ("bpw", Optional[float], None, (),
     "size budget as bits per weight of the decoder layers (scales and zero points included), instead of "
     "--size-mb"),
    ("damp", float, _D.damp, (),
     "Hessian damping, fraction of mean diagonal"),
    ("head_bits", int, _D.head_bits, (),
     "folder output: bits of the LM head (GPTQ on its calibrated inputs) and of the tied embedding sharing its"
     " data"),
    ("head_group", int, _D.head_group, (),
     "folder output: group size of the LM head / embedding"),
    ("accuracy_level", Optional[int], None, (),
     "MatMulNBits accuracy_level: 0 exact, 4 = int8 activations (faster on CPU; default 4 for a folder, 0 for "
     "a .onnx file)"),
    ("device", str, _D.device, (),
     "torch device for solvers: cpu or cuda"),
    ("ep", str, "cpu", (),
     "ORT execution provider for calibration"),
    ("seed", int, _D.seed, (),
     "seed for calibration window sampling"),
]


def _with_advanced(fn):
    """`fn`, whose `**advanced` takes the ADVANCED options, with them in its signature (keyword-only, Advanced panel)."""
    sig = signature(fn)
    extra = [Parameter(name, Parameter.KEYWORD_ONLY, annotation=kind,
                     default=typer.Option(default, *flags, rich_help_panel=ADV, help=text))
             for name, kind, default, flags, text in ADVANCED]
    fn.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD] + extra)
    return fn


@app.command()
@_guarded
@_with_advanced
def quantize(
    ctx: typer.Context,
    model: str = typer.Argument(..., help=".onnx file, Hugging Face folder, or registry name (smollm2)"),
    output: Path = typer.Option(..., "-o", "--output", help="a folder: generation-ready model for onnxruntime-genai "
                                "(from an HF folder or registry name: the genai builder's graph with fused attention and "
                                "KV cache, LM head and embedding quantized too); a path ending in .onnx: one graph in the "
                                "form of the input (any .onnx, encoders, other architectures; no KV cache)"),
    preset: Optional[str] = typer.Option(None, help=f"named recipe: {', '.join(PRESETS)} (onnxq/recipe.py); options "
                                         "given on the command line override it"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="recipe file (JSON or YAML mapping of QuantRecipe "
                                          "fields), applied over --preset and under command-line options"),
    algo: str = typer.Option(_D.algo, help=f"solver (default turboboa: most accurate; gptq is faster): {', '.join(ALGORITHMS)}"),
    bits: int = typer.Option(_D.bits, help="2, 3, 4 or 8"),
    group: Optional[int] = typer.Option(None, help="group size (power of two >= 16) or -1 for per-channel (default: "
                                        "64 for a folder, 128 for a .onnx file)"),
    size_mb: Optional[float] = typer.Option(None, "--size-mb", help="size budget in MB (1e6 bytes) for the whole "
                                            "written model: each decoder layer's bits and group chosen from its measured "
                                            "sensitivity (about one extra GPTQ pass per candidate format)"),
    calib: str = typer.Option("sotu-calib", help="calibration text: sotu-calib, a .txt file or a folder of .txt, or "
                              "self (data-free: windows sampled from the float model itself with ONNX Runtime, seeded "
                              "by --seed; the text is written to <report>.calib.txt, else beside the output)"),
    target: Optional[str] = typer.Option(
        None, help="execution provider the output must run on (cpu, cuda, web, webgpu, openvino, dml, qnn, webnn, "
        "tensorrt): format, group and accuracy_level default to what it runs; combinations it cannot run are refused"),
    eval: bool = typer.Option(False, "--eval", help="evaluate float vs quantized afterwards and print the table"),
    report: Optional[Path] = typer.Option(None, help="write the report as <report>.json and <report>.md"),
    **advanced,
) -> None:
    """Quantize the linear layers of a model and write a generation-ready folder, MatMulNBits or QDQ."""
    from .pipeline import quantize as run_quantize
    from .calibrate.selfcalib import calib_text_path
    from .graph.io import check_output_path, write_text_atomic
    from .report import check_report_path, report_file
    from .formats.targets import advise, support

    if report:
        check_report_path(report)  # before the run, not after it
    calib_file = None  # where --calib self's sampled text goes
    if calib == "self":
        calib_file = report_file(report, ".calib.txt") if report else calib_text_path(output)
        check_output_path(calib_file)
    given = lambda name: getattr(ctx.get_parameter_source(name), "name", "") != "DEFAULT"  # noqa: E731
    explicit = {("group_size" if k == "group" else k): v for k, v in ctx.params.items()
                if k not in _NOT_RECIPE and given(k)}
    if "exclude" in explicit:
        explicit["exclude"] = list(explicit["exclude"])
    quant = build_recipe(preset, recipe, **explicit).for_output(output.suffix != ".onnx").validate()
    if quant.target:
        console.print(f"target {support(quant.target).name}: {quant.format}, {quant.bits}-bit, group {quant.group_size}, "
                      f"accuracy_level {quant.accuracy_level}")
        for warning in advise(quant.target, quant.bits, quant.format, quant.group_size, accuracy_level=quant.accuracy_level):
            console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    qrep = run_quantize(model, quant, output, calib=calib, ep=advanced["ep"])
    console.print(
        f"wrote {qrep.output}: {qrep.layers} layers, {qrep.calib_tokens} calibration tokens, "
        f"{qrep.total_seconds} s ({qrep.calib_seconds} s calibration, {qrep.solve_seconds} s solve), "
        f"peak RSS {qrep.peak_rss_mb:.0f} MiB" + (f" (+ {qrep.helper_rss_mb:.0f} MiB solver helper)" if qrep.helper_rss_mb else "")
    )
    if calib_file and qrep.calib_text:
        write_text_atomic(calib_file, qrep.calib_text)
        console.print(f"calibration text sampled from the float model in {qrep.calib_generation_seconds} s "
                      f"(included above): {calib_file}", highlight=False, soft_wrap=True)
    for note in qrep.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    if qrep.deploy:
        from .deploy.generate import generate

        console.print(f"generation check: {generate(qrep.output, SAMPLE_PROMPT, max_new_tokens=24).line()}",
                      highlight=False, soft_wrap=True)
        if eval:  # the same loop on the builder's float graph, for the speed-up
            console.print(f"float build ({qrep.deploy['float_build']}): "
                          f"{generate(qrep.deploy['float_build'], SAMPLE_PROMPT, max_new_tokens=24).line()}",
                          highlight=False, soft_wrap=True)
    if eval or report:
        from .report import evaluate

        erep = evaluate(qrep.model, qrep.output, ep=advanced["ep"], special_tokens=quant.special_tokens)
        erep.quantize = {k: v for k, v in qrep.to_dict().items() if k not in ("layer_losses", "calib_text")}
        print(erep.markdown())
        if report:
            erep.save(report)


SAMPLE_PROMPT = "The capital of France is"


@app.command()
@_guarded
def generate(
    folder: Path = typer.Argument(..., help="generation-ready folder (onnxq quantize -o DIR)"),
    prompt: str = typer.Argument(SAMPLE_PROMPT, help="text to continue"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate (greedy)"),
) -> None:
    """Generate greedily from a prompt with onnxruntime-genai and print the text and decode speed."""
    from .deploy.generate import generate as run

    out = run(folder, prompt, max_new_tokens=max_new_tokens)
    print(prompt + out.text)
    console.print(f"{len(out.tokens)} tokens, {out.decode_tok_s:.1f} tok/s decode, loaded in {out.load_s:.2f} s",
                  highlight=False)


@app.command("eval")
@_guarded
def eval_cmd(
    float_model: str = typer.Argument(..., help="float model (.onnx, HF folder or registry name)"),
    quant_model: Optional[Path] = typer.Argument(None, help="quantized .onnx to compare"),
    text: str = typer.Option("sotu-eval", help="evaluation text: sotu-eval, a .txt file or a folder"),
    tokens: int = typer.Option(4096, help="evaluate the first N tokens"),
    seq_len: int = typer.Option(512, help="window length (non-overlapping)"),
    special_tokens: bool = typer.Option(True, "--special-tokens/--no-special-tokens", help="start each window with "
                                        "the ids the tokenizer puts before a text (e.g. BOS; not scored), as in normal "
                                        "use; --no-special-tokens: text tokens only"),
    ep: str = typer.Option("cpu", help="ORT execution provider: cpu, cuda, ... (perplexity), or openvino, web-wasm, "
                           "web-webgpu (edge check only; docs/edge.md)"),
    edge: Optional[bool] = typer.Option(None, "--edge/--no-edge", help="edge check of the quantized (else float) model "
                                        "on --ep: logits vs the CPU EP, ms/token, node placement (default: on for "
                                        "openvino and web-*)"),
    prompt_tokens: int = typer.Option(32, help="edge check: prompt length (first tokens of --text)"),
    runs: int = typer.Option(5, help="edge check: timed runs (median reported)"),
    threads: int = typer.Option(0, help="edge check: threads per runtime (0 = each runtime's default)"),
    report: Optional[Path] = typer.Option(None, help="write <report>.json and <report>.md (edge check: <report>-edge.* "
                                          "beside perplexity)"),
) -> None:
    """Perplexity, size and output error of a float model and (optionally) its quantized version; with --edge (or an
    edge --ep), how it runs on that execution provider. Exit 1 when the edge check fails."""
    from .runtime.edge import EDGE_EPS
    from .runtime.session import PROVIDERS

    if ep not in PROVIDERS and ep not in EDGE_EPS:
        names = ", ".join(dict.fromkeys([*PROVIDERS, *EDGE_EPS]))
        raise OnnxqError(f"unknown execution provider {ep!r}: use one of {names}")
    from .models.export import resolve_model
    from .report import check_report_path, evaluate

    fpath = resolve_model(float_model)
    _check_models(fpath, quant_model)
    if report:
        check_report_path(report)
    edge_only = ep in ("openvino", "web-wasm", "web-webgpu")
    rep = None
    if not edge_only:
        rep = evaluate(fpath, quant_model, text=text, tokens=tokens, seq_len=seq_len, ep=ep,
                       special_tokens=special_tokens)
        print(rep.markdown())
        if report:
            rep.save(report)
    if edge or (edge is None and edge_only):
        from .models.export import load_tokenizer
        from .report import write_report
        from .runtime.edge import edge_eval
        from .calibrate.textdata import load_text, token_windows

        if ep not in EDGE_EPS:
            raise OnnxqError(f"the edge check runs on {', '.join(EDGE_EPS)}, not {ep!r}")
        prompt = token_windows(load_tokenizer(fpath), load_text(text), prompt_tokens, 1, special_tokens=special_tokens)
        erep = edge_eval(quant_model or fpath, ep, prompt, threads=threads or None, runs=runs)
        print(erep.markdown())
        if report:
            write_report(report if rep is None else f"{report}-edge", erep.to_dict(), erep.markdown())
        if not erep.ok:
            raise typer.Exit(1)


def _check_models(*paths: Path | None) -> None:
    """Read each model's graph and check its external data (weights are not read), so that a corrupt file fails in
    one line before any work; a folder stands for the model.onnx in it."""
    from .graph.io import load_graph

    for path in filter(None, paths):
        load_graph(path / "model.onnx" if path.is_dir() else path)


@app.command()
@_guarded
def inspect(
    model: Path = typer.Argument(..., help=".onnx file (external data is not read)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output (schema in docs/inspect.md)"),
    layers: bool = typer.Option(False, "--layers", help="one row per weight layer"),
    target: Optional[str] = typer.Option(None, help="lint against an execution provider: cpu, cuda, webgpu, web, dml, openvino, qnn, webnn, tensorrt"),
    diff: Optional[Path] = typer.Option(None, help="compare with another .onnx (e.g. the float source)"),
) -> None:
    """Summarize a model: ops, parameters by precision, quantized layers, attention map, provenance."""
    from .inspect import inspect_model, render

    if model.is_dir() and (model / "genai_config.json").is_file():  # a generation-ready folder: its graph
        model = model / "model.onnx"
    info = inspect_model(model, target=target, diff=diff)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        render(info, Console(width=None if sys.stdout.isatty() else 160), layers=layers)


def main() -> None:
    """Entry point for `python -m onnxq`."""
    app(sys.argv[1:])
