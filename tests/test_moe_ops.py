"""The MoE engine ops' numpy oracles against independent loop references.

The engine (TopKGate -> ExpertDispatch -> ExpertFFN -> ExpertCombine, expert by expert)
is checked op by op against naive per-token / per-row Python loops, and end to end
against the token-order MoE (each token visits its k experts; no reordering at all).
Routings: random, an expert nobody picks, every token on one expert, ties, and experts
with per-channel pre-activation thresholds and non-zero biases. Also the DDR image
against an independent bit-level reader, and the resource / cycle figures.
"""

from __future__ import annotations

import numpy as np
import pytest
from qonnx.core.datatype import DataType

T, D, HD, E, K = 7, 8, 4, 4, 2
N1, NH = 15, 15  # 4-bit pre-activation and hidden codes


def make_prm(seed: int = 0, per_ch: bool = False, bias: bool = True, scale_per_ch: bool = False):
    """Engine parameters in the form finn_flow.moe_ops.transform.extract returns."""
    from finn_flow.moe_ops.ddr import signed_bits

    rng = np.random.default_rng(seed)
    w1 = rng.integers(-8, 8, (E, D, HD))
    w2 = rng.integers(-8, 8, (E, HD, D))
    acc1 = int(np.abs(w1).sum(axis=1).max()) * 128
    if per_ch:
        thr1 = np.sort(rng.integers(-acc1 // 2, acc1 // 2, (E, HD, N1)), axis=-1)
        b1 = np.zeros((E, HD), dtype=np.int64)
    else:
        thr1 = np.sort(rng.integers(-acc1 // 2, acc1 // 2, (1, 1, N1)), axis=-1)
        b1 = rng.integers(-300, 300, (E, HD)) if bias else np.zeros((E, HD), dtype=np.int64)
    b2 = rng.integers(-60, 60, (E, D)) if bias else np.zeros((E, D), dtype=np.int64)
    act_lut = np.sort(rng.normal(0, 1, N1 + 1)).astype(np.float32)
    act_lut[:3] = act_lut[3]  # a flat start, like GELU's
    gate_scale = (np.arange(256) / 255.0).astype(np.float32)
    thr_h = np.sort(rng.normal(0, 0.4, (1, NH))).astype(np.float32)
    bound2 = int(np.abs(w2).reshape(E * HD, D).sum(axis=0).max()) * 8
    boundb = 255 * int(np.abs(b2).sum(axis=0).max())
    lim = acc1 + int(np.abs(b1).max()) + 1
    scale_y = rng.uniform(1e-3, 1e-2, D if scale_per_ch else 1).astype(np.float32)
    return {
        "T": T, "D": D, "Hd": HD, "E": E, "k": K,
        "x_dt": DataType["INT8"], "p_dt": DataType["UINT8"], "g_dt": DataType["UINT8"],
        "hid_dt": DataType["INT4"], "w_dt": DataType["INT4"], "routing_dt": DataType["UINT8"],
        "acc_dt": DataType[f"INT{signed_bits(np.array([bound2, -bound2, boundb, -boundb]))}"],
        "acc1_bits": signed_bits(np.array([lim, -lim])) + 1,
        "gate_lut": np.minimum(np.arange(256) + 3, 255),  # a re-quantisation that is not 1:1
        "act_lut": act_lut, "gate_scale": gate_scale,
        "w1": w1, "b1": b1, "thr1": thr1, "per_ch": int(per_ch),
        "w2": w2, "b2": b2, "thr_h": thr_h, "act_h": -8,
        "scale_y": scale_y, "scale_b": np.float32([3e-4]), "has_bias": int(bias),
    }  # fmt: skip


def routing_probs(kind: str, seed: int = 1) -> np.ndarray:
    """Probability codes (T, E) for one routing case."""
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 256, (T, E))
    if kind == "empty_expert":
        p[:, 3] = 0  # expert 3 never in the top 2 (ties at 0 go to lower ids)
        p[:, :3] = rng.integers(1, 256, (T, 3))
    elif kind == "one_expert":
        p[:, 1] = 255
        p[:, [0, 2, 3]] = rng.integers(0, 255, (T, 3))
    elif kind == "ties":
        p[0] = 17  # all tied: experts 0, 1
        p[1] = [5, 9, 9, 9]  # 1, 2
        p[2] = [9, 9, 1, 9]  # 0, 1
        p[3] = [0, 0, 0, 0]
    return p.astype(np.float32)


# ------------------------------------------------------------------ independent references
def ref_topk(p: np.ndarray, k: int) -> list[list[int]]:
    """Per token: experts with fewer than k better ones (j beats e: p_j > p_e, or equal
    and j < e), listed best first."""
    out = []
    for row in p.astype(int).tolist():
        chosen = []
        for e in range(len(row)):
            beaters = sum(
                1 for j in range(len(row)) if row[j] > row[e] or (row[j] == row[e] and j < e)
            )
            if beaters < k:
                chosen.append((beaters, e))
        out.append([e for _, e in sorted(chosen)])
    return out


def mt(v, thresholds) -> int:
    return sum(1 for t in thresholds if v >= t)


def ref_expert_row(prm, x: list[int], e: int, g: int) -> tuple[list[int], list[int]]:
    """One (token, expert) row with Python ints / numpy float32 scalars."""
    hid = []
    for o in range(prm["Hd"]):
        acc = sum(int(x[i]) * int(prm["w1"][e][i][o]) for i in range(prm["D"])) + int(
            prm["b1"][e][o]
        )
        thr = prm["thr1"][e][o] if prm["per_ch"] else prm["thr1"][0][0]
        c = mt(acc, [int(t) for t in thr])
        h = np.float32(prm["act_lut"][c]) * np.float32(prm["gate_scale"][g])
        hid.append(mt(h, prm["thr_h"][0]) + prm["act_h"])
    acc2 = [
        sum(hid[i] * int(prm["w2"][e][i][d]) for i in range(prm["Hd"])) for d in range(prm["D"])
    ]
    gb = [g * int(prm["b2"][e][d]) for d in range(prm["D"])]
    return acc2, gb


def ref_token_order(prm, p: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The MoE layer token by token (no reordering): y (T, D) float32."""
    y = np.zeros((prm["T"], prm["D"]), dtype=np.float32)
    for t, experts in enumerate(ref_topk(p, prm["k"])):
        sy, sb = [0] * prm["D"], [0] * prm["D"]
        for e in experts:
            g = int(prm["gate_lut"][int(p[t, e])])
            acc2, gb = ref_expert_row(prm, x[t].astype(int).tolist(), e, g)
            sy = [a + b for a, b in zip(sy, acc2)]
            sb = [a + b for a, b in zip(sb, gb)]
        for d in range(prm["D"]):
            scy = float(prm["scale_y"][d if prm["scale_y"].size > 1 else 0])
            a = np.float32(sy[d] * scy)  # exact double product, rounded once
            if prm["has_bias"]:
                a = a + np.float32(sb[d] * float(prm["scale_b"][0]))
            y[t, d] = a
    return y


def run_engine(prm, p: np.ndarray, x: np.ndarray, folding=None) -> dict:
    from finn.core.onnx_exec import execute_onnx

    import finn_flow.moe_ops  # noqa: F401
    from finn_flow.moe_ops.transform import engine_model

    model = engine_model(prm, folding=folding)
    return execute_onnx(model, {"probabilities": p[None], "tokens": x[None]}, True)


CASES = ["random", "empty_expert", "one_expert", "ties"]


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(5).integers(-128, 128, (T, D)).astype(np.float32)


@pytest.mark.parametrize("case", CASES)
def test_topk_gate_matches_loop_reference(case: str, tokens: np.ndarray) -> None:
    prm = make_prm()
    p = routing_probs(case)
    ctx = run_engine(prm, p, tokens)
    routing = ctx["moe0_routing"].reshape(T, 2 * K).astype(int)
    ref = ref_topk(p, K)
    assert routing[:, :K].tolist() == ref
    gates = [[int(prm["gate_lut"][int(p[t, e])]) for e in ref[t]] for t in range(T)]
    assert routing[:, K:].tolist() == gates
    if case == "ties":
        assert ref[0] == [0, 1] and ref[1] == [1, 2] and ref[2] == [0, 1] and ref[3] == [0, 1]


@pytest.mark.parametrize("case", CASES)
def test_dispatch_groups_rows_by_expert(case: str, tokens: np.ndarray) -> None:
    prm = make_prm()
    p = routing_probs(case)
    ctx = run_engine(prm, p, tokens)
    ref = ref_topk(p, K)
    want = [tokens[t] for e in range(E) for t in range(T) if e in ref[t]]  # queues in order
    rows = ctx["moe0_rows"].reshape(T * K, D)
    np.testing.assert_array_equal(rows, np.stack(want))
    counts = np.bincount([e for r in ref for e in r], minlength=E)
    if case == "empty_expert":
        assert counts[3] == 0
    if case == "one_expert":
        assert counts[1] == T


@pytest.mark.parametrize("per_ch", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_expert_ffn_rows_match_loop_reference(case: str, per_ch: bool, tokens: np.ndarray) -> None:
    prm = make_prm(seed=2, per_ch=per_ch)
    p = routing_probs(case)
    ctx = run_engine(prm, p, tokens)
    ref = ref_topk(p, K)
    pairs = [(e, t) for e in range(E) for t in range(T) if e in ref[t]]
    got = ctx["moe0_yrows"].reshape(T * K, D, 2).astype(np.int64)
    for r, (e, t) in enumerate(pairs):
        g = int(prm["gate_lut"][int(p[t, e])])
        acc2, gb = ref_expert_row(prm, tokens[t].astype(int).tolist(), e, g)
        assert got[r, :, 0].tolist() == acc2, (r, e, t)
        assert got[r, :, 1].tolist() == gb, (r, e, t)


@pytest.mark.parametrize("scale_per_ch", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_engine_equals_token_order_moe(case: str, scale_per_ch: bool, tokens: np.ndarray) -> None:
    """Expert-by-expert with reordering == token by token, bit for bit (float32 out)."""
    prm = make_prm(seed=3, scale_per_ch=scale_per_ch)
    p = routing_probs(case)
    y = run_engine(prm, p, tokens, folding={"ExpertFFN": {"PE": 2, "SIMD": 4}})["moe_out"]
    want = ref_token_order(prm, p, tokens)
    assert y.dtype == np.float32 and y.shape == (1, T, D)
    np.testing.assert_array_equal(y[0].view(np.uint32), want.view(np.uint32))
    assert np.abs(want).max() > 0


def test_no_bias_engine() -> None:
    prm = make_prm(seed=4, bias=False)
    x = np.random.default_rng(6).integers(-128, 128, (T, D)).astype(np.float32)
    p = routing_probs("random")
    y = run_engine(prm, p, x)["moe_out"][0]
    np.testing.assert_array_equal(y, ref_token_order(prm, p, x))


def test_folding_does_not_change_results(tokens: np.ndarray) -> None:
    prm = make_prm(seed=7, per_ch=True)
    p = routing_probs("random")
    a = run_engine(prm, p, tokens, folding={"ExpertFFN": {"PE": 1, "SIMD": 1}})["moe_out"]
    b = run_engine(prm, p, tokens, folding={"ExpertFFN": {"PE": 4, "SIMD": 4},
                                             "ExpertCombine": {"PE": 2}})["moe_out"]  # fmt: skip
    np.testing.assert_array_equal(a, b)


def test_bad_folding_is_refused() -> None:
    from finn_flow.moe_ops.transform import engine_model

    with pytest.raises(ValueError, match="SIMD=3 must divide"):
        engine_model(make_prm(), folding={"ExpertFFN": {"SIMD": 3}})


# ------------------------------------------------------------------ DDR image
def _read_element(image: bytes, axi: int, sec, j: int) -> int:
    word_bytes = axi // 8
    per = axi // sec.bits
    w, slot = divmod(j, per)
    start = sec.offset + w * word_bytes
    word = int.from_bytes(image[start : start + word_bytes], "little")
    v = (word >> (slot * sec.bits)) & ((1 << sec.bits) - 1)
    return v - (1 << sec.bits) if v >> (sec.bits - 1) else v


@pytest.mark.parametrize("per_ch,axi", [(False, 128), (True, 64), (True, 256)])
def test_ddr_image_round_trips(per_ch: bool, axi: int, tmp_path) -> None:
    import json

    from qonnx.custom_op.registry import getCustomOp

    import finn_flow.moe_ops  # noqa: F401
    from finn_flow.moe_ops import write_ddr_image
    from finn_flow.moe_ops.transform import engine_model

    prm = make_prm(seed=8, per_ch=per_ch)
    model = engine_model(prm, axi_bits=axi)
    doc = write_ddr_image(model, tmp_path)
    blob = (tmp_path / "moe_experts.bin").read_bytes()
    assert json.loads((tmp_path / "moe_experts.json").read_text()) == doc
    node = next(n for n in model.graph.node if n.op_type == "ExpertFFN")
    lay = getCustomOp(node).expert_layout()
    assert lay.stride % (axi // 8) == 0 and len(blob) == E * lay.stride
    for s in lay.sections:
        assert s.offset % (axi // 8) == 0
    for e in range(E):
        img = blob[e * lay.stride : (e + 1) * lay.stride]
        sec = {s.name: s for s in lay.sections}
        w1 = [_read_element(img, axi, sec["w1"], j) for j in range(D * HD)]
        assert w1 == prm["w1"][e].T.ravel().tolist()  # output-neuron major
        w2 = [_read_element(img, axi, sec["w2"], j) for j in range(D * HD)]
        assert w2 == prm["w2"][e].T.ravel().tolist()
        assert [_read_element(img, axi, sec["b1"], j) for j in range(HD)] == prm["b1"][e].tolist()
        assert [_read_element(img, axi, sec["b2"], j) for j in range(D)] == prm["b2"][e].tolist()
        if per_ch:
            thr = [_read_element(img, axi, sec["thr1"], j) for j in range(HD * N1)]
            assert thr == prm["thr1"][e].ravel().tolist()
        else:
            assert sec["thr1"].count == 0
    assert doc["nodes"][0]["experts"][1]["offset"] == lay.stride


def test_estimates_and_cycles_are_positive() -> None:
    from qonnx.custom_op.registry import getCustomOp

    import finn_flow.moe_ops  # noqa: F401
    from finn_flow.moe_ops.transform import engine_model

    model = engine_model(make_prm(), folding={"ExpertFFN": {"PE": 2, "SIMD": 2}})
    part = "xczu7ev-ffvc1156-2-e"
    for node in model.graph.node:
        if node.op_type == "DuplicateStreams":
            continue
        inst = getCustomOp(node)
        res = inst.node_res_estimation(part)
        assert res["LUT"] > 0, node.op_type
        assert inst.get_exp_cycles() > 0
        if node.op_type == "ExpertFFN":
            assert res["DSP"] > 0 and res["BRAM_18K"] + res["URAM"] > 0
            # worst case >= any routing's schedule
            for case in CASES:
                ids = ref_topk(routing_probs(case), K)
                routing = np.concatenate([np.array(ids), np.zeros((T, K), int)], 1)[None]
                assert inst.cycles_for(routing)["cycles"] <= inst.get_exp_cycles()


def test_csim_default_inputs_are_the_builds_input_and_verification_images(tmp_path) -> None:
    """Without --inputs, csim.py simulates input.npy and, when the build wrote them, the
    verification images (a stack of N arrays becomes N inputs)."""
    from finn_flow.moe_ops import csim

    np.save(tmp_path / "input.npy", np.zeros((2, 3), np.float32))
    assert csim.default_inputs(tmp_path) == [str(tmp_path / "input.npy")]
    assert len(csim._inputs(tmp_path, [], (2, 3))) == 1
    np.save(tmp_path / "verify_input.npy", np.arange(30, dtype=np.float32).reshape(5, 2, 3))
    assert csim.default_inputs(tmp_path) == [
        str(tmp_path / "input.npy"),
        str(tmp_path / "verify_input.npy"),
    ]
    arrays = csim._inputs(tmp_path, [], (2, 3))
    assert len(arrays) == 6 and np.array_equal(arrays[3], np.arange(12, 18).reshape(2, 3))


def test_bad_inputs_get_clear_errors(tmp_path, capsys) -> None:
    from qonnx.core.modelwrapper import ModelWrapper

    from finn_flow.moe_ops import MoESwapError, csim, replace_moe_standins
    from finn_flow.moe_ops.headers import ap_types_dir
    from finn_flow.moe_ops.step import check_inputs
    from finn_flow.moe_ops.transform import engine_model

    assert (ap_types_dir() / "hls_stream.h").is_file()
    assert csim.main(["--build", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert csim.main(["--build", str(tmp_path)]) == 2
    assert "build.py output folder" in capsys.readouterr().err
    model = engine_model(make_prm())
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(MoESwapError, match=r"shape \(2, 3\), expected"):
        check_inputs(model, str(tmp_path / "x.npy"))
    with pytest.raises(MoESwapError, match="does not exist"):
        check_inputs(model, str(tmp_path / "none.npy"))
    # a graph without a stand-in: nothing to replace, or an error when some are expected
    plain = ModelWrapper(model.model)
    assert replace_moe_standins(plain, [])[1] == []
    with pytest.raises(MoESwapError, match="found 0 MoE stand-in regions, expected 1"):
        replace_moe_standins(plain, [], expected_layers=1)
