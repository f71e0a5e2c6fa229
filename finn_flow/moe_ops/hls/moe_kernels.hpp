// Kernels of the reordered expert-by-expert MoE engine (finn_flow/moe_ops).
//
// Written against ap_int.h and hls_stream.h only (no finn-hlslib), so that g++ can compile
// and run them with the open-source headers (C-simulation, finn_flow/moe_ops/csim.py).
// Each kernel takes a configuration struct `C` (static const members) that the generated
// top file defines per node. Stream words pack elements little end first: element i of a
// word occupies bits [i*W, (i+1)*W). The routing stream carries one token per beat:
// k expert ids then k gate codes, RB bits each.
//
// MOE_EVENT(kind, expert) counts loop trips (one per modelled clock cycle) when the
// testbench defines MOE_CSIM_EVENTS; in synthesis it expands to nothing. The counts are
// compared with the Python cycle model (finn_flow/moe_ops/schedule.py).
//
// What is and is not shown here: the loops are written in the order the hardware runs
// them and with the memories it needs (two expert buffers, token/accumulator buffers);
// the concurrency of the expert-weight DMA with the MAC array (the ping/pong of the two
// buffers) is expressed by the order "load expert i+1, then compute expert i" and by
// the cycle model, not by HLS dataflow pragmas: no HLS synthesis was run.
#ifndef MOE_KERNELS_HPP
#define MOE_KERNELS_HPP

#include <ap_int.h>
#include <hls_stream.h>
#include <stdint.h>
#include <string.h>

#ifdef MOE_CSIM_EVENTS
void moe_event(const char *kind, int expert);
#define MOE_EVENT(kind, expert) moe_event(kind, expert)
#else
#define MOE_EVENT(kind, expert)
#endif

// element i (W bits) of a packed word, sign- or zero-extended into W+1 bits
template <int W, bool SIGNED, int N>
inline ap_int<W + 1> moe_get(const ap_uint<N> &word, int i) {
    ap_uint<W> raw = word.range(i * W + W - 1, i * W);
    ap_int<W + 1> v;
    if (SIGNED) {
        ap_int<W> s = raw;
        v = s;
    } else {
        v = raw;
    }
    return v;
}

template <int W, int N, typename V>
inline void moe_put(ap_uint<N> &word, int i, V v) {
    ap_uint<W> raw = (ap_uint<W>)v;
    word.range(i * W + W - 1, i * W) = raw;
}

inline float moe_f32(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

inline uint32_t moe_f32_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof(bits));
    return bits;
}

// number of entries of the sorted (non-decreasing) table thr[0..n) that are <= v:
// the MultiThreshold count, by binary search (log2(n) comparisons)
template <typename TV, typename TT>
inline int moe_count_le(TV v, const TT *thr, int n) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (v >= thr[mid]) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// Read the routing (T beats), count rows per expert and place the T*K (token, gate)
// pairs in expert order (ascending expert, then token): the counting sort every op that
// needs the row order repeats. row_token / row_gate: [T*K]; count: [E].
template <int T, int E, int K, int RB>
void moe_route(hls::stream<ap_uint<2 * K * RB> > &route, int *row_token, int *row_gate,
               int *count) {
    static int ids[T][K];
    static int gates[T][K];
    for (int e = 0; e < E; e++) count[e] = 0;
    for (int t = 0; t < T; t++) {
        MOE_EVENT("route", -1);
        ap_uint<2 * K * RB> w = route.read();
        for (int j = 0; j < K; j++) {
            ids[t][j] = (int)moe_get<RB, false>(w, j);
            gates[t][j] = (int)moe_get<RB, false>(w, K + j);
            count[ids[t][j]]++;
        }
    }
    int start[E];
    int acc = 0;
    for (int e = 0; e < E; e++) {
        MOE_EVENT("prefix", -1);
        start[e] = acc;
        acc += count[e];
    }
    for (int t = 0; t < T; t++) {
        for (int j = 0; j < K; j++) {
            MOE_EVENT("place", -1);
            int r = start[ids[t][j]]++;
            row_token[r] = t;
            row_gate[r] = gates[t][j];
        }
    }
}

// ---------------------------------------------------------------------------- TopKGate
// probabilities (T x E codes, PE per beat) -> routing: the K largest codes per token,
// descending, ties to the lower expert id; gate code = gate_lut[probability code].
template <class C>
void moe_topk_gate(hls::stream<ap_uint<C::PE * C::PB> > &in,
                   hls::stream<ap_uint<2 * C::K * C::RB> > &out, const int *gate_lut) {
    for (int t = 0; t < C::T; t++) {
        int bp[C::K], bi[C::K];
        bool used[C::K];
        for (int j = 0; j < C::K; j++) used[j] = false;
        for (int b = 0; b < C::E / C::PE; b++) {
            MOE_EVENT("beat", -1);
            ap_uint<C::PE * C::PB> w = in.read();
            for (int p = 0; p < C::PE; p++) {
                int e = b * C::PE + p;
                int v = (int)moe_get<C::PB, false>(w, p);
                int pos = C::K;
                for (int j = C::K - 1; j >= 0; j--) {  // insertion network
                    if (!used[j] || v > bp[j]) pos = j;
                }
                if (pos < C::K) {
                    for (int j = C::K - 1; j > pos; j--) {
                        bp[j] = bp[j - 1];
                        bi[j] = bi[j - 1];
                        used[j] = used[j - 1];
                    }
                    bp[pos] = v;
                    bi[pos] = e;
                    used[pos] = true;
                }
            }
        }
        ap_uint<2 * C::K * C::RB> o = 0;
        for (int j = 0; j < C::K; j++) {
            moe_put<C::RB>(o, j, bi[j]);
            moe_put<C::RB>(o, C::K + j, gate_lut[bp[j]]);
        }
        out.write(o);
    }
}

// ---------------------------------------------------------------------------- ExpertDispatch
// tokens (T x D, SIMD per beat) + routing -> the T*K rows in expert order
template <class C>
void moe_dispatch(hls::stream<ap_uint<C::SIMD * C::XB> > &x,
                  hls::stream<ap_uint<2 * C::K * C::RB> > &route,
                  hls::stream<ap_uint<C::SIMD * C::XB> > &out) {
    static ap_uint<C::SIMD * C::XB> tok[C::T][C::D / C::SIMD];
    static int row_token[C::T * C::K];
    static int ids[C::T][C::K];
    int count[C::E];
    for (int e = 0; e < C::E; e++) count[e] = 0;
    for (int t = 0; t < C::T; t++) {
        MOE_EVENT("route", -1);
        ap_uint<2 * C::K * C::RB> w = route.read();
        for (int j = 0; j < C::K; j++) {
            ids[t][j] = (int)moe_get<C::RB, false>(w, j);
            count[ids[t][j]]++;
        }
        for (int s = 0; s < C::D / C::SIMD; s++) {
            MOE_EVENT("token", -1);
            tok[t][s] = x.read();
        }
    }
    int start[C::E];
    int acc = 0;
    for (int e = 0; e < C::E; e++) {
        MOE_EVENT("prefix", -1);
        start[e] = acc;
        acc += count[e];
    }
    for (int t = 0; t < C::T; t++) {
        for (int j = 0; j < C::K; j++) {
            MOE_EVENT("place", -1);
            row_token[start[ids[t][j]]++] = t;
        }
    }
    for (int r = 0; r < C::T * C::K; r++) {
        for (int s = 0; s < C::D / C::SIMD; s++) {
            MOE_EVENT("row", -1);
            out.write(tok[row_token[r]][s]);
        }
    }
}

// ---------------------------------------------------------------------------- ExpertFFN
// One expert's on-chip copy (one of the two ping/pong buffers).
template <class C>
struct MoeExpertBuf {
    ap_int<C::WB + 1> w1[C::HD][C::D];
    ap_int<C::B1B + 1> b1[C::HD];
    ap_int<C::TB + 1> thr1[C::THR_PER_CH ? C::HD : 1][C::N1 > 0 ? C::N1 : 1];
    ap_int<C::WB + 1> w2[C::D][C::HD];
    ap_int<C::B2B + 1> b2[C::D];
};

// Move expert e's image (C::STRIDE AXI beats) from DDR into buf: one beat per cycle.
template <class C>
void moe_load_expert(const ap_uint<C::AXI> *ddr, int e, MoeExpertBuf<C> &buf) {
    const int base = C::BASE + e * C::STRIDE;
    for (int beat = 0; beat < C::STRIDE; beat++) {
        MOE_EVENT("load", e);
        ap_uint<C::AXI> w = ddr[base + beat];
        if (beat >= C::W1_OFF && beat < C::W1_OFF + C::W1_WORDS) {
            for (int j = 0; j < C::AXI / C::WB; j++) {
                int idx = (beat - C::W1_OFF) * (C::AXI / C::WB) + j;
                if (idx < C::HD * C::D) buf.w1[idx / C::D][idx % C::D] = moe_get<C::WB, true>(w, j);
            }
        }
        if (beat >= C::B1_OFF && beat < C::B1_OFF + C::B1_WORDS) {
            for (int j = 0; j < C::AXI / C::B1B; j++) {
                int idx = (beat - C::B1_OFF) * (C::AXI / C::B1B) + j;
                if (idx < C::HD) buf.b1[idx] = moe_get<C::B1B, true>(w, j);
            }
        }
        if (C::THR_PER_CH && beat >= C::THR_OFF && beat < C::THR_OFF + C::THR_WORDS) {
            for (int j = 0; j < C::AXI / C::TB; j++) {
                int idx = (beat - C::THR_OFF) * (C::AXI / C::TB) + j;
                if (idx < C::HD * C::N1) buf.thr1[idx / C::N1][idx % C::N1] = moe_get<C::TB, true>(w, j);
            }
        }
        if (beat >= C::W2_OFF && beat < C::W2_OFF + C::W2_WORDS) {
            for (int j = 0; j < C::AXI / C::WB; j++) {
                int idx = (beat - C::W2_OFF) * (C::AXI / C::WB) + j;
                if (idx < C::D * C::HD) buf.w2[idx / C::HD][idx % C::HD] = moe_get<C::WB, true>(w, j);
            }
        }
        if (beat >= C::B2_OFF && beat < C::B2_OFF + C::B2_WORDS) {
            for (int j = 0; j < C::AXI / C::B2B; j++) {
                int idx = (beat - C::B2_OFF) * (C::AXI / C::B2B) + j;
                if (idx < C::D) buf.b2[idx] = moe_get<C::B2B, true>(w, j);
            }
        }
    }
}

// Run expert e's n rows (gates row_gate[0..n)) through fc1 -> activation -> gate ->
// hidden quantizer -> fc2 on one PE x SIMD MAC array; one row of output per input row:
// D pairs (fc2 accumulator, gate * b2).
template <class C>
void moe_compute_expert(hls::stream<ap_uint<C::SIMD * C::XB> > &rows,
                        hls::stream<ap_uint<C::PE * 2 * C::AB> > &out, int e,
                        const MoeExpertBuf<C> &buf, int n, const int *row_gate,
                        const uint32_t *act_lut, const uint32_t *gate_lut,
                        const ap_int<C::TB + 1> *thr1_shared, const uint32_t *thr_h) {
    float thr_hf[C::NH > 0 ? C::NH : 1];
    for (int i = 0; i < C::NH; i++) thr_hf[i] = moe_f32(thr_h[i]);
    for (int r = 0; r < n; r++) {
        const int g = row_gate[r];
        const float gf = moe_f32(gate_lut[g]);
        ap_int<C::XB + 1> x[C::D];
        ap_int<C::HB + 1> hid[C::HD];
        for (int nf = 0; nf < C::HD / C::PE; nf++) {
            ap_int<C::ACC1B> acc[C::PE];
            for (int p = 0; p < C::PE; p++) acc[p] = 0;
            for (int sf = 0; sf < C::D / C::SIMD; sf++) {
                MOE_EVENT("compute", e);
                if (nf == 0) {
                    ap_uint<C::SIMD * C::XB> w = rows.read();
                    for (int s = 0; s < C::SIMD; s++) x[sf * C::SIMD + s] = moe_get<C::XB, C::XSIGNED>(w, s);
                }
                for (int p = 0; p < C::PE; p++)
                    for (int s = 0; s < C::SIMD; s++)
                        acc[p] += x[sf * C::SIMD + s] * buf.w1[nf * C::PE + p][sf * C::SIMD + s];
            }
            for (int p = 0; p < C::PE; p++) {
                const int o = nf * C::PE + p;
                ap_int<C::ACC1B> v = acc[p] + buf.b1[o];
                const ap_int<C::TB + 1> *thr = C::THR_PER_CH ? buf.thr1[o] : thr1_shared;
                int c1 = moe_count_le(v, thr, C::N1);  // pre-activation code - ActVal1
                float h = moe_f32(act_lut[c1]) * gf;   // activation value x gate (float32)
                hid[o] = moe_count_le(h, thr_hf, C::NH) + C::ACTH;
            }
        }
        for (int nf = 0; nf < C::D / C::PE; nf++) {
            ap_int<C::AB> acc2[C::PE];
            for (int p = 0; p < C::PE; p++) acc2[p] = 0;
            for (int sf = 0; sf < C::HD / C::SIMD; sf++) {
                MOE_EVENT("compute", e);
                for (int p = 0; p < C::PE; p++)
                    for (int s = 0; s < C::SIMD; s++)
                        acc2[p] += hid[sf * C::SIMD + s] * buf.w2[nf * C::PE + p][sf * C::SIMD + s];
            }
            ap_uint<C::PE * 2 * C::AB> o = 0;
            for (int p = 0; p < C::PE; p++) {
                ap_int<C::AB> gb = g * buf.b2[nf * C::PE + p];
                moe_put<C::AB>(o, 2 * p, acc2[p]);
                moe_put<C::AB>(o, 2 * p + 1, gb);
            }
            out.write(o);
        }
    }
}

// The expert-by-expert schedule: non-empty experts only, ascending id; expert i+1's
// weights are loaded into the other buffer before expert i computes (ping/pong).
template <class C>
void moe_expert_ffn(hls::stream<ap_uint<C::SIMD * C::XB> > &rows,
                    hls::stream<ap_uint<2 * C::K * C::RB> > &route,
                    hls::stream<ap_uint<C::PE * 2 * C::AB> > &out, const ap_uint<C::AXI> *ddr,
                    const uint32_t *act_lut, const uint32_t *gate_lut,
                    const ap_int<C::TB + 1> *thr1_shared, const uint32_t *thr_h) {
    static int row_token[C::T * C::K];
    static int row_gate[C::T * C::K];
    static MoeExpertBuf<C> buf[2];
    int count[C::E];
    moe_route<C::T, C::E, C::K, C::RB>(route, row_token, row_gate, count);
    int ne[C::E];
    int m = 0;
    for (int e = 0; e < C::E; e++)
        if (count[e] > 0) ne[m++] = e;
    if (m > 0) moe_load_expert<C>(ddr, ne[0], buf[0]);
    int row = 0;
    for (int i = 0; i < m; i++) {
        if (i + 1 < m) moe_load_expert<C>(ddr, ne[i + 1], buf[(i + 1) % 2]);
        moe_compute_expert<C>(rows, out, ne[i], buf[i % 2], count[ne[i]], row_gate + row, act_lut,
                              gate_lut, thr1_shared, thr_h);
        row += count[ne[i]];
    }
}

// ---------------------------------------------------------------------------- ExpertCombine
// rows in expert order (D pairs each, PE pairs per beat) -> per-token sums (scatter-add
// into a T x D accumulator buffer) -> y = sum_fc2 * scale_y + sum_bias * scale_b (float32)
template <class C>
void moe_combine(hls::stream<ap_uint<C::PE * 2 * C::AB> > &in,
                 hls::stream<ap_uint<2 * C::K * C::RB> > &route,
                 hls::stream<ap_uint<C::PE * 32> > &out, const uint32_t *scale_y,
                 const uint32_t *scale_b) {
    static int row_token[C::T * C::K];
    static int row_gate[C::T * C::K];
    static ap_int<C::SB> acc[C::T][C::D][2];  // cleared as it is read out
    int count[C::E];
    moe_route<C::T, C::E, C::K, C::RB>(route, row_token, row_gate, count);
    for (int r = 0; r < C::T * C::K; r++) {
        const int t = row_token[r];
        for (int b = 0; b < C::D / C::PE; b++) {
            MOE_EVENT("acc", -1);
            ap_uint<C::PE * 2 * C::AB> w = in.read();
            for (int p = 0; p < C::PE; p++) {
                acc[t][b * C::PE + p][0] += moe_get<C::AB, true>(w, 2 * p);
                acc[t][b * C::PE + p][1] += moe_get<C::AB, true>(w, 2 * p + 1);
            }
        }
    }
    for (int t = 0; t < C::T; t++) {
        for (int b = 0; b < C::D / C::PE; b++) {
            MOE_EVENT("out", -1);
            ap_uint<C::PE * 32> o = 0;
            for (int p = 0; p < C::PE; p++) {
                const int d = b * C::PE + p;
                // |sums| < 2^24 (checked when the op is built): exact in float32, so the
                // float32 products equal the float64 product rounded once
                float y = (float)acc[t][d][0].to_int64() * moe_f32(scale_y[C::SY == 1 ? 0 : d]);
                if (C::HAS_BIAS)
                    y = y + (float)acc[t][d][1].to_int64() * moe_f32(scale_b[C::SBN == 1 ? 0 : d]);
                acc[t][d][0] = 0;
                acc[t][d][1] = 0;
                moe_put<32>(o, p, moe_f32_bits(y));
            }
            out.write(o);
        }
    }
}

#endif  // MOE_KERNELS_HPP
