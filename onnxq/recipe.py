"""Quantization recipe: what to quantize and how, validated up front."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .errors import OnnxqError

ALGORITHMS = ("rtn", "gptq", "aespa", "boa", "turboboa")
FORMATS = ("nbits", "qdq")
BITS = (2, 3, 4, 8)
GRIDS = ("minmax", "mse", "hessian")


@dataclass
class QuantRecipe:
    """Every knob of one quantization run; `validate()` rejects bad combinations with a one-line error."""

    algo: str = "turboboa"  # most accurate that fits the 5-min CPU budget on SmolLM2 (2 cores: 260 s, PPL 24.63)
    bits: int = 4
    group_size: int | None = None  # -1 = per output channel; None: 128 for a .onnx file, 64 for a generation-ready
    # folder (SmolLM2's K = 576 pads g128 to 640: g64 is both smaller, 60.6 vs 61.6 MB, and better, 24.23 vs 24.66 PPL)
    sym: bool = False
    float_zero: bool = False  # asymmetric MatMulNBits with float zero points (grid = exact group [min, max]); 2-4 bits
    v_int_zero: bool = False  # with float_zero: attention value projections keep integer zero points
    format: str = "nbits"
    grid: str | None = None  # None: the algorithm's default (rtn: minmax; gptq: see validate; boa/turboboa: hessian)
    damp: float = 0.01
    act_order: bool | None = None  # None: on for the Hessian solvers (SmolLM2 W4 g128: GPTQ 27.8 -> 26.1, TurboBoA 24.74 -> 24.60)
    block_size: int = 128  # GPTQ lazy-batch width (columns)
    rows_per_block: int = 16  # TurboBoA N
    alpha: float = 0.25  # TurboBoA / GPTAQ residual weight
    error_correction: bool = True  # TurboBoA F2 (second, float stream)
    refine_scales: bool = False  # two-stage group-scale optimisation (gso)
    refine_codes: int = 0  # sweeps of coordinate descent on the codes after the solve (grids fixed)
    block_tune: int = 0  # epochs of Adam on group scales / float zero points against each block's float output
    block_tune_alpha: float = 0.5  # weight of the float stream's block output in that target (rest: float block on
    # quantized inputs); W2 g64, 16 windows, --block-tune 20: 55.48 (0), 45.80 (0.5), 47.05 (1)
    v_row_factor: bool = False  # BoA/TurboBoA: V gets the row Hessian W_O,h^T W_O,h (spec §3), not the identity
    up_row_factor: bool = False  # TurboBoA: up_proj rows coupled through the down projection, (J Jᵀ) ⊙ E[a aᵀ]
    true_sequential: bool = False  # re-capture each layer group's inputs after the block's earlier layers are quantized
    bias_correction: bool = False  # solve on centred statistics and add the output bias that removes the mean error
    rotate: bool = False  # rotate the residual stream, each head's values and the down_proj inputs first (preprocess/rotate.py)
    special_tokens: bool = True  # calibration windows start with the prefix (BOS) the tokenizer adds for normal use
    calib_windows: int = 16
    calib_seq_len: int = 512
    accuracy_level: int | None = None  # None: 0 (exact fp32 activations) for a .onnx file, 4 (int8, the builder's
    # CPU default) for a generation-ready folder; --target picks its own
    exclude: list[str] | None = None  # None: ["lm_head"] for a .onnx file, nothing for a generation-ready folder
    head_bits: int = 8  # LM head (and the tied embedding sharing its data) in a generation-ready folder
    head_group: int = 64  # divides the hidden size of common models, so the embedding can share the head's data
    size_mb: float | None = None  # the written model at most this many MB (1e6 bytes): each decoder layer's format
    # (bits, group) chosen from its measured sensitivity (onnxq/solve/allocate.py)
    bpw: float | None = None  # instead: bits per weight over the decoder layers (scales and zero points included)
    layer_formats: dict[str, list[int]] | None = None  # layer node -> [bits, group]: --size-mb/--bpw's choice, or given
    seed: int = 0
    device: str = "cpu"
    target: str | None = None  # execution provider the output must run on (onnxq/targets.py), checked by validate()

    def for_output(self, folder: bool) -> "QuantRecipe":
        """This recipe with the defaults of its output kind filled in: a .onnx file keeps the LM head float and exact
        activations; a generation-ready folder quantizes the head (and embedding) and uses int8 activations."""
        exclude = self.exclude if self.exclude is not None else ([] if folder else ["lm_head"])
        level = self.accuracy_level if self.accuracy_level is not None else (4 if folder else 0)
        group = self.group_size if self.group_size is not None else (64 if folder else 128)
        return replace(self, exclude=list(exclude), accuracy_level=level, group_size=group)

    def format_of(self, node: str) -> tuple[int, int]:
        """(bits, group size) of one layer: its entry in `layer_formats`, else the recipe's."""
        bits, group = (self.layer_formats or {}).get(node, (self.bits, self.group_size))
        return int(bits), int(group)

    def head_recipe(self) -> "QuantRecipe":
        """The LM head's recipe: GPTQ on its calibrated input statistics at `head_bits` / `head_group`, integer zero
        points (GatherBlockQuantized reads the same data for the tied embedding)."""
        return replace(self, algo="gptq", bits=self.head_bits, group_size=self.head_group, grid="mse", float_zero=False,
                       v_int_zero=False, refine_codes=0, block_tune=0, up_row_factor=False, v_row_factor=False)

    def validate(self) -> "QuantRecipe":
        """Raise OnnxqError on an unsupported setting; return self."""
        if self.algo not in ALGORITHMS:
            raise OnnxqError(f"unknown algorithm {self.algo!r}: use one of {', '.join(ALGORITHMS)}")
        if self.bits not in BITS:
            raise OnnxqError(f"bits={self.bits} is not supported: use one of 2, 3, 4, 8")
        if self.group_size not in (None, -1) and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise OnnxqError(
                f"group size {self.group_size} is invalid: use a power of two >= 16 (e.g. 32, 64, 128) or -1 for per-channel"
            )
        if self.format not in FORMATS:
            raise OnnxqError(f"unknown format {self.format!r}: use 'nbits' (MatMulNBits) or 'qdq' (DequantizeLinear)")
        if self.grid is None:
            self.grid = {"rtn": "minmax", "gptq": "mse"}.get(self.algo, "hessian")
        if self.grid not in GRIDS:
            raise OnnxqError(f"unknown grid search {self.grid!r}: use one of {', '.join(GRIDS)}")
        if self.bias_correction and self.algo == "rtn" and self.grid != "hessian":
            raise OnnxqError("--bias-correction needs activation means from calibration, which data-free RTN skips: "
                             "add --grid hessian or use another --algo")
        if not 0.0 < self.damp < 1.0:
            raise OnnxqError(f"damping {self.damp} is out of range: use a value in (0, 1), e.g. 0.01")
        if self.float_zero and (self.sym or self.format != "nbits" or self.bits == 8):
            raise OnnxqError("float zero points need an asymmetric MatMulNBits grid of 2-4 bits (DequantizeLinear takes "
                             "integer zero points; ORT has no 8-bit float-zero kernel): drop --float-zero or --sym/--format qdq")
        if self.v_int_zero and not self.float_zero:
            raise OnnxqError("--v-int-zero keeps integer zero points on V under --float-zero: add --float-zero or drop it")
        if self.calib_windows < 1 or self.calib_seq_len < 8:
            raise OnnxqError("calibration needs at least 1 window of >= 8 tokens: raise --calib-windows / --calib-seq-len")
        if self.rows_per_block < 1:
            raise OnnxqError("rows per block must be >= 1")
        if self.refine_codes < 0 or (self.refine_codes and self.algo == "rtn"):
            raise OnnxqError("--refine-codes takes a number of sweeps >= 0 and needs calibration data: use --algo gptq, boa or turboboa")
        if self.block_tune < 0 or (self.block_tune and self.algo == "rtn"):
            raise OnnxqError("--block-tune takes a number of epochs >= 0 and needs calibration data: use --algo gptq, boa or turboboa")
        if not 0.0 <= self.block_tune_alpha <= 1.0:
            raise OnnxqError(f"--block-tune-alpha {self.block_tune_alpha} is out of range: use a value in [0, 1]")
        if self.v_row_factor and self.algo not in ("boa", "turboboa"):
            raise OnnxqError(f"--v-row-factor is a BoA/TurboBoA option: use --algo boa or turboboa (not {self.algo})")
        if self.up_row_factor and self.algo != "turboboa":
            raise OnnxqError(f"--up-row-factor is a TurboBoA option: use --algo turboboa (not {self.algo})")
        if self.act_order is None:
            self.act_order = self.algo != "rtn"
        if self.head_bits not in (4, 8) or self.head_group < 16 or self.head_group & (self.head_group - 1):
            raise OnnxqError(f"LM head {self.head_bits}-bit group {self.head_group} is not supported: use --head-bits 4 or 8 "
                             "and a power-of-two --head-group >= 16")
        if self.size_mb is not None and self.bpw is not None:
            raise OnnxqError("--size-mb and --bpw both set a size budget: give one of them")
        if (self.size_mb is not None and self.size_mb <= 0) or (self.bpw is not None and not 1 < self.bpw <= 16):
            raise OnnxqError("the size budget must be positive: --size-mb in MB (1e6 bytes), --bpw between 1 and 16")
        if (self.size_mb is not None or self.bpw is not None) and (self.format != "nbits" or self.algo == "rtn"
                                                                   and self.grid != "hessian"):
            raise OnnxqError("a size budget chooses MatMulNBits formats from calibrated sensitivity: use --format nbits "
                             "and a calibrated --algo (gptq, boa, turboboa)")
        for node, fmt in (self.layer_formats or {}).items():
            if len(fmt) != 2 or fmt[0] not in BITS or fmt[1] != -1 and (fmt[1] < 16 or fmt[1] & (fmt[1] - 1)):
                raise OnnxqError(f"layer_formats[{node!r}] = {fmt}: give [bits, group] with bits in 2, 3, 4, 8 and a "
                                 "power-of-two group >= 16 or -1")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise OnnxqError(f"accuracy_level {self.accuracy_level} is invalid: use 0-4")
        if self.target is not None:
            from .formats.targets import check, support

            group = 128 if self.group_size is None else self.group_size  # a .onnx file's default, until for_output
            problems = check(self.target, self.bits, self.format, group, accuracy_level=self.accuracy_level)
            if problems:
                raise OnnxqError(f"target {problems[0]}")
            if self.float_zero and (4 if self.bits == 3 else self.bits) not in support(self.target).float_zero:
                raise OnnxqError(f"target {support(self.target).name}: float zero points are verified on the CPU "
                                 "provider only (2-4 bits): drop --float-zero")
        return self

    def to_dict(self) -> dict:
        """Plain dict for metadata and reports."""
        return asdict(self)


# Named recipes. fast/balanced/best trade time for accuracy at the default format; the wN-best ones are docs/options.md's
# most accurate measured recipe per bit width on the default model (.onnx output: --rotate is not carried into a
# generation-ready folder), flag for flag.
PRESETS: dict[str, dict] = {
    "fast": {"algo": "rtn"},  # data-free, seconds
    "balanced": {"algo": "gptq"},  # about half of TurboBoA's time, +2 PPL at W4 on SmolLM2
    "best": {"algo": "turboboa"},  # the default
    "w4-best": {"algo": "turboboa", "bits": 4, "group_size": 128, "rotate": True, "bias_correction": True,
                "calib_windows": 128},  # 23.78
    "w3-best": {"algo": "turboboa", "bits": 3, "group_size": 128, "rotate": True, "float_zero": True,
                "bias_correction": True, "up_row_factor": True, "calib_windows": 128, "refine_codes": 2,
                "true_sequential": True},  # 27.14
    "w2-best": {"algo": "turboboa", "bits": 2, "group_size": 64, "rotate": True, "float_zero": True,
                "bias_correction": True, "up_row_factor": True, "calib_windows": 128, "refine_codes": 2,
                "block_tune": 3},  # 41.14
}


def recipe_fields(values: dict, where: str) -> dict:
    """`values` checked against QuantRecipe's fields (one line naming an unknown key and the known ones)."""
    from dataclasses import fields

    known = {f.name for f in fields(QuantRecipe)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OnnxqError(f"{where}: unknown recipe field {unknown[0]!r}: use any of {', '.join(sorted(known))}")
    return dict(values)


def load_recipe_file(path) -> dict:
    """Recipe fields from a JSON or YAML file (a mapping of QuantRecipe field names to values)."""
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise OnnxqError(f"cannot read recipe file {path} ({type(err).__name__}): give a readable JSON or YAML file") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            import json

            data = json.loads(text)
    except Exception as err:  # json and yaml raise their own error types
        raise OnnxqError(f"recipe file {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                         f"({' '.join(str(err).split())[:120]}): fix the file") from None
    if not isinstance(data, dict):
        raise OnnxqError(f"recipe file {path} must hold a mapping of recipe fields (e.g. {{\"algo\": \"gptq\"}})")
    return recipe_fields(data, f"recipe file {path}")


def build_recipe(preset: str | None = None, file=None, **explicit) -> QuantRecipe:
    """Defaults < `preset` < recipe `file` < `explicit` fields, as one QuantRecipe (not yet validated); with a target,
    the format, accuracy_level and group size none of them set are the target's."""
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise OnnxqError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if file is not None:
        values.update(load_recipe_file(file))
    values.update(recipe_fields(explicit, "options"))
    if values.get("target"):  # what the recipe leaves open takes the target's choice (onnxq/targets.py)
        from .formats.targets import choose, support

        fmt, level = choose(values["target"], values.get("bits", 4))
        values.setdefault("format", fmt)
        values.setdefault("accuracy_level", level)
        values.setdefault("group_size", support(values["target"]).block_size)
    return QuantRecipe(**values)
