// A whole decode step of an MLA model (DeepSeek-V2/V3's architecture) with float, int8 or int4 weights, in one call: each
// selected row's next token in, its logits out, every layer's new latent written into the cache and each row's length
// advanced. What the engine's compiled step does through a graph (nanoseek/model, MLA.absorbed_attention, MoE), here
// as a plain sequence of nanoseek's kernels (float.cpp's, int8.cpp's and int4.cpp's products and experts, mla.cpp's
// attention)
// with the few element-wise operations between them written out, so a step costs no Python, no dispatcher and no
// allocation per operation. On a small model those are most of a step: the shipped model's compiled step took
// ~0.9 ms where its arithmetic and weight reads take ~0.2 (a 2-vCPU Zen3); DeepSeek-V2-Lite in int8 made ~630 kernel
// calls a token, each its own parallel region, and ~25 ms of small operations between them.
//
// The model comes as a table (int64: sizes and the weights' addresses) and its numbers (float64: norms' epsilons and
// scales), written by nanoseek/inference/native.py in the order `read_model` reads them:
//   D V L H dn dr dv c interleaved embed embed_bf16 norm [head] cos sin positions | eps scale
//   per layer: in_norm q_lora ([q_a] q_a_norm [q_b] | [q]) [kv_a] kv_norm w_ukT w_ukT_bf16 [kv_b] [o]
//     post_norm moe; dense: [gate] [up] [down]; MoE: gate bias E K groups topk_groups sigmoid method norm kind, then
//     for float experts (kind 0 fp32, 1 bf16) gate_up down C I, for int8 (kind 2) and int4 (kind 3) ones experts C
//   | in_eps (q_a_eps) kv_eps post_eps (routed_scale)
// where [x] is a product: weight, bias (0: none, else fp32), N, K, kind (the weight's type: 0 fp32, 1 bf16, 2 int8
// codes [N, K] with fp32 scales [N], K a multiple of 32, 3 int4 as int4.cpp holds it, K a multiple of 64), then three
// more addresses (int8: its scales, 0, 0; int4: its scale codes, zero codes and units; float: 0, 0, 0). kv_b is
// kv_b_proj [H * (dn + dv), c], whose value rows are read where they lie; float, its key half is read from w_ukT, the
// key half transposed per head [H, c, dn] (int4: w_ukT 0, the key product mla.cpp's over the codes); cos and sin [positions, dr / 2] fp32 (the rotary table, its attention factor in); the MoE's
// gate [E, D] and bias [E] fp32, its float experts stacked as float.cpp's float_experts reads them (C chunks of width I,
// the shared ones after the E routed ones), or its int8 experts as a table int8.cpp's int8_experts_team reads (int64
// [C, 7], the shared experts one row after the E routed ones), or its int4 ones as int4.cpp's int4_experts_team reads
// (int64 [C, 13]); method 0 greedy, 1 group-limited greedy, 2 noaux_tc.
// Each *_bf16 says whether those weights are bf16 (else fp32).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "kernels.h"

namespace {

struct Mat {
    const void* w;
    const float* bias;
    int64_t N, K, kind;  // 0 fp32, 1 bf16, 2 int8, 3 int4
    const void* scale;   // int8's fp32 scales [N], int4's scale codes [N, K/32]
    const int8_t* zero;  // int4's zero codes [N, K/32]
    const float* units;  // int4's [N, 2]
};

struct Moe {
    const float *gate, *bias;
    int64_t E, K, groups, topk_groups, sigmoid, method, norm, kind;  // kind 0 fp32, 1 bf16 (stacked), 2 int8, 3 int4 (a table)
    const void *gate_up, *down;
    const int64_t* experts;
    int64_t C, I;
    double scale;
};

struct Layer {
    const float* in_norm;
    int64_t q_lora;
    Mat q, q_a, q_b;
    const float* q_a_norm;
    Mat kv_a;
    const float* kv_norm;
    const void* w_ukT;
    int64_t w_ukT_bf16;
    Mat kv_b, o;
    const float* post_norm;
    int64_t moe;
    Mat gate, up, down;
    Moe m;
    double in_eps, q_a_eps, kv_eps, post_eps;
};

struct Model {
    int64_t D, V, L, H, dn, dr, dv, c, interleaved;
    const void* embed;
    int64_t embed_bf16;
    const float* norm;
    Mat head;
    const float *cos, *sin;
    int64_t positions;
    double eps, scale;
    std::vector<Layer> layers;
};

// the table and its numbers read in order; false once either runs out
struct Reader {
    const int64_t* t;
    int64_t n, at = 0;
    const double* f;
    int64_t nf, fat = 0;
    bool ok = true;
    int64_t i() { return at < n ? t[at++] : (ok = false, 0); }
    template <typename P> const P* p() { return (const P*)(intptr_t)i(); }
    double x() { return fat < nf ? f[fat++] : (ok = false, 0.); }
    Mat mat() {
        Mat m;
        m.w = p<void>(), m.bias = p<float>(), m.N = i(), m.K = i(), m.kind = i(), m.scale = p<void>();
        m.zero = p<int8_t>(), m.units = p<float>();
        return m;
    }
};

bool read_model(Reader& r, Model& m) {
    m.D = r.i(), m.V = r.i(), m.L = r.i(), m.H = r.i(), m.dn = r.i(), m.dr = r.i(), m.dv = r.i(), m.c = r.i();
    m.interleaved = r.i(), m.embed = r.p<void>(), m.embed_bf16 = r.i(), m.norm = r.p<float>(), m.head = r.mat();
    m.cos = r.p<float>(), m.sin = r.p<float>(), m.positions = r.i();
    m.eps = r.x(), m.scale = r.x();
    if (!r.ok || m.L < 1 || m.L > 4096) return false;
    m.layers.resize(m.L);
    for (Layer& l : m.layers) {
        l.in_norm = r.p<float>(), l.q_lora = r.i();
        if (l.q_lora)
            l.q_a = r.mat(), l.q_a_norm = r.p<float>(), l.q_b = r.mat();
        else
            l.q = r.mat();
        l.kv_a = r.mat(), l.kv_norm = r.p<float>(), l.w_ukT = r.p<void>(), l.w_ukT_bf16 = r.i(), l.kv_b = r.mat();
        l.o = r.mat(), l.post_norm = r.p<float>(), l.moe = r.i();
        if (l.moe) {
            Moe& e = l.m;
            e.gate = r.p<float>(), e.bias = r.p<float>(), e.E = r.i(), e.K = r.i(), e.groups = r.i();
            e.topk_groups = r.i(), e.sigmoid = r.i(), e.method = r.i(), e.norm = r.i(), e.kind = r.i();
            if (e.kind >= 2)
                e.experts = r.p<int64_t>(), e.C = r.i(), e.I = 0;
            else
                e.gate_up = r.p<void>(), e.down = r.p<void>(), e.C = r.i(), e.I = r.i();
        } else {
            l.gate = r.mat(), l.up = r.mat(), l.down = r.mat();
        }
        l.in_eps = r.x();
        if (l.q_lora) l.q_a_eps = r.x();
        l.kv_eps = r.x(), l.post_eps = r.x();
        if (l.moe) l.m.scale = r.x();
    }
    return r.ok && r.at == r.n && r.fat == r.nf;
}

// whether a product's weight is one the kernels take: float inputs a multiple of the vector width, int8 of 32, int4 of 64
bool mat_ok(const Mat& x, int64_t width) {
    if (x.kind == 3) return x.K % 64 == 0 && x.scale && x.zero && x.units;
    return x.kind >= 0 && x.kind <= 2 && x.K % (x.kind == 2 ? 32 : width) == 0 && (x.kind != 2 || x.scale != nullptr);
}

// the table's columns for a MoE's quantized experts (int8.cpp's and int4.cpp's experts_team): their width last
int64_t expert_columns(int64_t kind) { return kind == 3 ? 13 : 7; }

// whether the kernels take the model's widths (inputs a multiple of the vector width, latents as wide as mla.cpp takes)
bool widths_ok(const Model& m, int isa) {
    const int64_t width = isa == 2 ? 16 : 8;
    bool ok = m.D % width == 0 && m.c % width == 0 && m.dn % width == 0 && m.dr % 2 == 0 && m.c <= 1024 &&
              m.c + m.dr <= 1024 + 128 && m.H >= 1 && m.head.K == m.D && m.head.N == m.V && mat_ok(m.head, width);
    for (const Layer& l : m.layers) {
        const Mat* mats[] = {&l.q, &l.q_a, &l.q_b, &l.kv_a, &l.o, &l.gate, &l.up, &l.down};
        for (const Mat* x : mats) ok = ok && (x->w == nullptr || mat_ok(*x, width));
        ok = ok && l.kv_a.N == m.c + m.dr && l.o.K == m.H * m.dv && l.o.N == m.D && mat_ok(l.kv_b, width) &&
             l.kv_b.N == m.H * (m.dn + m.dv) && l.kv_b.K == m.c && l.kv_b.kind != 2 && (l.kv_b.kind == 3 || l.w_ukT);
        ok = ok && (l.q_lora ? l.q_b.N == m.H * (m.dn + m.dr) : l.q.N == m.H * (m.dn + m.dr));
        if (l.moe) {
            const Moe& e = l.m;
            ok = ok && e.E >= e.K && e.K >= 1 && e.C >= e.E && e.kind >= 0 && e.kind <= 3 &&
                 (e.groups <= 1 || (e.E % e.groups == 0 && e.topk_groups >= 1 && e.topk_groups <= e.groups));
            if (e.kind >= 2) {  // each expert's three quantized layers and its width, a multiple of 32 (int4: 64)
                const int64_t cols = expert_columns(e.kind), multiple = e.kind == 3 ? 64 : 32;
                ok = ok && e.experts != nullptr && m.D % multiple == 0;
                for (int64_t c = 0; ok && c < e.C; c++) {
                    const int64_t* x = e.experts + c * cols;
                    for (int k = 0; k < cols - 1; k++) ok = ok && x[k] != 0;
                    ok = ok && x[cols - 1] > 0 && x[cols - 1] % multiple == 0;
                }
            } else {
                ok = ok && e.I % width == 0;
            }
        } else {
            ok = ok && l.gate.N == l.up.N && l.down.K == l.gate.N && l.down.N == m.D;
        }
    }
    return ok;
}

// One product of a phase: y [B, N] = x [B, K] @ W.T (+ bias)
struct Product {
    const Mat* m;
    const float* x;
    float* y;
};

// a thread's quantized copy of the input its int8 or int4 products read (both kernels quantize activations to int8 per
// block of 32, each in its own layout), made once for the products of a phase that share an input
struct Quantized {
    std::vector<int8_t> codes;  // int8.cpp's
    std::vector<float> scales;
    std::vector<const int8_t*> rows;
    std::vector<const float*> row_scales;
    std::vector<char> acts;  // int4.cpp's records
    std::vector<const char*> acts_rows;
    const float *of = nullptr, *of4 = nullptr;
    int64_t K = 0, K4 = 0;
    Quantized(int64_t B, int64_t K8, int64_t K4)
        : codes(B * K8), scales(B * K8 / 32), rows(B), row_scales(B), acts(B * int4_acts_bytes(K4)), acts_rows(B) {}
    void from(const float* x, int64_t B, int64_t k) {
        if (x == of && k == K) return;
        nanoseek_int8_quantize(x, B, k, codes.data(), scales.data());
        for (int64_t b = 0; b < B; b++) rows[b] = codes.data() + b * k, row_scales[b] = scales.data() + b * k / 32;
        of = x, K = k;
    }
    void from4(const float* x, int64_t B, int64_t k) {
        if (x == of4 && k == K4) return;
        nanoseek_int4_quantize(x, B, k, acts.data());
        for (int64_t b = 0; b < B; b++) acts_rows[b] = acts.data() + b * int4_acts_bytes(k);
        of4 = x, K4 = k;
    }
    void forget() { of = of4 = nullptr; }
};

constexpr int64_t UNIT = 16;  // weight rows a share of a product is made of
constexpr int64_t SPLIT_FROM = 128;  // cached tokens from which a row's latents are shared out between threads

// the phase's products, their rows shared out between the team's threads in units of UNIT (a thread's share may run
// from one product into the next), then a barrier: every product's output is whole after it
void products(const Product* p, int n, int64_t B, int tid, int nt, int isa, Quantized& q) {
    q.forget();  // (the inputs were written since the last phase)
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += (p[i].m->N + UNIT - 1) / UNIT;
    const int64_t u0 = total * tid / nt, u1 = total * (tid + 1) / nt;
    for (int64_t i = 0, base = 0; i < n; base += (p[i].m->N + UNIT - 1) / UNIT, i++) {
        const Mat& m = *p[i].m;
        const int64_t units = (m.N + UNIT - 1) / UNIT, lo = u0 > base ? u0 : base, hi = u1 < base + units ? u1 : base + units;
        if (lo >= hi) continue;
        const int64_t r0 = (lo - base) * UNIT, r1 = (hi - base) * UNIT < m.N ? (hi - base) * UNIT : m.N;
        if (m.kind == 2) {
            q.from(p[i].x, B, m.K);
            nanoseek_int8_linear_part(q.rows.data(), q.row_scales.data(), B, m.K, (const int8_t*)m.w,
                                      (const float*)m.scale, p[i].y, m.N, r0, r1);
        } else if (m.kind == 3) {
            q.from4(p[i].x, B, m.K);
            nanoseek_int4_linear_part(q.acts_rows.data(), B, m.K, (const uint8_t*)m.w, (const uint8_t*)m.scale, m.zero,
                                      m.units, p[i].y, m.N, r0, r1, isa);
        } else {
            nanoseek_float_linear_part(p[i].x, B, m.K, m.w, (int)m.kind, m.N, p[i].y, r0, r1, isa);
        }
        if (m.bias)
            for (int64_t b = 0; b < B; b++)
                for (int64_t r = r0; r < r1; r++) p[i].y[b * m.N + r] += m.bias[r];
    }
#pragma omp barrier
}

// y = x / rms(x) * w over n numbers
void rmsnorm(const float* x, const float* w, int64_t n, double eps, float* y) {
    float s = 0.f;
    for (int64_t k = 0; k < n; k++) s += x[k] * x[k];
    const float inv = 1.f / sqrtf(s / n + (float)eps);
    for (int64_t k = 0; k < n; k++) y[k] = x[k] * inv * w[k];
}

// rotate x [dr] in place by position p's angles: pairs (x[2i], x[2i+1]) when interleaved, else (x[i], x[i + dr/2])
void rope(float* x, const Model& m, int64_t p) {
    const int64_t half = m.dr / 2;
    const float *cs = m.cos + p * half, *sn = m.sin + p * half;
    for (int64_t i = 0; i < half; i++) {
        float* a = m.interleaved ? x + 2 * i : x + i;
        float* b = m.interleaved ? x + 2 * i + 1 : x + i + half;
        const float x1 = *a, x2 = *b;
        *a = x1 * cs[i] - x2 * sn[i];
        *b = x1 * sn[i] + x2 * cs[i];
    }
}

float silu(float a) { return a / (1.f + expf(-a)); }

uint16_t to_bf16(float v) {  // rounded to nearest even, as torch rounds
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__attribute__((target("f16c"))) void store_latent(void* dst, int kind, const float* src, int64_t n) {
    if (kind == 0) {
        memcpy(dst, src, n * sizeof(float));
    } else if (kind == 1) {
        uint16_t* d = (uint16_t*)dst;
        for (int64_t k = 0; k < n; k++) d[k] = _cvtss_sh(src[k], _MM_FROUND_TO_NEAREST_INT);
    } else {
        uint16_t* d = (uint16_t*)dst;
        for (int64_t k = 0; k < n; k++) d[k] = to_bf16(src[k]);
    }
}

// a MoE layer's routing for one token (Gate.forward): logits [E] -> its K experts and their weights
void route(const Moe& e, const float* logits, int64_t* chosen, float* weight) {
    std::vector<float> s(e.E), choice(e.E);
    if (e.sigmoid) {
        for (int64_t i = 0; i < e.E; i++) s[i] = 1.f / (1.f + expf(-logits[i]));
    } else {
        float top = -INFINITY, sum = 0.f;
        for (int64_t i = 0; i < e.E; i++) top = fmaxf(top, logits[i]);
        for (int64_t i = 0; i < e.E; i++) sum += s[i] = expf(logits[i] - top);
        for (int64_t i = 0; i < e.E; i++) s[i] /= sum;
    }
    for (int64_t i = 0; i < e.E; i++) choice[i] = s[i] + (e.method == 2 && e.bias ? e.bias[i] : 0.f);
    if (e.method != 0 && e.groups > 1) {  // only the topk_groups best groups compete
        const int64_t per = e.E / e.groups;
        std::vector<float> score(e.groups);
        for (int64_t g = 0; g < e.groups; g++) {
            float a = -INFINITY, b = -INFINITY;  // the group's largest two
            for (int64_t i = g * per; i < (g + 1) * per; i++) {
                const float v = choice[i];
                if (v > a) b = a, a = v;
                else if (v > b) b = v;
            }
            score[g] = e.method == 2 ? a + b : a;
        }
        std::vector<char> keep(e.groups, 0);
        for (int64_t k = 0; k < e.topk_groups; k++) {
            int64_t best = -1;
            for (int64_t g = 0; g < e.groups; g++)
                if (!keep[g] && (best < 0 || score[g] > score[best])) best = g;
            keep[best] = 1;
        }
        for (int64_t i = 0; i < e.E; i++)
            if (!keep[i / per]) choice[i] = -INFINITY;
    }
    float sum = 0.f;
    std::vector<char> taken(e.E, 0);
    for (int64_t k = 0; k < e.K; k++) {  // the top K, the first of equals first
        int64_t best = -1;
        for (int64_t i = 0; i < e.E; i++)
            if (!taken[i] && (best < 0 || choice[i] > choice[best])) best = i;
        taken[best] = 1;
        chosen[k] = best;
        sum += weight[k] = s[best];
    }
    for (int64_t k = 0; k < e.K; k++) weight[k] = (float)((e.norm ? weight[k] / (sum + 1e-20f) : weight[k]) * e.scale);
}

}  // namespace

// ids [B] the selected rows' last tokens; kv the cache [layers, rows, 1, max_len, c + dr] (kind 0 fp32, 1 fp16,
// 2 bf16), rows first_row.. selected, lengths [rows] each row's cached tokens (its new token goes at that position;
// advanced by one); logits [B, V] out. Returns 0; 1 for a table or arguments it does not take, 2 for a token id out
// of range, 3 for a row whose cache is full.
//
// One parallel region for the whole step. Each product's rows are shared out between the threads (`products`,
// a barrier after each phase); the element-wise work between them (norms, rotations, the residual stream, the
// routing) is small and done by every thread on its own copy, so the products read their inputs from each thread's
// own buffers and only their outputs are shared. A shared output is read after its phase's barrier and written again
// only phases later (the two feed-forward outputs alternate between y1 and y2 for that).
extern "C" int nanoseek_mla_step(const int64_t* table, int64_t n_table, const double* numbers, int64_t n_numbers,
                                 const int64_t* ids, int64_t B, void* kv, int kind, int64_t rows, int64_t max_len,
                                 int64_t first_row, int64_t* lengths, float* logits, int isa) {
    Model m;
    Reader reader{table, n_table, 0, numbers, n_numbers};
    if (!read_model(reader, m) || !widths_ok(m, isa) || B < 1 || first_row < 0 || first_row + B > rows || kind < 0 ||
        kind > 2)
        return 1;
    const int64_t D = m.D, H = m.H, dn = m.dn, dr = m.dr, dv = m.dv, c = m.c, w = c + dr, qw = dn + dr;
    int64_t* len = lengths + first_row;
    int64_t T = 0;  // the longest row's past
    for (int64_t b = 0; b < B; b++) {
        if (ids[b] < 0 || ids[b] >= m.V) return 2;
        if (len[b] < 0 || len[b] >= max_len || len[b] >= m.positions) return 3;
        T = len[b] > T ? len[b] : T;
    }
    // the buffers' sizes: the widest of each across the layers (K8 and K4 an int8 and int4 product's input, I8 and I4 an
    // int8 and int4 expert's width)
    int64_t qa_n = 0, I = 0, J = 0, E = 0, C = 0, moe_I = 0, K8 = 0, K4 = 0, I8 = 0, I4 = 0;
    for (const Layer& l : m.layers) {
        qa_n = l.q_lora && l.q_a.N > qa_n ? l.q_a.N : qa_n;
        I = !l.moe && l.gate.N > I ? l.gate.N : I;
        const Mat* mats[] = {&m.head, &l.q, &l.q_a, &l.q_b, &l.kv_a, &l.kv_b, &l.o, &l.gate, &l.up, &l.down};
        for (const Mat* x : mats) {
            K8 = x->w && x->kind == 2 && x->K > K8 ? x->K : K8;
            K4 = x->w && x->kind == 3 && x->K > K4 ? x->K : K4;
        }
        if (l.moe) {
            const Moe& e = l.m;
            J = e.K + e.C - e.E > J ? e.K + e.C - e.E : J;
            E = e.E > E ? e.E : E, C = e.C > C ? e.C : C, moe_I = e.I > moe_I ? e.I : moe_I;
            const int64_t cols = expert_columns(e.kind);
            for (int64_t k = 0; e.kind >= 2 && k < e.C; k++) {
                int64_t& widest = e.kind == 3 ? I4 : I8;
                widest = e.experts[k * cols + cols - 1] > widest ? e.experts[k * cols + cols - 1] : widest;
            }
        }
    }
    const size_t item = kind == 0 ? 4 : 2;
    // the shared outputs
    std::vector<float> q(B * H * qw), qa(B * qa_n), latent(B * w), keys(H * B * c), lat(B * H * c), values(H * B * dv);
    std::vector<float> y1(B * D), y2(B * D), mid(2 * B * I), hidden(B * J * moe_I), hidden_d(B * J * I8 / 32);
    std::vector<int8_t> hidden_q(B * J * I8);
    std::vector<char> hidden4(B * J * int4_acts_bytes(I4));
    std::vector<uint8_t> mask(B * (T + 1));
    // the attention's tasks: a batch row's heads, 8 at a time; where those are fewer than the threads, a long context's
    // latents are shared out in parts (`splits`, merged after: each latent read by one thread, for all of a row's heads),
    // a short one's heads (each thread reading every latent for its heads)
    const int64_t head_tasks = B * ((H + 7) / 8), threads = omp_get_max_threads();
    const int64_t splits = T >= SPLIT_FROM && head_tasks < threads ? (threads + head_tasks - 1) / head_tasks : 1;
    std::vector<float> parts(splits > 1 ? head_tasks * splits * 8 * (c + 2) : 0);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t <= T; t++) mask[b * (T + 1) + t] = t < len[b] || t == T;
#pragma omp parallel
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        // this thread's own: the residual stream, normed inputs, each head's rows, the routing
        std::vector<float> x(B * D), h(B * D), qn(B * qa_n), fresh(B * w), q_heads(H * B * dn), ql(B * H * w);
        std::vector<float> l_heads(H * B * c), o_in(B * H * dv), act(B * I), scores(B * E), weight(B * J), ks(E);
        std::vector<int64_t> chunk(B * J), chosen(E), plan(3 * C + 1 + B * J);
        Quantized quantized(B, K8, K4);  // quantized products' inputs
        std::vector<int8_t> xq(I8 ? B * D : 0);  // quantized experts': the normed input quantized, pointers to rows
        std::vector<float> xd(I8 ? B * D / 32 : 0);
        std::vector<char> xq4(I4 ? B * int4_acts_bytes(D) : 0);
        std::vector<const void*> slots(16);
        std::vector<Product> heads(H);
        std::vector<Mat> head_mats(H);
        // query rows per attention task (see splits): enough tasks for every thread
        const int64_t spread = (nt + B - 1) / B, R = splits > 1 || head_tasks >= nt ? 8 : (H + spread - 1) / spread;
        for (int64_t b = 0; b < B; b++) {  // the embeddings
            if (m.embed_bf16) {
                const uint16_t* e = (const uint16_t*)m.embed + ids[b] * D;
                for (int64_t k = 0; k < D; k++) {
                    const uint32_t u = (uint32_t)e[k] << 16;
                    memcpy(&x[b * D + k], &u, 4);
                }
            } else {
                memcpy(&x[b * D], (const float*)m.embed + ids[b] * D, D * sizeof(float));
            }
        }
        for (int64_t li = 0; li < m.L; li++) {
            const Layer& l = m.layers[li];
            for (int64_t b = 0; b < B; b++) rmsnorm(&x[b * D], l.in_norm, D, l.in_eps, &h[b * D]);
            // the queries [B, H, dn + dr] (through q_a_proj, its norm and q_b_proj with q_lora) and the new latents
            if (l.q_lora) {
                const Product a[] = {{&l.q_a, h.data(), qa.data()}, {&l.kv_a, h.data(), latent.data()}};
                products(a, 2, B, tid, nt, isa, quantized);
                const int64_t r = l.q_a.N;
                for (int64_t b = 0; b < B; b++) rmsnorm(&qa[b * r], l.q_a_norm, r, l.q_a_eps, &qn[b * r]);
                const Product qb[] = {{&l.q_b, qn.data(), q.data()}};
                products(qb, 1, B, tid, nt, isa, quantized);
            } else {
                const Product a[] = {{&l.q, h.data(), q.data()}, {&l.kv_a, h.data(), latent.data()}};
                products(a, 2, B, tid, nt, isa, quantized);
            }
            // the new latents [B, c + dr]: c_kv normed, k_pe rotated
            for (int64_t b = 0; b < B; b++) {
                float* f = &fresh[b * w];
                rmsnorm(&latent[b * w], l.kv_norm, c, l.kv_eps, f);
                memcpy(f + c, &latent[b * w + c], dr * sizeof(float));
                rope(f + c, m, len[b]);
            }
            // each head's query into the latent space (kv_b_proj's key half), its rotary part beside it: ql [B, H, c + dr]
            const Mat& kv_b = l.kv_b;
            for (int64_t hd = 0; hd < H; hd++)
                for (int64_t b = 0; b < B; b++) memcpy(&q_heads[(hd * B + b) * dn], &q[(b * H + hd) * qw], dn * sizeof(float));
            if (kv_b.kind == 3) {  // (its heads shared out, a barrier at the end)
                nanoseek_mla_key_int4_team(q_heads.data(), B * dn, dn, (const uint8_t*)kv_b.w, (const uint8_t*)kv_b.scale,
                                           kv_b.zero, kv_b.units, keys.data(), B * c, c, H, B, dn, dv, c, isa);
            } else {
                for (int64_t hd = 0; hd < H; hd++) {
                    head_mats[hd] = {(const char*)l.w_ukT + hd * c * dn * (l.w_ukT_bf16 ? 2 : 4), nullptr, c, dn, l.w_ukT_bf16};
                    heads[hd] = {&head_mats[hd], &q_heads[hd * B * dn], &keys[hd * B * c]};
                }
                products(heads.data(), (int)H, B, tid, nt, isa, quantized);
            }
            for (int64_t b = 0; b < B; b++)
                for (int64_t hd = 0; hd < H; hd++) {
                    float* row = &ql[(b * H + hd) * w];
                    memcpy(row, &keys[(hd * B + b) * c], c * sizeof(float));
                    memcpy(row + c, &q[(b * H + hd) * qw + dn], dr * sizeof(float));
                    rope(row + c, m, len[b]);
                }
            // the attention over each row's cached latents and its new one (its tasks shared out, a barrier at the end)
            const size_t layer_at = (size_t)li * rows * max_len * w;
            const LatentAttention a{ql.data(), H * w, w, (const char*)kv + (layer_at + first_row * max_len * w) * item,
                                    max_len * w, w, 0, kind, fresh.data(), w, w, 0, mask.data(), 1, B, 1, H, T, c, w,
                                    (float)m.scale, lat.data(), H * c, c, splits, parts.data()};
            nanoseek_latent_attention_team(&a, R, isa);
            if (tid == 0)  // (the cache is not read again this step: the others go on)
                for (int64_t b = 0; b < B; b++)
                    store_latent((char*)kv + (layer_at + ((first_row + b) * max_len + len[b]) * w) * item, kind,
                                 &fresh[b * w], w);
            // each head's values from its latent output (kv_b_proj's value rows, read where they lie); then o_proj
            for (int64_t hd = 0; hd < H; hd++) {
                for (int64_t b = 0; b < B; b++) memcpy(&l_heads[(hd * B + b) * c], &lat[(b * H + hd) * c], c * sizeof(float));
                const int64_t row = hd * (dn + dv) + dn;  // the head's first value row
                if (kv_b.kind == 3)
                    head_mats[hd] = {(const uint8_t*)kv_b.w + row * c / 2, nullptr, dv, c, 3,
                                     (const uint8_t*)kv_b.scale + row * c / 32, kv_b.zero + row * c / 32, kv_b.units + 2 * row};
                else
                    head_mats[hd] = {(const char*)kv_b.w + row * c * (kv_b.kind ? 2 : 4), nullptr, dv, c, kv_b.kind};
                heads[hd] = {&head_mats[hd], &l_heads[hd * B * c], &values[hd * B * dv]};
            }
            products(heads.data(), (int)H, B, tid, nt, isa, quantized);
            for (int64_t b = 0; b < B; b++)
                for (int64_t hd = 0; hd < H; hd++)
                    memcpy(&o_in[(b * H + hd) * dv], &values[(hd * B + b) * dv], dv * sizeof(float));
            const Product o[] = {{&l.o, o_in.data(), y1.data()}};
            products(o, 1, B, tid, nt, isa, quantized);
            for (int64_t k = 0; k < B * D; k++) x[k] += y1[k];
            // the feed-forward: a dense SwiGLU or the experts
            for (int64_t b = 0; b < B; b++) rmsnorm(&x[b * D], l.post_norm, D, l.post_eps, &h[b * D]);
            if (l.moe) {
                const Moe& e = l.m;
                const int64_t Jl = e.K + e.C - e.E;
                nanoseek_float_linear_part(h.data(), B, D, e.gate, 0, e.E, scores.data(), 0, e.E, isa);
                for (int64_t b = 0; b < B; b++) {
                    route(e, &scores[b * e.E], chosen.data(), ks.data());
                    for (int64_t j = 0; j < Jl; j++) {
                        chunk[b * Jl + j] = j < e.K ? chosen[j] : e.E + j - e.K;
                        weight[b * Jl + j] = j < e.K ? ks[j] : 1.f;
                    }
                }
                if (e.kind == 3)
                    nanoseek_int4_experts_team(h.data(), B, D, chunk.data(), weight.data(), Jl, e.experts, e.C, I4,
                                               y2.data(), hidden4.data(), xq4.data(), plan.data(),
                                               (const char**)slots.data(), isa);
                else if (e.kind == 2)
                    nanoseek_int8_experts_team(h.data(), B, D, chunk.data(), weight.data(), Jl, e.experts, e.C, I8,
                                               y2.data(), hidden_q.data(), hidden_d.data(), xq.data(), xd.data(),
                                               plan.data(), slots.data());
                else
                    nanoseek_float_experts_team(h.data(), B, D, chunk.data(), weight.data(), Jl, e.gate_up, e.down,
                                                (int)e.kind, e.C, e.I, y2.data(), hidden.data(), plan.data(), isa);
            } else {
                const int64_t In = l.gate.N;
                const Product gu[] = {{&l.gate, h.data(), mid.data()}, {&l.up, h.data(), mid.data() + B * In}};
                products(gu, 2, B, tid, nt, isa, quantized);
                for (int64_t k = 0; k < B * In; k++) act[k] = silu(mid[k]) * mid[B * In + k];
                const Product down[] = {{&l.down, act.data(), y2.data()}};
                products(down, 1, B, tid, nt, isa, quantized);
            }
            for (int64_t k = 0; k < B * D; k++) x[k] += y2[k];
        }
        for (int64_t b = 0; b < B; b++) rmsnorm(&x[b * D], m.norm, D, m.eps, &h[b * D]);
        const Product head[] = {{&m.head, h.data(), logits}};
        products(head, 1, B, tid, nt, isa, quantized);
    }
    for (int64_t b = 0; b < B; b++) len[b]++;
    return 0;
}
