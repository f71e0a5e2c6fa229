"""What a build reports: resources, performance, what runs where; summary.json / SUMMARY.md.

Nothing here runs FINN: the functions read the build's final model and FINN's estimate
reports (``<out>/finn/report``) and write the human summary. Resource figures are
estimates (finn-plus's, or this project's cost models where finn-plus reports zero,
:mod:`finn_flow.cost_models`); cycles are FINN's analytical model; nothing is
synthesised, timed or simulated at RTL level (see :data:`STEPS_NOT_RUN`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finn_flow import BuildError, write_atomic

RESOURCE_KEYS = ("LUT", "FF", "BRAM_18K", "URAM", "DSP")
#: FINN steps this flow stops before, and what they need.
STEPS_NOT_RUN = {
    "step_hw_ipgen (HLS synthesis)": "needs Vitis HLS / Vivado 2024.2",
    "step_set_fifo_depths (rtlsim)": "needs the Vivado simulator (xsim)",
    "step_create_stitched_ip": "needs Vivado 2024.2",
    "step_measure_rtlsim_performance": "needs the Vivado simulator (xsim)",
    "step_out_of_context_synthesis": "needs Vivado 2024.2",
    "step_synthesize_bitfile": "needs Vivado 2024.2",
    "step_make_driver / step_deployment_package": "need a bitfile",
}


#: Utilisation a design may reach and still be called a fit (room for FIFOs, control,
#: routing and the estimates' error): BRAM_18K 90 %, URAM 95 %, LUT and DSP 70 %.
FIT_BUDGET = {"LUT": 0.70, "BRAM_18K": 0.90, "URAM": 0.95, "DSP": 0.70}


def budget_check(total: dict[str, float], capacity: dict[str, float]) -> dict[str, Any]:
    """Utilisation of each budgeted resource against :data:`FIT_BUDGET`.

    Returns ``{"fits": bool, "resources": {key: {"used", "capacity", "utilisation",
    "limit", "within"}}}``.
    """
    out = {}
    for key, limit in FIT_BUDGET.items():
        util = total[key] / capacity[key]
        out[key] = {
            "used": total[key],
            "capacity": capacity[key],
            "utilisation": util,
            "limit": limit,
            "within": bool(util <= limit),
        }
    return {"fits": all(v["within"] for v in out.values()), "resources": out}


#: The part-1 build of the default 6-block config (2026-11-28, 2 CPU cores, random
#: weights: all biases 0, LayerNorms at identity), as recorded in the README's FPGA
#: section; the reference of SUMMARY.md's "what changed since part 1" table.
PART1_REFERENCE: dict[str, Any] = {
    "weights": "random (no trained FPGA model existed)",
    "biases / LayerNorm affine": "float, folded by FINN into one threshold row per channel",
    "MoE": "stand-in: all 16 experts computed, all expert weights on chip",
    "thresholding cost": "finn-plus's estimator: one table per channel",
    "weight memories": "all MVAUs ram_style auto (BRAM), URAM unused",
    "LUT %": 1608.0,
    "BRAM_18K %": 457.0,
    "URAM %": 0.0,
    "DSP %": 40.0,
    "FPS @ 200 MHz": 32.3,
    "latency ms": 379.0,
    "HW-layer verification, max LSB": "15 (1 image)",
    "build seconds (2 cores)": 311.0,
}


def changes_since_part1(summary: dict[str, Any]) -> list[str]:
    """Markdown table: :data:`PART1_REFERENCE` beside this build's figures."""
    res, cap = summary.get("resources"), summary.get("board_capacity")
    if not res or not cap:
        return []
    perf = summary.get("performance") or {}
    thr = res.get("thresholds") or {}
    quant = summary.get("quantization") if isinstance(summary.get("quantization"), dict) else {}
    layers = res.get("layers", [])
    mvau = [lay for lay in layers if lay["op_type"].startswith("MVAU")]
    in_uram = sum(1 for lay in mvau if lay.get("URAM", 0) > 0)
    ver = [v for v in summary.get("verification") or [] if v.get("stage") == "hw_layers"]
    now: dict[str, Any] = {
        "weights": "trained checkpoint" if summary.get("checkpoint") else "random",
        "biases / LayerNorm affine": (
            "biases on the accumulator grid, LayerNorm affine folded into the next linear"
            if quant.get("int_bias") and quant.get("fold_norm_affine")
            else f"int_bias={quant.get('int_bias')}, fold_norm_affine="
            f"{quant.get('fold_norm_affine')}"
        ),
        "MoE": (summary.get("pathway") or {}).get("moe_form", "-"),
        "thresholding cost": (
            f"as generated: {thr.get('shared', 0)} of {thr.get('tables', 0)} layers with one "
            f"shared table, {thr.get('threshold_bits', 0) / 1e6:.2f} Mbit"
        ),
        "weight memories": f"{in_uram} of {len(mvau)} MVAUs in URAM, the rest BRAM",
        "FPS @ 200 MHz": perf.get("throughput_fps"),
        "latency ms": perf.get("latency_ms"),
        "HW-layer verification, max LSB": (
            f"{max(v['max_error_lsb'] for v in ver):.3g}" if ver else "-"
        ),
        "build seconds (2 cores)": summary.get("seconds"),
    }
    for key in RESOURCE_KEYS:
        if key != "FF":
            now[f"{key} %"] = 100.0 * res["total"][key] / cap[key]
    lines = ["| | part 1 | this build |", "|---|---|---|"]
    for key, before in PART1_REFERENCE.items():
        after = now.get(key, "-")
        if isinstance(after, float):
            after = f"{after:.1f}"
        lines.append(f"| {key} | {before} | {after} |")
    return lines


@dataclass
class StepRecords:
    """What the steps found, kept in ``<output_dir>/report/m3vit_steps.json``.

    Attributes:
        verification: one dict per verified stage (errors in output LSBs).
        pieces: per piece-wise step, the number of pieces and seconds per piece.
        non_hw_nodes: ``[name, op_type]`` of nodes that did not become HW layers.
        retyped_weights: MVAU/VVAU nodes whose {0, 1} weights were typed INT2.
        snapped_thresholds: ``[MultiThreshold output, channels, snapped entries]`` of
            each per-channel table made an exact integer shift of one row.
        shared_thresholds: ``[MultiThreshold output, channels]`` of each per-channel
            table rewritten as an integer bias + one shared table.
        integer_biases: outputs of the float bias adds moved onto the integer
            accumulator (before the layer's scale).
        folding: which folding was applied (JSON and whether it fit, or the FPS target).
    """

    verification: list[dict[str, Any]] = field(default_factory=list)
    pieces: dict[str, dict[str, Any]] = field(default_factory=dict)
    non_hw_nodes: list[list[str]] = field(default_factory=list)
    retyped_weights: list[str] = field(default_factory=list)
    snapped_thresholds: list[list[Any]] = field(default_factory=list)
    shared_thresholds: list[list[Any]] = field(default_factory=list)
    integer_biases: list[str] = field(default_factory=list)
    folding: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def path(output_dir: str | os.PathLike[str]) -> Path:
        """Where the records of the build writing to ``output_dir`` are kept."""
        return Path(output_dir) / "report" / "m3vit_steps.json"

    @classmethod
    def load(cls, output_dir: str | os.PathLike[str]) -> StepRecords:
        """The records so far (empty before the first step wrote any)."""
        path = cls.path(output_dir)
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()

    def save(self, output_dir: str | os.PathLike[str]) -> None:
        """Write the records (temporary file + rename)."""
        write_atomic(self.path(output_dir), json.dumps(dataclasses.asdict(self), indent=2))


#: What a build of this flow does not establish (listed in every SUMMARY.md).
NOT_CLAIMED = (
    "no HLS synthesis, place and route or timing closure: resources are estimates "
    "(finn-plus's, or this project's cost models where finn-plus reports zero) and the "
    "clock is the target, not a met timing",
    "no RTL simulation (xsim) and no C-simulation of finn-plus's own layers: the "
    "verification is Python execution of the graphs against the Brevitas model",
    "cycles, throughput and latency are analytical models (FINN's per-layer cycle "
    "estimates, the MoE engine's schedule model), not measurements on a board",
    "the FIFO depths between layers are not sized (that needs rtlsim)",
)


def dataflow_model(final_model_path: Path) -> Any:
    """The HW-layer graph of a build's final model (inside its dataflow partition)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    model = ModelWrapper(str(final_model_path))
    nodes = list(model.graph.node)
    if len(nodes) == 1 and nodes[0].op_type == "StreamingDataflowPartition":
        model = ModelWrapper(getCustomOp(nodes[0]).get_nodeattr("model"))
    return model


def collect_resources(final_model_path: Path, report_dir: Path) -> dict[str, Any]:
    """Per-layer resources: finn-plus's estimate, or ours where finn-plus says zero, and
    RTL thresholding layers as finn-plus's generator emits them (one table per PE when
    the thresholds are one shared row; :func:`finn_flow.cost_models.threshold_table`).

    Returns ``{"layers": [{name, op_type, cycles, source, LUT, FF, BRAM_18K, URAM,
    DSP}], "total": {key: sum}, "finn_total": finn-plus's own totals, "thresholds":
    {tables, shared, threshold_bits, finn_plus_estimate}}``.
    """
    from qonnx.custom_op.registry import getCustomOp

    from finn_flow.cost_models import (
        own_estimate,
        threshold_table,
        thresholding_rtl_as_generated,
    )

    finn_res = json.loads((report_dir / "estimate_layer_resources.json").read_text())
    cycles = json.loads((report_dir / "estimate_layer_cycles.json").read_text())
    layers = []
    totals = dict.fromkeys(RESOURCE_KEYS, 0.0)
    thr = {"tables": 0, "shared": 0, "threshold_bits": 0.0}
    thr_finn = dict.fromkeys(RESOURCE_KEYS, 0.0)
    model = dataflow_model(final_model_path)
    for node in model.graph.node:
        est = finn_res.get(node.name, {})
        finn_vals = {k: float(est.get(k, 0) or 0) for k in RESOURCE_KEYS}
        source = "finn-plus"
        if node.op_type == "Thresholding_rtl":
            table = threshold_table(model, node)
            gen = thresholding_rtl_as_generated(table)
            for k in RESOURCE_KEYS:
                thr_finn[k] += finn_vals[k]
            thr["tables"] += 1
            thr["shared"] += int(table.shared)
            thr["threshold_bits"] += gen["threshold_bits"]
            finn_vals = {k: float(gen[k]) for k in RESOURCE_KEYS}
            source = "as generated (finn_flow/cost_models.py)"
        elif finn_vals["LUT"] == 0 and finn_vals["BRAM_18K"] == 0 and finn_vals["DSP"] == 0:
            ours = own_estimate(node.op_type, getCustomOp(node))
            if ours is not None:
                finn_vals, source = ours, "own cost model (finn_flow/cost_models.py)"
        for k in RESOURCE_KEYS:
            totals[k] += finn_vals[k]
        layers.append(
            {
                "name": node.name,
                "op_type": node.op_type,
                "cycles": int(cycles.get(node.name, 0)),
                "source": source,
                **finn_vals,
            }
        )
    thr["finn_plus_estimate"] = thr_finn
    return {
        "layers": layers,
        "total": totals,
        "finn_total": finn_res.get("total", {}),
        "thresholds": thr,
    }


def moe_summary(form: str, layers: list[dict[str, Any]], dims: Any, weight_bits: int) -> dict:
    """The MoE layers of the design: form, per layer cycles and expert-weight traffic.

    Args:
        form: 'reordered' or 'standin'.
        layers: the reordered layers' reports (``finn_flow.moe_ops.step.load_reports``:
            one per MoE layer, see finn_flow/moe_ops/README.md).
        dims: the pathway's :class:`~finn_flow.quant_model.PathwayDims`.
        weight_bits: bits per expert weight (the stand-in's on-chip bytes).

    Returns:
        ``{"form", "description", "layers": [...], "expert_ddr_bytes_per_frame":
        {"worst", "mean"}, "onchip_expert_buffer_bytes"}``; bytes per frame are summed
        over the MoE layers, "mean" over the verification images' routing.
    """
    if form == "reordered":
        per_layer = [
            {
                "layer": rep["layer"],
                "block": dims.moe_layers[rep["layer"]],
                "cycles_worst_case": rep["cycles"]["worst_case"],
                "cycles_val_mean": rep["cycles"]["mean"],
                "cycles_val_max": rep["cycles"]["max"],
                "cycles_val_per_image": rep["cycles"]["per_input"],
                "non_empty_experts_per_image": rep["non_empty_experts_per_input"],
                "expert_ddr_bytes_per_frame": {
                    k: rep["expert_ddr_bytes_per_frame"][k] for k in ("worst", "mean", "max")
                },
                "onchip_expert_buffer_bytes": rep["onchip_expert_buffer_bytes"],
                "ddr_image_bytes": rep["ddr_image_bytes"],
                "swap_check": rep["swap_check"],
                "thresholds": rep["thresholds"],
                "folding": rep["folding"],
            }
            for rep in layers
        ]
        return {
            "form": "reordered",
            "description": "expert-by-expert engine (finn_flow/moe_ops): TopKGate -> "
            "ExpertDispatch -> ExpertFFN -> ExpertCombine; the FFN walks the non-empty "
            "experts only, reading each expert's weights from DDR into one of two on-chip "
            "buffers while the other computes; checked identical to the stand-in on the "
            "verification images before the swap",
            "layers": per_layer,
            "expert_ddr_bytes_per_frame": {
                "worst": sum(x["expert_ddr_bytes_per_frame"]["worst"] for x in per_layer),
                "mean": sum(x["expert_ddr_bytes_per_frame"]["mean"] for x in per_layer),
            },
            "onchip_expert_buffer_bytes": sum(x["onchip_expert_buffer_bytes"] for x in per_layer),
        }
    e, d, hd = dims.num_experts, dims.dim, dims.expert_hidden
    onchip = e * (2 * d * hd + d) * weight_bits // 8  # W1, W2 and the gated b2 matrix
    return {
        "form": "standin",
        "description": "stand-in: all experts computed, weighted by the router's exact "
        "top-k gates (zero elsewhere); the same function as top-k dispatch, every "
        "expert's weights on chip",
        "layers": [
            {
                "layer": i,
                "block": block,
                "cycles": "not attributed per layer: the stand-in is many finn-plus layers "
                "that stream in parallel (see resources.layers)",
                "expert_ddr_bytes_per_frame": {"worst": 0, "mean": 0, "max": 0},
                "onchip_expert_weight_bytes": onchip,
            }
            for i, block in enumerate(dims.moe_layers)
        ],
        "expert_ddr_bytes_per_frame": {"worst": 0, "mean": 0},
        "onchip_expert_buffer_bytes": onchip * len(dims.moe_layers),
    }


def performance(
    report_dir: Path,
    clock_ns: float,
    in_bytes: float,
    out_bytes: float,
    moe: dict[str, Any],
    layers: list[dict[str, Any]],
    ddr_gbps: float,
) -> dict[str, Any]:
    """Throughput, latency and DDR traffic per frame.

    Args:
        report_dir: FINN's report folder (``estimate_network_performance.json``; its
            cycles take every layer's worst case, the MoE engine's included).
        clock_ns: clock period in ns; in_bytes / out_bytes: one frame's input patches and
            output logits in bytes.
        moe: :func:`moe_summary`; layers: :func:`collect_resources`'s per-layer list.
        ddr_gbps: the board's DDR bandwidth in GB/s.
    """
    perf = json.loads((report_dir / "estimate_network_performance.json").read_text())
    max_cycles = int(perf["max_cycles"])
    lat_cycles = int(perf["critical_path_cycles"])
    fps = 1e9 / (clock_ns * max_cycles)
    experts = moe["expert_ddr_bytes_per_frame"]
    io = in_bytes + out_bytes
    res = {
        "clock_MHz": 1000.0 / clock_ns,
        "max_cycles_per_frame (bottleneck layer)": max_cycles,
        "critical_path_cycles": lat_cycles,
        "throughput_fps": fps,
        "latency_ms": lat_cycles * clock_ns * 1e-6,
        "ddr_bytes_per_frame": io + experts["worst"],
        "ddr_bytes_per_frame_val_mean": io + experts["mean"],
        "ddr_bytes": {
            "input_patches": in_bytes,
            "output_logits": out_bytes,
            "expert_weights_worst": experts["worst"],
            "expert_weights_val_mean": experts["mean"],
        },
        "ddr_GBps_at_throughput": (io + experts["worst"]) * fps / 1e9,
        "ddr_GBps_board": ddr_gbps,
        "finn_estimate_network_performance": perf,
    }
    if moe["form"] == "reordered":
        res["ddr_note"] = (
            "input patches + output logits + the non-empty experts' weights of every MoE "
            "layer (worst case: every expert non-empty; mean over the verification images' "
            "routing); the other weights are on chip"
        )
        others = [x["cycles"] for x in layers if not x["op_type"].startswith("ExpertFFN")]
        val_max = max([*others, *(x["cycles_val_max"] for x in moe["layers"])])
        res["max_cycles_per_frame_val_routing"] = val_max
        res["throughput_fps_val_routing"] = 1e9 / (clock_ns * val_max)
    else:
        res["ddr_note"] = (
            "input patches + output logits; all weights (every expert, the stand-in MoE "
            "form) are on chip, so no weight traffic per frame"
        )
    return res


def pathway_summary(
    dims: Any,
    task: str,
    head: Any,
    extra: tuple[int, int],
    out_hw: tuple[int, int],
    size: tuple[int, int],
    bits: int,
    moe_form: str,
) -> dict[str, Any]:
    """What the design computes and what runs where.

    Args:
        dims: the pathway's :class:`~finn_flow.quant_model.PathwayDims`.
        head: the task's float ``PUPHead``; extra: the head's final integer nearest
            resize ((1, 1): none); out_hw: (H, W) of the design's output.
        size: (H, W) of the input frame; bits: weight / activation bits.
        moe_form: 'reordered' or 'standin' (see :func:`moe_summary`).
    """
    head_note = (
        f"PUP head (LayerNorm, {head.num_up + 1} conv3x3+BN+ReLU at {head.channels} "
        f"channels, conv1x1, {head.num_up + 1} nearest x2 upsamplings"
        + (f", final nearest x{extra[0]}x{extra[1]}" if extra != (1, 1) else "")
        + f") -> logits (1, {out_hw[0]}, {out_hw[1]}, {head.num_classes}) NHWC"
    )
    host = ["patch cutting of the input frame (pure pixel reordering, host/DMA)"]
    if tuple(out_hw) != tuple(size):
        host.append(
            f"bilinear resize of the {out_hw[0]}x{out_hw[1]} logits to the "
            f"{size[0]}x{size[1]} input (not an integer factor)"
        )
    host.append(
        "task post-processing (argmax / sigmoid / normalisation, resize to the original image size)"
    )
    on_fpga = [
        "patch projection (QuantLinear), CLS/position token table",
        f"{dims.num_layers} transformer blocks (attention, LayerNorm, GELU, "
        + (
            f"the reordered expert-by-expert MoE engine on blocks {list(dims.moe_layers)}, "
            "expert weights streamed from DDR)"
            if moe_form == "reordered"
            else f"MoE stand-in on blocks {list(dims.moe_layers)}, all experts on chip)"
        ),
        head_note,
    ]
    if getattr(head, "upsample_mode", "bilinear") != "nearest":
        on_fpga.append(
            "NOTE: the float head is configured with bilinear upsampling; the FPGA form "
            "uses nearest (set upsample_mode='nearest', as configs/fpga does)"
        )
    return {
        "dims": dict(vars(dims)),
        "tokens": dims.tokens,
        "description": f"patch projection + {dims.num_layers} blocks "
        f"(MoE on {list(dims.moe_layers)}), task {task}'s routers + {task} PUP head",
        "moe_form": moe_form,
        "on_fpga": on_fpga,
        "on_host": host,
        "not_on_fpga": "; ".join(host),
        "output": f"(1, {out_hw[0]}, {out_hw[1]}, {head.num_classes}) NHWC, {bits}-bit logits",
    }


def quantization_summary(spec: Any) -> dict[str, Any]:
    """How the pathway is quantized (``spec``: :class:`~finn_flow.quant_model.QuantSpec`)."""
    return spec.as_dict() | {
        "weights": "per-tensor signed, narrow range",
        "activations": "per-tensor, calibrated (Brevitas)",
        "softmax / gates": f"unsigned, fixed scale 1/{2**spec.prob_bits - 1}",
        "LayerNorm": "float (finn-plus LayerNorm layer)",
        "GELU": "exact: integer table between its two quantizers, built as two "
        "thresholding layers (finn_flow/transforms.py GeluToThresholds)",
        "head": "conv weights per-tensor signed; BatchNorm + ReLU folded into "
        "unsigned thresholds; nearest x2 upsampling (exact on integers)",
    }


def codegen_listing(final_model_path: Path, build_dir: str) -> dict[str, Any]:
    """Where ``step_hw_codegen`` wrote each layer's HLS/RTL sources (and what)."""
    from qonnx.custom_op.registry import getCustomOp

    nodes = list(dataflow_model(final_model_path).graph.node)
    per_layer: dict[str, list[str]] = {}
    missing = []
    for node in nodes:
        folder = getCustomOp(node).get_nodeattr("code_gen_dir_ipgen")
        if not folder or not Path(folder).is_dir():
            missing.append(node.name)
            continue
        per_layer[node.name] = sorted(
            f.name for f in Path(folder).iterdir() if f.suffix in (".cpp", ".hpp", ".v", ".sv")
        )
    if missing:
        raise BuildError(f"step_hw_codegen wrote no sources for {missing}")
    by_ext: dict[str, int] = {}
    for f in Path(build_dir).rglob("*"):
        if f.is_file():
            by_ext[f.suffix or "(none)"] = by_ext.get(f.suffix or "(none)", 0) + 1
    return {
        "folder": str(build_dir),
        "layers": len(per_layer),
        "files": sum(by_ext.values()),
        "by_extension": dict(sorted(by_ext.items())),
        "sources_per_layer": per_layer,
    }


def verification_note(ver: list[dict[str, Any]]) -> str:
    """Say where any difference to the Brevitas model comes from."""
    by_stage = {v["stage"]: v for v in ver}
    if all(v["bit_exact"] for v in ver):
        return "bit exact at every verified stage"
    stream = by_stage.get("streamlined")
    if stream is not None and stream["bit_exact"]:
        return (
            "streamlined graph bit exact; the HW-layer graph differs by at most "
            f"{by_stage['hw_layers']['max_error_lsb']:.3g} LSB: introduced by the HW layers "
            "that compute in float32 (LayerNorm, the softmax inside ScaledDotProductAttention "
            "and HWSoftmax, float ElementwiseMul/Add), whose arithmetic order differs from "
            "PyTorch's and moves a few values across a rounding boundary of the next "
            "quantizer (errors in LSBs of the output quantizer: the head's logits)"
        )
    hw = by_stage.get("hw_layers", stream)
    return (
        f"streamlining already changes the result by at most {stream['max_error_lsb']:.3g} "
        f"LSB (mean {stream['mean_error_lsb']:.3g}): FINN folds the float scales (dequant "
        "scales, LayerNorm affine, the head's BatchNorm) into float32 thresholds in another "
        "order than PyTorch, which moves a few values across a rounding boundary; the "
        f"HW-layer graph differs by at most {hw['max_error_lsb']:.3g} LSB (errors in LSBs "
        "of the output quantizer: the head's logits)"
    )


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """summary.json + SUMMARY.md (both atomically)."""
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))
    lines = [
        f"# FINN build of the M3ViT `{summary['task']}` pathway ({summary['board']})",
        "",
        f"- status: **{summary['status']}**",
        f"- config: `{summary['config']}`",
        f"- checkpoint: {summary['checkpoint'] or '**NONE: RANDOM WEIGHTS** (numbers below describe the hardware, not a trained model)'}",  # noqa: E501
        f"- FINN: finn-plus {summary['finn']['finn_version']}; Vivado present: "
        f"{summary['finn']['vivado_present']}",
        f"- quantization: {summary['quantization']}",
        f"- calibration: {summary['calibration']}",
        f"- pathway: {summary['pathway']['description']}",
        f"- MoE: {(summary.get('moe') or {}).get('description', summary['pathway']['moe_form'])}",
    ]
    fold = summary.get("folding") or {}
    if fold.get("json") and fold.get("applied"):
        lines.append(f"- folding: `{fold['json']}` (fits this design)")
    elif fold.get("json"):
        lines.append(
            f"- folding: the config's `{fold['json']}` was made for another design "
            f"({fold.get('mismatch')}); auto-folded to {fold.get('target_fps')} FPS instead"
        )
    elif fold:
        lines.append(f"- folding: auto-folded to {fold.get('target_fps')} FPS")
    on_fpga = summary["pathway"].get("on_fpga")
    if on_fpga:
        lines += ["", "## What runs where", "", "On the FPGA (this streaming design):", ""]
        lines += [f"- {item}" for item in on_fpga]
        lines += ["", "On the host (CPU / DMA), not in this design:", ""]
        lines += [f"- {item}" for item in summary["pathway"].get("on_host", [])]
        if summary["pathway"].get("output"):
            lines += ["", f"FPGA output: {summary['pathway']['output']}"]
    else:
        lines.append(f"- not on FPGA: {summary['pathway']['not_on_fpga']}")
    cg = summary.get("codegen")
    if cg:
        lines += ["", "## Generated sources (--mode codegen; no synthesis)", ""]
        lines.append(
            f"- {cg['layers']} layers, {cg['files']} files under `{cg['folder']}` "
            f"(by type: {cg['by_extension']})"
        )
        if cg.get("retyped_weights"):
            lines.append(
                "- {0,1} weight matrices typed INT2 instead of BINARY for the MVAU "
                f"generators: {cg['retyped_weights']}"
            )
    if summary.get("error"):
        lines += ["", "## Error", "", "```", summary["error"], "```"]
    ver = summary.get("verification") or []
    if ver:
        bound = summary.get("max_lsb")
        lines += ["", "## Verification (python execution vs Brevitas)", ""]
        lines.append(
            f"On {summary.get('verification_images', 'the exported input')}; the build "
            + (f"fails above {bound:g} LSB (--max-lsb)." if bound is not None else "has no bound.")
        )
        lines.append("")
        lines += ["| stage | max err (LSB) | mean err (LSB) | bit exact |", "|---|---|---|---|"]
        for v in ver:
            lines.append(
                f"| {v['stage']} | {v['max_error_lsb']:.3g} | {v['mean_error_lsb']:.3g} | "
                f"{v['bit_exact']} |"
            )
        if summary.get("verification_note"):
            lines += ["", summary["verification_note"]]
    fvq = summary.get("float_vs_quant")
    if fvq:
        lines += ["", "## Float vs quantized (Brevitas) model", ""]
        lines.append(
            f"- relative L2 error: tokens {fvq['relative_l2_error_of_tokens']:.4g}, head "
            f"output {fvq['relative_l2_error_of_head_output']:.4g} ({fvq['images']})"
        )
        val = fvq.get("val_metric")
        if isinstance(val, dict):
            better = "lower" if val["lower_is_better"] else "higher"
            lines.append(
                f"- val metric `{val['primary']}` ({val['metric']}, {better} is better; "
                f"{val['images']} images of {val['data']}, input {val['input_size']}): "
                f"float **{val['float_primary']:.4g}**, quantized **{val['quant_primary']:.4g}** "
                f"(delta {val['delta']:+.4g})"
            )
            if summary.get("random_weights"):
                lines.append("- (random weights: the metric describes an untrained model)")
        elif val:
            lines.append(f"- val metric: {val}")
    rt = summary.get("routing")
    if isinstance(rt, dict):
        a = rt["agreement"]
        lines += ["", "## Routing: float model vs quantized pathway", ""]
        lines.append(
            f"{rt['images']} val frames, every token and MoE layer ({rt['file']} has the "
            f"expert ids and gates): same expert set **{a['set']:.1f} %**, same top-1 "
            f"{a['top1']:.1f} %, same expert per slot {a['slots']:.1f} %, mean |gate "
            f"difference| {a['gate_abs_diff']:.4f}"
        )
        head = (
            "| MoE layer | same set % | same top-1 % | load entropy float / quantized "
            f"(bits, max {rt['max_entropy_bits']:.2f}) |"
        )
        lines += ["", head, "|---|---|---|---|"]
        for i, pl in enumerate(rt["per_layer"]):
            lines.append(
                f"| {i} | {pl['set']:.1f} | {pl['top1']:.1f} | "
                f"{rt['float_entropy_bits'][i]:.2f} / {rt['quantized_entropy_bits'][i]:.2f} |"
            )
    elif rt:
        lines += ["", f"- routing: {rt}"]
    res = summary.get("resources")
    if res:
        cap = summary["board_capacity"]
        lines += ["", "## Resources (estimates, no synthesis)", ""]
        lines += ["| | " + " | ".join(RESOURCE_KEYS) + " |", "|---" * 6 + "|"]
        lines.append("| total | " + " | ".join(f"{res['total'][k]:.0f}" for k in RESOURCE_KEYS))
        lines.append(
            "| utilisation | "
            + " | ".join(f"{100 * res['total'][k] / cap[k]:.1f}%" for k in RESOURCE_KEYS)
        )
        bud = res.get("budget")
        if bud:
            verdict = "**fits**" if bud["fits"] else "**does not fit**"
            parts = ", ".join(
                f"{k} {100 * v['utilisation']:.1f} % (limit {100 * v['limit']:.0f} %"
                f"{'' if v['within'] else ', OVER'})"
                for k, v in bud["resources"].items()
            )
            lines += ["", f"Budget: {verdict} the board: {parts}."]
        thr = res.get("thresholds")
        if thr:
            fe = thr["finn_plus_estimate"]
            lines += [
                "",
                f"Thresholding: {thr['tables']} RTL layers, {thr['shared']} with one shared "
                f"table, {thr['threshold_bits'] / 1e6:.3f} Mbit of thresholds as generated "
                f"(finn-plus's estimator, which charges one table per channel: LUT "
                f"{fe['LUT']:.0f}, BRAM_18K {fe['BRAM_18K']:.0f}, URAM {fe['URAM']:.0f}).",
            ]
        lines += ["", "Per layer (source: finn-plus estimate or own cost model):", ""]
        lines += ["| layer | op | cycles | LUT | BRAM_18K | DSP | source |", "|---" * 7 + "|"]
        for layer in res["layers"]:
            lines.append(
                f"| {layer['name']} | {layer['op_type']} | {layer['cycles']} | "
                f"{layer['LUT']:.0f} | {layer['BRAM_18K']:.0f} | {layer['DSP']:.0f} | "
                f"{layer['source']} |"
            )
    moe = summary.get("moe")
    if moe and moe.get("form") == "reordered":
        lines += ["", f"## MoE layers ({moe['form']}; cycles are the engine's model)", ""]
        lines += [
            "| layer (block) | cycles worst case | cycles val mean / max | non-empty experts "
            "per image | expert DDR bytes/frame worst / val mean | on-chip expert buffers "
            "(bytes) | swap check |",
            "|---" * 7 + "|",
        ]
        for x in moe["layers"]:
            ddr = x["expert_ddr_bytes_per_frame"]
            check = x["swap_check"]
            lines.append(
                f"| {x['layer']} ({x['block']}) | {x['cycles_worst_case']} | "
                f"{x['cycles_val_mean']:.0f} / {x['cycles_val_max']} | "
                f"{x['non_empty_experts_per_image']} | {ddr['worst']} / {ddr['mean']:.0f} | "
                f"{x['onchip_expert_buffer_bytes']} | "
                f"{'identical' if check['identical'] else 'DIFFERENT'} on "
                f"{check['inputs']} images |"
            )
    ddr = summary.get("ddr_image")
    if ddr:
        lines += ["", "## Expert DDR image (--dump-ddr)", ""]
        lines.append(
            f"- `{ddr['folder']}`: {', '.join(ddr['files'])}; {ddr['bytes']} bytes, AXI "
            f"{ddr['axi_bits']} bits; node offsets {ddr['nodes']}"
        )
    change = changes_since_part1(summary)
    if change:
        lines += ["", "## What changed since part 1", ""]
        lines += ["Part 1: " + str(PART1_REFERENCE["weights"]) + "; see finn_flow/report.py "
                  "PART1_REFERENCE for where its figures come from.", ""]  # fmt: skip
        lines += change
    perf = summary.get("performance")
    if perf:
        lines += ["", "## Performance (estimates)", ""]
        for k, v in perf.items():
            lines.append(f"- {k}: {v}")
    lines += ["", "## Steps run", ""]
    for k, v in (summary.get("stage_seconds") or {}).items():
        lines.append(f"- {k}: {v} s (before FINN)")
    split = (summary.get("pieces") or {}).get("steps") or {}
    for k, v in (summary.get("step_seconds") or {}).items():
        where = ""
        if k in split and split[k]["pieces"] > 1:
            where = (
                f" ({split[k]['pieces']} pieces cut at the residual stream, "
                f"{summary['pieces']['jobs']} workers, finn_flow/pieces.py)"
            )
        lines.append(f"- {k}: {v} s{where}")
    lines += ["", "## Steps not run (need Vivado 2024.2 tools)", ""]
    for k, v in STEPS_NOT_RUN.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## What this build does not claim", ""]
    lines += [f"- {item}" for item in NOT_CLAIMED]
    write_atomic(out / "SUMMARY.md", "\n".join(lines) + "\n")
