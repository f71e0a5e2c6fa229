"""The build steps of the M3ViT FINN flow, FINN-style: module-level ``step(model, cfg)``.

``cfg`` is an :class:`M3ViTBuildConfig`: FINN's ``DataflowBuildConfig`` plus the few
fields these steps read (the typed build state; JSON-serialisable, written next to the
outputs and handed to piece workers). What the steps find (verification errors, piece
timings, offending nodes) is kept in :class:`finn_flow.report.StepRecords`, saved under
``<output_dir>/report`` after every change, so a failed build still reports it.

The graph passes that may run on pieces of the graph live in :mod:`finn_flow.graph_passes`;
:func:`on_pieces` runs one on the whole graph or, for deep pathways, on pieces cut at
the residual stream in worker processes (:mod:`finn_flow.pieces`).

Import this module only after :func:`finn_flow.finn_env.start_finn`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import finn.builder.build_dataflow_steps as fs
import numpy as np
from finn.builder.build_dataflow_config import DataflowBuildConfig
from finn.builder.custom_step_library.transformer_adhoc import step_set_folding
from finn.core.onnx_exec import execute_onnx
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp

from finn_flow import BuildError, pieces, write_atomic
from finn_flow.graph_passes import PIECE_PASSES
from finn_flow.moe_ops.step import step_m3vit_moe_reordered
from finn_flow.report import StepRecords

#: Node attributes that make up a folding (written to ``<out>/folding.json``).
FOLDING_ATTRS = ("PE", "SIMD", "EmbFold", "SeqFold", "parallel_window", "ram_style", "mem_mode")
#: A build step: (model, build config) -> model.
Step = Callable[[ModelWrapper, DataflowBuildConfig], ModelWrapper]


@dataclass
class M3ViTBuildConfig(DataflowBuildConfig):
    """FINN's build config plus what this flow's steps read.

    Attributes:
        mode: 'estimate' (estimate reports) or 'codegen' (also HLS C++ / Verilog).
        output_lsb: scale of the model's output quantizer (one LSB of the logits); the
            verification errors are reported in these units.
        max_lsb: largest verification error (in output LSBs, any image, any verified
            stage) the build accepts; None: no bound.
        summary_dir: the build's output folder (``folding.json`` goes there).
        finn_root: folder of FINN's settings and scratch build folder
            (:func:`finn_flow.finn_env.start_finn`), for piece workers.
        piece_jobs: worker processes for the piece-wise passes (0: whole graph here).
        piece_min_nodes: smallest piece, in graph nodes (:func:`finn_flow.pieces.split`).
        moe_layers: MoE layers of the pathway: the MoE swap
            (:func:`finn_flow.moe_ops.step.step_m3vit_moe_reordered`) must replace exactly
            this many stand-in regions (-1: not checked).
        moe_axi_bits: data width of the AXI port the experts' weights are read through.
        folding_fallback_fps: set when ``folding_config_file`` is the config's default
            folding JSON rather than one the user named: if that JSON was made for
            another design (:func:`folding_mismatch`), the build auto-folds to this FPS
            instead and says so; a JSON the user named must match.
    """

    mode: str = "estimate"
    output_lsb: float = 1.0
    max_lsb: float | None = None
    summary_dir: str = ""
    finn_root: str = ""
    piece_jobs: int = 0
    piece_min_nodes: int = 10
    moe_layers: int = -1
    moe_axi_bits: int = 128
    folding_fallback_fps: float | None = None

    def finn_config(self) -> DataflowBuildConfig:
        """FINN's own part of this config (what graph passes and piece workers read)."""
        names = {f.name for f in dataclasses.fields(DataflowBuildConfig)}
        return DataflowBuildConfig.from_dict(
            {k: v for k, v in self.to_dict().items() if k in names}
        )


def non_hw_nodes(model: ModelWrapper) -> list[tuple[str, str]]:
    """(name, op_type) of every node that is not a finn-plus HW layer."""
    return [
        (n.name, n.op_type)
        for n in model.graph.node
        if not n.domain.startswith("finn.custom_op.fpgadataflow")
    ]


def verify(model: ModelWrapper, cfg: M3ViTBuildConfig, stage: str) -> dict[str, Any]:
    """Execute ``model`` (Python) on every frame of ``cfg.verify_input_npy`` and compare
    with ``cfg.verify_expected_output_npy`` (the Brevitas model's outputs).

    Both files hold a stack of frames along a leading axis: (N, *model input shape) and
    (N, *model output shape). Records and returns the absolute errors over all frames,
    also in output LSBs, with the worst error per frame.

    Raises:
        BuildError: the largest error exceeds ``cfg.max_lsb`` (names the stage, the
            frame, the error and the bound).
    """
    inputs = np.load(cfg.verify_input_npy)
    expected = np.load(cfg.verify_expected_output_npy)
    iname, oname = model.graph.input[0].name, model.graph.output[0].name
    errs = []
    for x, want in zip(inputs, expected, strict=True):
        got = execute_onnx(model, {iname: x})[oname]
        errs.append(np.abs(got.astype(np.float64) - want.astype(np.float64)))
    err = np.stack(errs)
    per_frame = err.reshape(len(errs), -1).max(axis=1) / cfg.output_lsb
    res = {
        "stage": stage,
        "images": len(errs),
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "max_error_lsb": float(err.max() / cfg.output_lsb),
        "mean_error_lsb": float(err.mean() / cfg.output_lsb),
        "max_error_lsb_per_image": [float(v) for v in per_frame],
        "bit_exact": bool(err.max() == 0.0),
        "max_lsb_bound": cfg.max_lsb,
    }
    records = StepRecords.load(cfg.output_dir)
    records.verification.append(res)
    records.save(cfg.output_dir)
    print(
        f"[verify] {stage}: {len(errs)} image(s), max {res['max_error_lsb']:.3g} LSB "
        f"(mean {res['mean_error_lsb']:.3g}), exact={res['bit_exact']}"
    )
    # errors are whole LSBs up to float32 rounding of the scale: 1e-3 LSB slack
    if cfg.max_lsb is not None and res["max_error_lsb"] > cfg.max_lsb + 1e-3:
        worst = int(per_frame.argmax())
        raise BuildError(
            f"verification of the {stage} graph against the Brevitas model: error "
            f"{res['max_error_lsb']:.4g} LSB of the output quantizer on image {worst} "
            f"exceeds --max-lsb {cfg.max_lsb:g} (mean {res['mean_error_lsb']:.3g} LSB over "
            f"{len(errs)} images)"
        )
    return res


def on_pieces(
    model: ModelWrapper,
    cfg: M3ViTBuildConfig,
    step_name: str,
    pass_name: str,
    cut_ops: Sequence[str] = ("MultiThreshold",),
) -> ModelWrapper:
    """Run the graph pass ``pass_name`` on the whole graph (``piece_jobs`` 0), or on the
    pieces of the graph cut at its residual stream in worker processes, stitched back
    together (:mod:`finn_flow.pieces` says why)."""
    graph_pass = PIECE_PASSES[pass_name]
    if not cfg.piece_jobs:
        return graph_pass(model, cfg)
    parts, bounds = pieces.split(model, cfg.piece_min_nodes, cut_ops)
    names = (model.graph.input[0].name, model.graph.output[0].name)
    print(f"[pieces] {step_name}: {len(parts)} piece(s), {cfg.piece_jobs} worker(s)", flush=True)
    if len(parts) == 1:
        records = StepRecords.load(cfg.output_dir)
        records.pieces[step_name] = {"pieces": 1}
        records.save(cfg.output_dir)
        return graph_pass(model, cfg)
    work = Path(cfg.output_dir) / "pieces" / step_name
    work.mkdir(parents=True, exist_ok=True)
    worker_cfg = work / "piece_build_config.json"
    write_atomic(worker_cfg, cfg.finn_config().to_json())
    results = pieces.run_on_pieces(
        parts, pass_name, work, cfg.finn_root, worker_cfg, cfg.piece_jobs
    )
    records = StepRecords.load(cfg.output_dir)
    records.pieces[step_name] = {
        "pieces": len(parts),
        "piece_seconds": [round(r["seconds"], 1) for r in results],
    }
    records.save(cfg.output_dir)
    return pieces.stitch([ModelWrapper(r["saved"]) for r in results], bounds, names)


# ----------------------------------------------------------------------------- steps
def step_m3vit_qonnx_to_finn(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """FINN's ``step_qonnx_to_finn`` + ``step_tidy_up``, piece by piece on deep pathways
    (cut at the residual stream's activation quantizers)."""
    return on_pieces(model, cfg, "step_m3vit_qonnx_to_finn", "qonnx_to_finn", ("Quant",))


def step_m3vit_streamline(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """Streamlining (:func:`finn_flow.graph_passes.streamline`), piece by piece."""
    return on_pieces(model, cfg, "step_m3vit_streamline", "streamline")


def step_m3vit_verify_streamlined(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """Python execution after streamlining (standard ops + thresholds) vs Brevitas."""
    verify(model, cfg, "streamlined")
    return model


def step_m3vit_snap_thresholds(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """Per-channel thresholds that are integer shifts of one row up to float32 noise
    (quantizers after a linear layer with its bias on the accumulator grid) are made
    exact shifts (:class:`finn_flow.transforms.SharedThresholdTable`, snap mode); runs
    before the streamlined graph is verified, so the verification sees the result."""
    from finn_flow.transforms import SharedThresholdTable

    snap = SharedThresholdTable(rewrite=False)
    model = model.transform(snap)
    records = StepRecords.load(cfg.output_dir)
    records.snapped_thresholds = [list(r) for r in snap.rewritten]
    records.save(cfg.output_dir)
    moved = sum(r[2] for r in snap.rewritten)
    print(f"[thresholds] {len(snap.rewritten)} tables are integer shifts of one row "
          f"({moved} float32-noise entries snapped)")  # fmt: skip
    return model


def step_m3vit_shared_thresholds(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """Integer arithmetic where the biases are integers: per-channel thresholds that are
    integer shifts of one row become an integer Add + one shared table
    (:class:`finn_flow.transforms.SharedThresholdTable`; exact), and biases on the grid of
    a layer whose output goes on in float are added to the integer accumulator before its
    scale (:class:`finn_flow.transforms.IntegerBiasBeforeScale`)."""
    from finn_flow.transforms import IntegerBiasBeforeScale, SharedThresholdTable

    rewrite = SharedThresholdTable()
    model = model.transform(rewrite)
    move = IntegerBiasBeforeScale()
    model = model.transform(move)
    records = StepRecords.load(cfg.output_dir)
    records.shared_thresholds = [[r[0], r[1]] for r in rewrite.rewritten]
    records.integer_biases = list(move.moved)
    records.save(cfg.output_dir)
    print(
        f"[thresholds] {len(rewrite.rewritten)} per-channel tables -> one shared table each; "
        f"{len(move.moved)} float biases -> integer adds before the scale"
    )
    return model


def step_m3vit_convert_to_hw(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """Conversion to HW layers (:func:`finn_flow.graph_passes.convert_to_hw`), piece by
    piece."""
    return on_pieces(model, cfg, "step_m3vit_convert_to_hw", "convert_to_hw")


def step_m3vit_check_hw(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """Fail unless every node is a HW layer, naming the offenders."""
    bad = non_hw_nodes(model)
    records = StepRecords.load(cfg.output_dir)
    records.non_hw_nodes = [list(b) for b in bad]
    records.save(cfg.output_dir)
    if bad:
        types = sorted({t for _, t in bad})
        raise BuildError(
            f"{len(bad)} node(s) did not become HW layers (op types {types}): "
            + ", ".join(f"{n} ({t})" for n, t in bad)
        )
    return model


def step_m3vit_verify_hw(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """Python execution of the HW-layer graph vs Brevitas."""
    verify(model, cfg, "hw_layers")
    return model


def folding_mismatch(model: ModelWrapper, folding: dict[str, Any]) -> str | None:
    """Why a folding JSON (ApplyConfig format) does not belong to ``model``, or None.

    It belongs when it names exactly the nodes that carry folding attributes
    (:data:`FOLDING_ATTRS`, as :func:`step_m3vit_save_folding` writes them) and every PE /
    SIMD it sets divides the node's dimension. Node names come from the graph's structure,
    which changes with the weights (how many tables become shared, how many biases become
    integer adds), so a folding made for one checkpoint may not fit another.
    """
    names = {k for k in folding if k != "Defaults"}
    nodes = {}
    for node in model.graph.node:
        inst = getCustomOp(node)
        if folding_attrs(inst):
            nodes[node.name] = inst
    missing, extra = sorted(names - set(nodes)), sorted(set(nodes) - names)
    if missing or extra:
        return (
            f"{len(missing)} of its nodes are not in the design (first: {missing[:3]}), "
            f"{len(extra)} of the design's are not in it (first: {extra[:3]})"
        )
    dims = {"PE": ("MH", "NumChannels", "Channels"), "SIMD": ("MW", "IFMChannels")}
    for name, attrs in folding.items():
        for key, dim_names in dims.items():
            if key not in attrs or name not in nodes:
                continue
            for dim in dim_names:
                if _has_attr(nodes[name], dim):
                    value = int(nodes[name].get_nodeattr(dim))
                    if value % int(attrs[key]):
                        return f"{name}: {key}={attrs[key]} does not divide {dim}={value}"
                    break
    return None


def _has_attr(inst: Any, key: str) -> bool:
    try:
        inst.get_nodeattr(key)
    except Exception:  # noqa: BLE001 - attribute absent on this op type
        return False
    return True


def folding_attrs(inst: Any) -> dict[str, Any]:
    """The :data:`FOLDING_ATTRS` this node has, with their values (empty: not foldable)."""
    return {key: inst.get_nodeattr(key) for key in FOLDING_ATTRS if _has_attr(inst, key)}


def step_m3vit_set_folding(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """FINN's ``step_set_folding``, after checking that a folding JSON fits the design.

    A JSON the user named that does not fit fails the build, naming the mismatch; the
    config's default JSON that does not fit is replaced by auto-folding to
    ``cfg.folding_fallback_fps`` (recorded in the step records and printed).
    """
    from qonnx.transformation.general import GiveUniqueNodeNames

    records = StepRecords.load(cfg.output_dir)
    if cfg.folding_config_file is not None:
        model = model.transform(GiveUniqueNodeNames())
        path = Path(cfg.folding_config_file)
        try:
            folding = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BuildError(f"folding JSON {path} cannot be read: {err}") from err
        if not isinstance(folding, dict):
            raise BuildError(f"folding JSON {path}: expected an object of node names")
        why = folding_mismatch(model, folding)
        if why is not None and cfg.folding_fallback_fps is None:
            raise BuildError(
                f"folding JSON {path} was made for another design: {why}; write one for "
                "this design with finn_flow/placement.py or use --target-fps"
            )
        if why is not None:
            print(
                f"[folding] the config's folding JSON {path} was made for another design "
                f"({why}); auto-folding to {cfg.folding_fallback_fps} FPS instead",
                flush=True,
            )
            cfg.folding_config_file = None
            cfg.target_fps = int(cfg.folding_fallback_fps)
            records.folding = {
                "json": str(path),
                "applied": False,
                "mismatch": why,
                "target_fps": cfg.target_fps,
            }
        else:
            records.folding = {"json": str(path), "applied": True}
    else:
        records.folding = {"target_fps": cfg.target_fps}
    records.save(cfg.output_dir)
    return step_set_folding(model, cfg)


def step_m3vit_save_folding(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """Write the folding in effect as ``<summary_dir>/folding.json`` (ApplyConfig format,
    reusable with ``--folding``)."""
    folding: dict[str, dict[str, Any]] = {"Defaults": {}}
    for node in model.graph.node:
        attrs = folding_attrs(getCustomOp(node))
        if attrs:
            folding[node.name] = attrs
    write_atomic(Path(cfg.summary_dir) / "folding.json", json.dumps(folding, indent=2, default=str))
    return model


def step_m3vit_minimize_bit_width(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """FINN's ``step_minimize_bit_width``, piece by piece on deep pathways (cut at the
    thresholding layers of the residual stream)."""
    cut = ("Thresholding_rtl", "Thresholding_hls")
    return on_pieces(model, cfg, "step_m3vit_minimize_bit_width", "minimize_bit_width", cut)


def step_m3vit_codegen_types(model: ModelWrapper, cfg: M3ViTBuildConfig) -> ModelWrapper:
    """Retype {0, 1} weight matrices from BINARY to INT2 (same values).

    finn-plus's weight-width minimisation types a matrix of zeros and ones as BINARY,
    which its MVAU code generators reject ("True binary (non-bipolar) inputs not yet
    supported"; the RTL MVAU needs signed weights). INT2 holds 0 and 1 exactly, so the
    function and the Python execution are unchanged; the estimates count 2-bit weights.
    Hit by the MoE stand-in's fixed 0/1 matrices (top-k counter, gate expansion) and by
    all-zero weights (for example zero-initialised expert biases).
    """
    retyped = []
    for node in model.graph.node:
        if not node.op_type.startswith(("MVAU", "VVAU")):
            continue
        inst = getCustomOp(node)
        if inst.get_nodeattr("weightDataType") == "BINARY":
            inst.set_nodeattr("weightDataType", "INT2")
            model.set_tensor_datatype(node.input[1], DataType["INT2"])
            retyped.append(node.name)
    records = StepRecords.load(cfg.output_dir)
    records.retyped_weights = retyped
    records.save(cfg.output_dir)
    return model


def build_steps(mode: str, moe: str = "reordered") -> list[Step]:
    """The explicit step list: FINN's own steps and this flow's, in order.

    ``moe``: 'reordered' swaps each MoE stand-in for the expert-by-expert engine
    (:mod:`finn_flow.moe_ops`) between streamlining and the conversion to HW layers;
    'standin' keeps the stand-in.
    """
    moe_steps: list[Step] = [step_m3vit_moe_reordered] if moe == "reordered" else []
    steps: list[Step] = [
        step_m3vit_qonnx_to_finn,
        step_m3vit_streamline,
        step_m3vit_snap_thresholds,
        step_m3vit_verify_streamlined,
        *moe_steps,
        step_m3vit_shared_thresholds,
        step_m3vit_convert_to_hw,
        step_m3vit_check_hw,
        step_m3vit_verify_hw,
        fs.step_create_dataflow_partition,
        fs.step_specialize_layers,
        step_m3vit_set_folding,
        step_m3vit_save_folding,
        step_m3vit_minimize_bit_width,
        step_m3vit_codegen_types,
        fs.step_generate_estimate_reports,
    ]
    if mode == "codegen":
        steps.append(fs.step_hw_codegen)
    return steps
