#!/usr/bin/env python
"""Build one task's M3ViT pathway into a FINN streaming design (estimates / HLS code).

Usage::

    python finn_flow/build.py --task normals [--config CFG] [--checkpoint CKPT]
        [--board ZCU104] [--out DIR] [--mode estimate|codegen] [--target-fps F]
        [--folding JSON] [--bits B] [--jobs N] [--piece-nodes K]

Flow (every stage's model is saved under ``<out>/finn/intermediate_models``):

1. float model from the mmengine config (backbone ``M3ViT``), checkpoint if given
   (random weights otherwise, said loudly in the summary);
2. Brevitas mirror of the task's pathway (:mod:`finn_flow.quant_model`), calibrated on
   the configured data set when its files exist, else on synthetic images (said which);
   the task metric of the float and the quantized model on the val split
   (:mod:`finn_flow.evaluate`);
3. QONNX export + ``input.npy`` / ``expected_output.npy`` from the Brevitas model;
4. FINN steps (explicit list, see :data:`STEPS`): QONNX->FINN, tidy-up, streamlining,
   HW-layer conversion, a check that no non-HW node is left (naming offenders),
   verification of the HW-layer graph against the Brevitas output, dataflow partition,
   SpecializeLayers for the board's part, folding (target FPS or a folding JSON),
   minimize bit width, estimate reports, and in ``--mode codegen`` HLS/RTL code;
   QONNX->FINN + tidy-up, streamlining, HW conversion and bit-width minimisation run on
   pieces of the graph cut at its residual stream, in ``--jobs`` worker processes, and
   are stitched back (:mod:`finn_flow.pieces`; ``--jobs 0`` runs the whole graph);
   ``--mode codegen`` writes every layer's HLS C++ / Verilog under ``<out>/finn_build``
   ({0,1} weight matrices are typed INT2, not BINARY, which the MVAU generators reject);
   the task head runs on the FPGA too (nearest-neighbour upsampling, see
   :class:`finn_flow.quant_model.QuantPUPHead`);
5. ``<out>/summary.json`` + ``<out>/SUMMARY.md``; ``<out>/COMPLETE`` is written last and
   atomically, and removed at the start of every run, so an interrupted build is never
   mistaken for a finished one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python finn_flow/build.py` from a checkout
    sys.path.insert(0, str(REPO))

DEFAULT_CONFIG = (
    REPO / "configs" / "fpga" / "m3vit_vit-t16-6blk-moe16-top2-mg_fpga_synthnyud-64x80.py"
)
FOLDING_DIR = REPO / "finn_flow" / "folding"

#: Boards this flow knows: FPGA part and capacity (for utilisation figures).
BOARDS: dict[str, dict[str, Any]] = {
    "ZCU104": {
        "part": "xczu7ev-ffvc1156-2-e",
        "capacity": {"LUT": 230400, "FF": 460800, "BRAM_18K": 624, "URAM": 96, "DSP": 1728},
        "ddr_gbps": 19.2,
    }
}
RESOURCE_KEYS = ("LUT", "FF", "BRAM_18K", "URAM", "DSP")
STEPS_NOT_RUN = {
    "step_hw_ipgen (HLS synthesis)": "needs Vitis HLS / Vivado 2024.2",
    "step_set_fifo_depths (rtlsim)": "needs the Vivado simulator (xsim)",
    "step_create_stitched_ip": "needs Vivado 2024.2",
    "step_measure_rtlsim_performance": "needs the Vivado simulator (xsim)",
    "step_out_of_context_synthesis": "needs Vivado 2024.2",
    "step_synthesize_bitfile": "needs Vivado 2024.2",
    "step_make_driver / step_deployment_package": "need a bitfile",
}
MARKER = "COMPLETE"
#: Node attributes that make up a folding (written to <out>/folding.json).
FOLDING_ATTRS = ("PE", "SIMD", "EmbFold", "SeqFold", "parallel_window", "ram_style", "mem_mode")


class BuildError(RuntimeError):
    """A build stage failed; the message says which and why."""


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="normals", help="task whose pathway is built")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="mmengine model config")
    p.add_argument("--checkpoint", default=None, help="mmengine/torch checkpoint (.pth)")
    p.add_argument("--board", default="ZCU104", choices=sorted(BOARDS))
    p.add_argument("--out", default=None, help="output folder (default work_dirs/finn/<task>)")
    p.add_argument("--mode", default="estimate", choices=("estimate", "codegen"))
    p.add_argument("--target-fps", type=float, default=None, help="auto-folding target")
    p.add_argument(
        "--folding",
        default=None,
        help="folding JSON (default finn_flow/folding/<task>.json when --target-fps is not set)",
    )
    p.add_argument("--bits", type=int, default=None, help="weight and activation bits")
    p.add_argument("--calib-images", type=int, default=None, help="calibration images")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights / inputs")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="worker processes for the piece-wise streamlining / HW conversion of deep "
        "pathways (0: whole graph in this process; default: CPUs, at most 8)",
    )
    p.add_argument(
        "--piece-nodes",
        type=int,
        default=10,
        help="smallest piece (graph nodes) when the graph is cut at its residual stream "
        "(finn_flow/pieces.py); the default cuts at every attention / FFN boundary "
        "(streamlining time grows faster than linearly with the piece size)",
    )
    return p.parse_args(argv)


def fail(msg: str) -> None:
    """Exit with status 2 and ``msg`` (argument / input errors, before any work)."""
    print(f"build.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def load_config(path: str) -> Any:
    """Read the mmengine config and its ``fpga`` section."""
    from mmengine.config import Config

    if not Path(path).is_file():
        fail(f"config {path!r} does not exist")
    cfg = Config.fromfile(path)
    if "model" not in cfg or "backbone" not in cfg.model:
        fail(f"config {path!r} has no model.backbone")
    if "fpga" not in cfg:
        fail(f"config {path!r} has no 'fpga' section (input size, bits, clock, target FPS)")
    return cfg


def config_tasks(cfg: Any) -> list[str]:
    """Tasks of the configured model, chosen as the segmentor chooses them."""
    from mmseg_m3vit.models.segmentors import model_head_configs

    return list(model_head_configs(cfg.model))


def check_inputs(args: argparse.Namespace, cfg: Any) -> Path:
    """Validate task, checkpoint and output folder before any heavy work; returns out."""
    tasks = config_tasks(cfg)
    if args.task not in tasks:
        fail(f"unknown task {args.task!r} for config {args.config}; valid tasks are {tasks}")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        fail(f"checkpoint {args.checkpoint!r} does not exist")
    if args.folding is not None and not Path(args.folding).is_file():
        fail(f"folding JSON {args.folding!r} does not exist")
    if args.bits is not None and not 2 <= args.bits <= 16:
        fail(f"--bits must be in [2, 16], got {args.bits}")
    if args.jobs < 0:
        fail(f"--jobs must be >= 0 (0: no worker processes), got {args.jobs}")
    if args.piece_nodes < 1:
        fail(f"--piece-nodes must be >= 1, got {args.piece_nodes}")
    out = Path(args.out or REPO / "work_dirs" / "finn" / args.task).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        fail(f"output folder {str(out)!r} is not writable: {err}")
    return out


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file + rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- model
def build_float_backbone(cfg: Any, task: str, checkpoint: str | None, seed: int):
    """Build the float ``M3ViT`` of the config (eval mode); returns (backbone, info)."""
    import torch
    from mmseg.registry import MODELS

    import mmseg_m3vit  # noqa: F401  (registers the models)

    torch.manual_seed(seed)
    bcfg = dict(cfg.model.backbone)
    bcfg["tasks"] = config_tasks(cfg)
    bcfg["pretrained"] = None  # the FPGA flow never loads ImageNet weights itself
    bcfg.pop("init_cfg", None)
    backbone = MODELS.build(bcfg).eval()
    info: dict[str, Any] = {"checkpoint": checkpoint, "random_weights": checkpoint is None}
    if checkpoint is not None:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        if not isinstance(sd, dict):
            raise BuildError(f"checkpoint {checkpoint!r} holds no state dict")
        bsd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
        if not bsd:
            bsd = sd
        missing, unexpected = backbone.load_state_dict(bsd, strict=False)
        if missing:
            raise BuildError(
                f"checkpoint {checkpoint!r} lacks backbone tensors {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''} (expected keys 'backbone.<name>')"
            )
        info["ignored_keys"] = len(unexpected)
    return backbone, info


def build_float_head(cfg: Any, task: str, embed_dims: int, checkpoint: str | None):
    """Build the float task head of the config (eval mode), loading ``heads.<task>.*``."""
    import torch
    from mmseg.registry import MODELS

    from mmseg_m3vit.models.segmentors import model_head_configs

    hcfg = model_head_configs(cfg.model)[task]
    hcfg.setdefault("in_channels", embed_dims)
    head = MODELS.build(hcfg).eval()
    if checkpoint is not None:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        prefix = f"heads.{task}."
        hsd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not hsd:
            raise BuildError(f"checkpoint {checkpoint!r} has no '{prefix}*' head tensors")
        missing, _ = head.load_state_dict(hsd, strict=False)
        missing = [k for k in missing if not k.startswith("loss_decode")]
        if missing:
            raise BuildError(f"checkpoint {checkpoint!r} lacks head tensors {missing[:8]}")
    return head


def calibration_images(cfg: Any, n: int, size: tuple[int, int], seed: int):
    """Up to ``n`` normalised (1, 3, H, W) images and a note on where they came from.

    Uses the configured val data set (``val_dataloader.dataset``) when its data root
    exists, through the model's data preprocessor; otherwise synthetic N(0, 1) images.
    """
    import torch
    import torch.nn.functional as F

    root = None
    try:
        root = cfg.val_dataloader.dataset.get("data_root")
    except Exception:  # noqa: BLE001 - config without a val loader
        root = None
    if root and (REPO / root).exists() or (root and Path(root).exists()):
        try:
            from mmengine.registry import init_default_scope
            from mmseg.registry import DATASETS, MODELS

            import mmseg_m3vit  # noqa: F401  (registers the data set and its transforms)

            init_default_scope(cfg.get("default_scope", "mmseg"))  # pipeline lookups
            dcfg = dict(cfg.val_dataloader.dataset)
            if not Path(dcfg["data_root"]).exists():
                dcfg["data_root"] = str(REPO / dcfg["data_root"])
            dataset = DATASETS.build(dcfg)
            pre = MODELS.build(dict(cfg.model.data_preprocessor))
            imgs = []
            for i in range(min(n, len(dataset))):
                batch = pre(dict(inputs=[dataset[i]["inputs"]]), False)["inputs"].float()
                imgs.append(F.interpolate(batch, size=size, mode="bilinear", align_corners=False))
            if imgs:
                return imgs, f"val split of {dcfg['data_root']} ({len(imgs)} images)"
        except Exception as err:  # noqa: BLE001 - fall back, but say why
            note = f"synthetic N(0,1) images (data set at {root} unusable: {err})"
            gen = torch.Generator().manual_seed(seed)
            return [torch.randn(1, 3, *size, generator=gen) for _ in range(n)], note
    gen = torch.Generator().manual_seed(seed)
    note = f"synthetic N(0,1) images (configured data root {root!r} not present)"
    return [torch.randn(1, 3, *size, generator=gen) for _ in range(n)], note


# --------------------------------------------------------------------------- FINN steps
def non_hw_nodes(model: Any) -> list[tuple[str, str]]:
    """(name, op_type) of every node that is not a finn-plus HW layer."""
    return [
        (n.name, n.op_type)
        for n in model.graph.node
        if not n.domain.startswith("finn.custom_op.fpgadataflow")
    ]


def make_steps(out: Path, state: dict[str, Any]) -> list[Callable]:
    """The explicit FINN step list (FINN's own steps plus this project's)."""
    import finn.builder.build_dataflow_steps as fs
    import numpy as np
    from finn.builder.custom_step_library.transformer_adhoc import step_set_folding
    from finn.core.onnx_exec import execute_onnx
    from finn.transformation.fpgadataflow.attention import InferScaledDotProductAttention
    from finn.transformation.fpgadataflow.convert_to_hw.elementwise_binary_operation import (
        InferElementwiseBinaryOperation,
    )
    from finn.transformation.fpgadataflow.convert_to_hw.pwpolyf import InferPWPolyFLayer
    from finn.transformation.fpgadataflow.convert_to_hw.upsample import InferUpsample
    from finn.transformation.streamline.absorb import (
        AbsorbConsecutiveTransposes,
        AbsorbScalarBiasIntoMultiThreshold,
        AbsorbTransposeIntoMultiThreshold,
    )
    from finn.transformation.streamline.extract_multithreshold_scale_bias import (
        ExtractMultiThresholdScaleBias,
    )
    from finn.transformation.streamline.extract_norm_scale_bias import ExtractNormScaleBias
    from finn.transformation.streamline.reorder import MakeScaleResizeNHWC
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.general import GiveUniqueNodeNames
    from qonnx.transformation.infer_data_layouts import InferDataLayouts

    from finn_flow.transforms import (
        DuplicateForkedConstMul,
        GeluToThresholds,
        is_gelu_table_op,
    )

    x = np.load(out / "input.npy")
    expected = np.load(out / "expected_output.npy")

    def verify(model: Any, tag: str) -> dict[str, Any]:
        iname, oname = model.graph.input[0].name, model.graph.output[0].name
        got = execute_onnx(model, {iname: x})[oname]
        err = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        lsb = state["output_lsb"]
        res = {
            "stage": tag,
            "max_abs_error": float(err.max()),
            "mean_abs_error": float(err.mean()),
            "max_error_lsb": float(err.max() / lsb),
            "mean_error_lsb": float(err.mean() / lsb),
            "bit_exact": bool(err.max() == 0.0),
        }
        state.setdefault("verification", []).append(res)
        print(f"[verify] {tag}: max {res['max_error_lsb']:.3g} LSB, exact={res['bit_exact']}")
        return res

    def streamline_graph(model, cfg):
        """GELU to PWPolyF (before streamlining breaks its pattern), split scale/bias out of
        thresholds and norms, streamline, un-merge forked scales, streamline again."""
        model = model.transform(InferPWPolyFLayer())
        model = model.transform(ExtractMultiThresholdScaleBias())
        model = model.transform(ExtractNormScaleBias())
        model = fs.step_streamline(model, cfg)
        if model.get_nodes_by_op_type("Resize"):
            # head: move the NCHW<->NHWC transposes of the lowered convs past the
            # nearest-neighbour Resize nodes so that they cancel (all NHWC streams)
            for _ in range(4):  # a chain of k Resize nodes needs k rounds
                model = model.transform(InferDataLayouts())
                model = model.transform(MakeScaleResizeNHWC())
                model = model.transform(AbsorbConsecutiveTransposes())
                model = model.transform(AbsorbTransposeIntoMultiThreshold())
                model = model.transform(AbsorbConsecutiveTransposes())
        model = model.transform(DuplicateForkedConstMul())
        model = fs.step_streamline(model, cfg)
        model = model.transform(InferDataLayouts())
        return model.transform(GeluToThresholds())

    def convert_graph(model, cfg):
        """Attention pattern first (before its parts are converted one by one), then the
        integer GELU-table arithmetic (so MatMuls after it see exact integer types)."""
        model = model.transform(InferScaledDotProductAttention())
        model = model.transform(InferElementwiseBinaryOperation(is_gelu_table_op))
        model = model.transform(InferUpsample())  # head: Resize(nearest) -> HW upsampler
        model = model.transform(GiveUniqueNodeNames())
        return fs.step_convert_to_hw(model, cfg)

    def by_pieces(model, cfg, name, fn, cut_ops=("MultiThreshold",)):
        """Run ``fn`` on the whole graph (inside a piece worker, or with --jobs 0), or
        split the graph at its residual-stream cuts, run it on the pieces in worker
        processes and stitch them (finn_flow/pieces.py says why)."""
        if state.get("in_piece") or not state.get("jobs"):
            return fn(model, cfg)
        from finn_flow import pieces

        parts, bounds = pieces.split(model, state.get("piece_nodes", 10), cut_ops)
        names = (model.graph.input[0].name, model.graph.output[0].name)
        print(f"[pieces] {name}: {len(parts)} piece(s), {state['jobs']} worker(s)", flush=True)
        if len(parts) == 1:
            state.setdefault("pieces", {})[name] = {"pieces": 1}
            return fn(model, cfg)
        work = out / "finn" / "pieces" / name
        results = pieces.run_on_pieces(
            parts, [name], work, out, Path(state["cfg_json"]), {"mode": state["mode"],
            "output_lsb": state["output_lsb"], "in_piece": True}, state["jobs"],
        )  # fmt: skip
        done = [ModelWrapper(r["saved"][name]) for r in results]
        state.setdefault("pieces", {})[name] = {
            "pieces": len(parts),
            "piece_seconds": [round(sum(r["seconds"].values()), 1) for r in results],
        }
        return pieces.stitch(done, bounds, names)

    def qonnx_to_finn_graph(model, cfg):
        """FINN's own QONNX-to-FINN conversion and tidy-up steps, then the signed
        quantizers' offset ``Add`` absorbed into their thresholds (FINN's streamlining
        starts with the same transform; done here so that a residual quantizer's output
        is a proper signed integer stream where the graph is cut into pieces)."""
        model = fs.step_tidy_up(fs.step_qonnx_to_finn(model, cfg), cfg)
        return model.transform(AbsorbScalarBiasIntoMultiThreshold())

    def step_m3vit_qonnx_to_finn(model, cfg):
        """FINN's ``step_qonnx_to_finn`` + ``step_tidy_up``, piece by piece on deep
        pathways (cut at the residual stream's activation quantizers)."""
        return by_pieces(model, cfg, "step_m3vit_qonnx_to_finn", qonnx_to_finn_graph, ("Quant",))

    def step_m3vit_streamline(model, cfg):
        """Streamlining (see ``streamline_graph``), piece by piece on deep pathways."""
        return by_pieces(model, cfg, "step_m3vit_streamline", streamline_graph)

    def step_m3vit_convert_to_hw(model, cfg):
        """Conversion to HW layers (see ``convert_graph``), piece by piece on deep pathways."""
        return by_pieces(model, cfg, "step_m3vit_convert_to_hw", convert_graph)

    def step_m3vit_check_hw(model, cfg):
        """Assert that every node is a HW layer; name the offenders."""
        bad = non_hw_nodes(model)
        state["non_hw_nodes"] = bad
        if bad:
            types = sorted({t for _, t in bad})
            raise BuildError(
                f"{len(bad)} node(s) did not become HW layers (op types {types}): "
                + ", ".join(f"{n} ({t})" for n, t in bad)
            )
        return model

    def step_m3vit_verify_hw(model, cfg):
        """Python execution of the HW-layer graph against the Brevitas output."""
        verify(model, "hw_layers")
        return model

    def step_m3vit_verify_streamlined(model, cfg):
        """Python execution after streamlining (standard ops + thresholds)."""
        verify(model, "streamlined")
        return model

    def step_m3vit_minimize_bit_width(model, cfg):
        """FINN's ``step_minimize_bit_width``, piece by piece on deep pathways (cut at the
        thresholding layers of the residual stream)."""
        cut = ("Thresholding_rtl", "Thresholding_hls")
        return by_pieces(
            model, cfg, "step_m3vit_minimize_bit_width", fs.step_minimize_bit_width, cut
        )

    def step_m3vit_save_folding(model, cfg):
        """Write the folding in effect as ``<out>/folding.json`` (ApplyConfig format)."""
        from qonnx.custom_op.registry import getCustomOp

        folding: dict[str, dict[str, Any]] = {"Defaults": {}}
        for node in model.graph.node:
            inst = getCustomOp(node)
            attrs = {}
            for key in FOLDING_ATTRS:
                try:
                    attrs[key] = inst.get_nodeattr(key)
                except Exception:  # noqa: BLE001 - attribute absent on this op type
                    continue
            if attrs:
                folding[node.name] = attrs
        write_atomic(out / "folding.json", json.dumps(folding, indent=2, default=str))
        return model

    def step_m3vit_codegen_types(model, cfg):
        """Retype {0, 1} weight matrices from BINARY to INT2 (same values).

        finn-plus's weight-width minimisation types a matrix of zeros and ones as BINARY,
        which its MVAU code generators reject ("True binary (non-bipolar) inputs not yet
        supported"; the RTL MVAU needs signed weights). INT2 holds 0 and 1 exactly, so
        the function and the Python execution are unchanged; the estimates count 2-bit
        weights. Hit by the MoE stand-in's fixed 0/1 matrices (top-k counter, gate
        expansion) and by all-zero weights (for example random-init expert biases).
        """
        from qonnx.core.datatype import DataType
        from qonnx.custom_op.registry import getCustomOp

        retyped = []
        for node in model.graph.node:
            if not node.op_type.startswith(("MVAU", "VVAU")):
                continue
            inst = getCustomOp(node)
            if inst.get_nodeattr("weightDataType") == "BINARY":
                inst.set_nodeattr("weightDataType", "INT2")
                model.set_tensor_datatype(node.input[1], DataType["INT2"])
                retyped.append(node.name)
        state["codegen_retyped_weights"] = retyped
        return model

    steps: list[Callable] = [
        step_m3vit_qonnx_to_finn,
        step_m3vit_streamline,
        step_m3vit_verify_streamlined,
        step_m3vit_convert_to_hw,
        step_m3vit_check_hw,
        step_m3vit_verify_hw,
        fs.step_create_dataflow_partition,
        fs.step_specialize_layers,
        step_set_folding,
        step_m3vit_save_folding,
        step_m3vit_minimize_bit_width,
        step_m3vit_codegen_types,
        fs.step_generate_estimate_reports,
    ]
    if state["mode"] == "codegen":
        steps.append(fs.step_hw_codegen)
    return steps


def run_steps(model_path: Path, cfg: Any, steps: list[Callable], out: Path) -> dict[str, float]:
    """Run ``steps`` in order, saving each step's model; returns seconds per step."""
    from qonnx.core.modelwrapper import ModelWrapper

    inter = out / "finn" / "intermediate_models"
    inter.mkdir(parents=True, exist_ok=True)
    model = ModelWrapper(str(model_path))
    times: dict[str, float] = {}
    for i, step in enumerate(steps, 1):
        name = step.__name__
        print(f"[finn] step {i}/{len(steps)}: {name}", flush=True)
        t0 = time.time()
        try:
            model = step(model, cfg)
        except BuildError:
            raise
        except Exception as err:
            raise BuildError(f"FINN step {name} failed: {type(err).__name__}: {err}") from err
        times[name] = round(time.time() - t0, 2)
        model.save(str(inter / f"{name}.onnx"))
    return times


# --------------------------------------------------------------------------- summary
def collect_resources(final_model_path: Path, report_dir: Path, part: str) -> dict[str, Any]:
    """Per-layer resources: finn-plus's estimate, or ours where finn-plus says zero."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    from finn_flow.cost_models import own_estimate

    finn_res = json.loads((report_dir / "estimate_layer_resources.json").read_text())
    cycles = json.loads((report_dir / "estimate_layer_cycles.json").read_text())
    model = ModelWrapper(str(final_model_path))
    nodes = list(model.graph.node)
    if len(nodes) == 1 and nodes[0].op_type == "StreamingDataflowPartition":
        model = ModelWrapper(getCustomOp(nodes[0]).get_nodeattr("model"))
        nodes = list(model.graph.node)
    layers = []
    totals = dict.fromkeys(RESOURCE_KEYS, 0.0)
    for node in nodes:
        est = finn_res.get(node.name, {})
        finn_vals = {k: float(est.get(k, 0) or 0) for k in RESOURCE_KEYS}
        source = "finn-plus"
        if finn_vals["LUT"] == 0 and finn_vals["BRAM_18K"] == 0 and finn_vals["DSP"] == 0:
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
    return {"layers": layers, "total": totals, "finn_total": finn_res.get("total", {})}


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
        f"- MoE: {summary['pathway']['moe_form']}",
    ]
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
        lines += ["", "## Verification (python execution vs Brevitas)", ""]
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
        lines += ["", "Per layer (source: finn-plus estimate or own cost model):", ""]
        lines += ["| layer | op | cycles | LUT | BRAM_18K | DSP | source |", "|---" * 7 + "|"]
        for layer in res["layers"]:
            lines.append(
                f"| {layer['name']} | {layer['op_type']} | {layer['cycles']} | "
                f"{layer['LUT']:.0f} | {layer['BRAM_18K']:.0f} | {layer['DSP']:.0f} | "
                f"{layer['source']} |"
            )
    perf = summary.get("performance")
    if perf:
        lines += ["", "## Performance (estimates)", ""]
        for k, v in perf.items():
            lines.append(f"- {k}: {v}")
    lines += ["", "## Steps run", ""]
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
    write_atomic(out / "SUMMARY.md", "\n".join(lines) + "\n")


def codegen_listing(final_model_path: Path, build_dir: str) -> dict[str, Any]:
    """Where ``step_hw_codegen`` wrote each layer's HLS/RTL sources (and what)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    model = ModelWrapper(str(final_model_path))
    nodes = list(model.graph.node)
    if len(nodes) == 1 and nodes[0].op_type == "StreamingDataflowPartition":
        model = ModelWrapper(getCustomOp(nodes[0]).get_nodeattr("model"))
        nodes = list(model.graph.node)
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


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one linear flow
    """Run the build; returns 0 on a verified, complete build, 1 on a failed build."""
    args = parse_args(argv)
    cfg = load_config(args.config)
    out = check_inputs(args, cfg)
    marker = out / MARKER
    if marker.exists():
        marker.unlink()  # invalidate the previous build before touching anything
        print(f"[build] {out} held a finished build; it is being replaced")
    for stale in ("finn", "summary.json", "SUMMARY.md"):
        path = out / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    t_start = time.time()

    from finn_flow.finn_env import start_finn

    env = start_finn(out)
    fpga = dict(cfg.fpga)
    board = BOARDS[args.board]
    bits = args.bits or int(fpga.get("bits", 8))
    size = tuple(fpga["input_size"])
    summary: dict[str, Any] = {
        "task": args.task,
        "config": str(Path(args.config).resolve()),
        "checkpoint": args.checkpoint,
        "random_weights": args.checkpoint is None,
        "board": args.board,
        "fpga_part": board["part"],
        "board_capacity": board["capacity"],
        "mode": args.mode,
        "input_size": list(size),
        "finn": env.as_dict(),
        "status": "running",
    }
    if args.checkpoint is None:
        print("[build] WARNING: no --checkpoint given: the pathway uses RANDOM WEIGHTS")
    state: dict[str, Any] = {"mode": args.mode}
    try:
        import numpy as np
        import torch
        from brevitas.export import export_qonnx

        from finn_flow import quant_model as qm

        backbone, winfo = build_float_backbone(cfg, args.task, args.checkpoint, args.seed)
        p = backbone.patch_size
        grid = (size[0] // p, size[1] // p)
        if size[0] % p or size[1] % p:
            raise BuildError(f"fpga.input_size {size} is not a multiple of the patch {p}")
        dims = qm.pathway_dims(backbone, grid)
        spec = qm.QuantSpec(weight_bits=bits, act_bits=bits, prob_bits=8)
        qpath = qm.QuantM3ViTPathway(dims, spec)
        qm.load_backbone(qpath, backbone, args.task)
        fhead = build_float_head(cfg, args.task, dims.dim, args.checkpoint)
        head_mode = getattr(fhead, "upsample_mode", "bilinear")
        native = (grid[0] * 2 ** (fhead.num_up + 1), grid[1] * 2 ** (fhead.num_up + 1))
        extra = (size[0] // native[0], size[1] // native[1])
        exact = (extra[0] * native[0], extra[1] * native[1]) == tuple(size)
        if not exact:
            extra = (1, 1)  # the head's native output; the host resizes it (said below)
        conv_bias = fhead.convs[0].conv.bias is not None
        qhead = qm.QuantPUPHead(
            grid, dims.dim, fhead.channels, fhead.num_up, fhead.num_classes, spec,
            conv_bias=conv_bias, extra=extra,
        )  # fmt: skip
        qhead.load_float(fhead)
        qmodel = qm.QuantTaskModel(qpath, qhead)
        n_cal = args.calib_images or int(fpga.get("calib_images", 8))
        images, cal_note = calibration_images(cfg, n_cal, size, args.seed)
        qm.calibrate(qmodel, [qm.patchify(im, p) for im in images])
        summary["calibration"] = cal_note
        summary["quantization"] = spec.as_dict() | {
            "weights": "per-tensor signed, narrow range",
            "activations": "per-tensor, calibrated (Brevitas)",
            "softmax / gates": f"unsigned, fixed scale 1/{2**spec.prob_bits - 1}",
            "LayerNorm": "float (finn-plus LayerNorm layer)",
            "GELU": "exact: integer table between its two quantizers, built as two "
            "thresholding layers (finn_flow/transforms.py GeluToThresholds)",
            "head": "conv weights per-tensor signed; BatchNorm + ReLU folded into "
            "unsigned thresholds; nearest x2 upsampling (exact on integers)",
        }
        # float vs quantized agreement: relative L2 errors on the calibration images and
        # the task metric on the val split (finn_flow/evaluate.py)
        out_hw = tuple(native[i] * extra[i] for i in range(2))
        with torch.no_grad():
            errs, head_errs = [], []
            for im in images:
                f_tok = backbone(im, args.task).tokens
                q_tok = qpath(qm.patchify(im, p))
                errs.append(float((f_tok - q_tok).norm() / f_tok.norm()))
                f_out = fhead(f_tok, grid, out_hw).permute(0, 2, 3, 1)
                q_out = qhead(q_tok)
                head_errs.append(float((f_out - q_out).norm() / f_out.norm().clamp_min(1e-12)))
        from finn_flow.evaluate import ValDataError, evaluate_val_metric

        def float_logits(img):  # (1, 3, H, W) -> (1, C, H', W') NCHW
            return fhead(backbone(img, args.task).tokens, grid, out_hw)

        def quant_logits(img):  # patches -> (1, H', W', C) NHWC -> NCHW
            return qmodel(qm.patchify(img, p)).permute(0, 3, 1, 2)

        print("[build] task metric of the float and quantized models on the val split ...")
        try:  # a report, not a build stage: a build without the val data still finishes
            val = evaluate_val_metric(
                cfg, args.task, float_logits, quant_logits, size, fpga.get("val_images"), fhead
            )
        except ValDataError as err:
            val = f"not computed: {err}"
        except Exception as err:  # noqa: BLE001 - reported in the summary, build goes on
            traceback.print_exc()
            val = f"not computed: {type(err).__name__}: {err}"
        if isinstance(val, str):
            print(f"[build] val metric {val}")
        else:
            print(
                f"[build] val {val['primary']}: float {val['float_primary']:.4g}, quantized "
                f"{val['quant_primary']:.4g} ({val['images']} images, {val['seconds']} s)"
            )
        summary["float_vs_quant"] = {
            "relative_l2_error_of_tokens": sum(errs) / len(errs),
            "relative_l2_error_of_head_output": sum(head_errs) / len(head_errs),
            "float_head_upsample_mode": head_mode,
            "images": cal_note,
            "val_metric": val,
        }
        x = qm.patchify(images[0], p)
        with torch.no_grad():
            y = qmodel(x)
        np.save(out / "input.npy", x.numpy().astype(np.float32))
        np.save(out / "expected_output.npy", y.numpy().astype(np.float32))
        state["output_lsb"] = float(qhead.out_quant.act_quant.scale().item())
        onnx_path = out / "model_qonnx.onnx"
        print("[build] exporting QONNX ...", flush=True)
        export_qonnx(qmodel, args=x, export_path=str(onnx_path), opset_version=17)
        head_note = (
            f"PUP head (LayerNorm, {fhead.num_up + 1} conv3x3+BN+ReLU at {fhead.channels} "
            f"channels, conv1x1, {fhead.num_up + 1} nearest x2 upsamplings"
            + (f", final nearest x{extra[0]}x{extra[1]}" if extra != (1, 1) else "")
            + f") -> logits (1, {out_hw[0]}, {out_hw[1]}, {fhead.num_classes}) NHWC"
        )
        host = ["patch cutting of the input frame (pure pixel reordering, host/DMA)"]
        if tuple(out_hw) != tuple(size):
            host.append(
                f"bilinear resize of the {out_hw[0]}x{out_hw[1]} logits to the "
                f"{size[0]}x{size[1]} input (not an integer factor)"
            )
        host.append(
            "task post-processing (argmax / sigmoid / normalisation, resize to the "
            "original image size)"
        )
        fpga_parts = [
            "patch projection (QuantLinear), CLS/position token table",
            f"{dims.num_layers} transformer blocks (attention, LayerNorm, GELU, "
            f"MoE stand-in on {list(dims.moe_layers)})",
            head_note,
        ]
        if head_mode != "nearest":
            fpga_parts.append(
                "NOTE: the float head is configured with bilinear upsampling; the FPGA form "
                "uses nearest (set upsample_mode='nearest', as configs/fpga does)"
            )
        summary["pathway"] = {
            "dims": {k: v for k, v in vars(dims).items()},
            "tokens": dims.tokens,
            "parameters": qm.count_parameters(qmodel),
            "description": f"patch projection + {dims.num_layers} blocks "
            f"(MoE on {list(dims.moe_layers)}), task {args.task}'s routers + "
            f"{args.task} PUP head",
            "moe_form": "part-1 stand-in: all experts computed, weighted by the router's "
            "top-k gates (zero elsewhere); the same function as top-k dispatch",
            "on_fpga": fpga_parts,
            "on_host": host,
            "not_on_fpga": "; ".join(host),
            "output": f"(1, {out_hw[0]}, {out_hw[1]}, {fhead.num_classes}) NHWC, {bits}-bit logits",
        }

        from finn.builder.build_dataflow_config import DataflowBuildConfig, DataflowOutputType

        folding = args.folding
        target_fps = args.target_fps
        if target_fps is None and folding is None:
            default_fold = FOLDING_DIR / f"{args.task}.json"
            if fpga.get("use_folding_json", False) and default_fold.is_file():
                folding = str(default_fold)
            else:
                target_fps = float(fpga.get("target_fps", 30))
        clk = float(fpga.get("clock_ns", 5.0))
        dcfg = DataflowBuildConfig(
            output_dir=str(out / "finn"),
            synth_clk_period_ns=clk,
            fpga_part=board["part"],
            target_fps=int(target_fps) if target_fps is not None else None,
            folding_config_file=Path(folding) if folding else None,
            standalone_thresholds=True,
            generate_outputs=[DataflowOutputType.ESTIMATE_REPORTS],
            enable_build_pdb_debug=False,
            verify_steps=[],
            save_intermediate_models=True,
        )
        (out / "finn").mkdir(parents=True, exist_ok=True)
        write_atomic(out / "finn" / "dataflow_build_config.json", dcfg.to_json())
        state["cfg_json"] = str(out / "finn" / "dataflow_build_config.json")
        state["jobs"] = args.jobs
        state["piece_nodes"] = args.piece_nodes
        steps = make_steps(out, state)
        summary["steps"] = [s.__name__ for s in steps]
        summary["folding"] = {"target_fps": target_fps, "folding_json": folding}
        times = run_steps(onnx_path, dcfg, steps, out)
        summary["step_seconds"] = times
        summary["verification"] = state.get("verification", [])
        summary["pieces"] = {
            "jobs": args.jobs,
            "min_nodes": args.piece_nodes,
            "steps": state.get("pieces", {}),
        }
        report_dir = out / "finn" / "report"
        final = out / "finn" / "intermediate_models" / f"{steps[-1].__name__}.onnx"
        res = collect_resources(final, report_dir, board["part"])
        summary["resources"] = res
        perf = json.loads((report_dir / "estimate_network_performance.json").read_text())
        max_cycles = int(perf["max_cycles"])
        lat_cycles = int(perf["critical_path_cycles"])
        in_bytes = int(np.prod(x.shape)) * bits / 8
        out_bytes = int(np.prod(y.shape)) * bits / 8
        summary["performance"] = {
            "clock_MHz": 1000.0 / clk,
            "max_cycles_per_frame (bottleneck layer)": max_cycles,
            "critical_path_cycles": lat_cycles,
            "throughput_fps": 1e9 / (clk * max_cycles),
            "latency_ms": lat_cycles * clk * 1e-6,
            "ddr_bytes_per_frame": in_bytes + out_bytes,
            "ddr_note": "input patches + output logits; all weights (every expert, the "
            "part-1 stand-in) are on chip, so no weight traffic per frame",
            "finn_estimate_network_performance": perf,
        }
        summary["verification_note"] = verification_note(summary["verification"])
        if args.mode == "codegen":
            summary["codegen"] = codegen_listing(final, env.build_dir)
            summary["codegen"]["retyped_weights"] = state.get("codegen_retyped_weights", [])
        summary["status"] = "complete"
        summary["seconds"] = round(time.time() - t_start, 1)
        write_summary(out, summary)
        write_atomic(marker, json.dumps({"finished": time.time(), "task": args.task}) + "\n")
        print(f"[build] done in {summary['seconds']} s: {out / 'SUMMARY.md'}")
        return 0
    except Exception as err:
        summary["status"] = "failed"
        summary["error"] = f"{type(err).__name__}: {err}"
        summary["non_hw_nodes"] = state.get("non_hw_nodes")
        summary["verification"] = state.get("verification", [])
        summary["seconds"] = round(time.time() - t_start, 1)
        summary.setdefault("pathway", {"description": "-", "moe_form": "-", "not_on_fpga": "-"})
        summary.setdefault("quantization", "-")
        summary.setdefault("calibration", "-")
        write_summary(out, summary)
        traceback.print_exc()
        print(f"build.py: build FAILED: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
