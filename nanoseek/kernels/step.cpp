// A whole decode step of a small MLA model (DeepSeek-V2/V3's architecture) with float weights, in one call: each
// selected row's next token in, its logits out, every layer's new latent written into the cache and each row's length
// advanced. What the engine's compiled step does through a graph (nanoseek/model, MLA.absorbed_attention, MoE), here
// as a plain sequence of nanoseek's kernels (float.cpp's products and experts, mla.cpp's attention over the latents)
// with the few element-wise operations between them written out, so a step costs no Python, no dispatcher and no
// allocation per operation. On a small model those are most of a step: the shipped model's compiled step took
// ~0.9 ms where its arithmetic and weight reads take ~0.2 (a 2-vCPU Zen3).
//
// The model comes as a table (int64: sizes and the weights' addresses) and its numbers (float64: norms' epsilons and
// scales), written by nanoseek/inference/native.py in the order `read_model` reads them:
//   D V L H dn dr dv c interleaved embed embed_bf16 norm [head] cos sin positions | eps scale
//   per layer: in_norm q_lora ([q_a] q_a_norm [q_b] | [q]) [kv_a] kv_norm w_ukT kv_b kv_b_bf16 [o] post_norm moe
//     dense: [gate] [up] [down]; MoE: gate bias E K groups topk_groups sigmoid method norm gate_up down C I
//   | in_eps (q_a_eps) kv_eps post_eps (routed_scale)
// where [x] is a product: weight, bias (0: none, else fp32), N, K, bf16 (the weight's type: 0 fp32, 1 bf16). w_ukT is
// kv_b_proj's key half transposed per head, fp32 [H, c, dn]; kv_b is kv_b_proj's weight [H * (dn + dv), c], whose value
// rows are read where they lie; cos and sin [positions, dr / 2] fp32 (the rotary table, its attention factor in);
// the MoE's gate [E, D] and bias [E] fp32, its experts stacked as float.cpp's float_experts reads them (C chunks of
// width I, the shared ones after the E routed ones); method 0 greedy, 1 group-limited greedy, 2 noaux_tc.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "kernels.h"

namespace {

struct Mat {
    const void* w;
    const float* bias;
    int64_t N, K, bf16;
};

struct Moe {
    const float *gate, *bias;
    int64_t E, K, groups, topk_groups, sigmoid, method, norm;
    const float *gate_up, *down;
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
    const float* w_ukT;
    const void* kv_b;
    int64_t kv_b_bf16;
    Mat o;
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
        m.w = p<void>(), m.bias = p<float>(), m.N = i(), m.K = i(), m.bf16 = i();
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
        l.kv_a = r.mat(), l.kv_norm = r.p<float>(), l.w_ukT = r.p<float>(), l.kv_b = r.p<void>(), l.kv_b_bf16 = r.i();
        l.o = r.mat(), l.post_norm = r.p<float>(), l.moe = r.i();
        if (l.moe) {
            Moe& e = l.m;
            e.gate = r.p<float>(), e.bias = r.p<float>(), e.E = r.i(), e.K = r.i(), e.groups = r.i();
            e.topk_groups = r.i(), e.sigmoid = r.i(), e.method = r.i(), e.norm = r.i(), e.gate_up = r.p<float>();
            e.down = r.p<float>(), e.C = r.i(), e.I = r.i();
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

// y [M, N] = x [M, K] @ W.T (+ bias)
int linear(const Mat& m, const float* x, int64_t M, float* y, int isa) {
    const int code = nanoseek_float_linear(x, M, m.K, m.w, (int)m.bf16, m.N, y, isa);
    if (m.bias)
        for (int64_t r = 0; r < M; r++)
            for (int64_t n = 0; n < m.N; n++) y[r * m.N + n] += m.bias[n];
    return code;
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
// of range, 3 for a row whose cache is full, or a kernel's own code + 10.
extern "C" int nanoseek_mla_step(const int64_t* table, int64_t n_table, const double* numbers, int64_t n_numbers,
                                 const int64_t* ids, int64_t B, void* kv, int kind, int64_t rows, int64_t max_len,
                                 int64_t first_row, int64_t* lengths, float* logits, int isa) {
    Model m;
    Reader reader{table, n_table, 0, numbers, n_numbers};
    if (!read_model(reader, m) || B < 1 || first_row < 0 || first_row + B > rows || kind < 0 || kind > 2) return 1;
    const int64_t D = m.D, H = m.H, dn = m.dn, dr = m.dr, dv = m.dv, c = m.c, w = c + dr, qw = dn + dr;
    int64_t* len = lengths + first_row;
    int64_t T = 0;  // the longest row's past
    for (int64_t b = 0; b < B; b++) {
        if (ids[b] < 0 || ids[b] >= m.V) return 2;
        if (len[b] < 0 || len[b] >= max_len || len[b] >= m.positions) return 3;
        T = len[b] > T ? len[b] : T;
    }
    const size_t item = kind == 0 ? 4 : 2;
    std::vector<float> x(B * D), h(B * D), y(B * D), q(B * H * qw), qa, fresh(B * w), ql(B * H * w), lat(B * H * c);
    std::vector<float> head_in(B * (dn > c ? dn : c)), head_out(B * (c > dv ? c : dv)), o_in(B * H * dv), mid;
    std::vector<uint8_t> mask(B * (T + 1));
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t <= T; t++) mask[b * (T + 1) + t] = t < len[b] || t == T;
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
    int code = 0;
#define RUN(call)                             \
    if ((code = (call)) != 0) return code + 10;
    for (int64_t li = 0; li < m.L; li++) {
        const Layer& l = m.layers[li];
        for (int64_t b = 0; b < B; b++) rmsnorm(&x[b * D], l.in_norm, D, l.in_eps, &h[b * D]);
        // the queries [B, H, dn + dr]
        if (l.q_lora) {
            qa.resize(B * l.q_a.N);
            RUN(linear(l.q_a, h.data(), B, qa.data(), isa));
            for (int64_t b = 0; b < B; b++) rmsnorm(&qa[b * l.q_a.N], l.q_a_norm, l.q_a.N, l.q_a_eps, &qa[b * l.q_a.N]);
            RUN(linear(l.q_b, qa.data(), B, q.data(), isa));
        } else {
            RUN(linear(l.q, h.data(), B, q.data(), isa));
        }
        // the new latents [B, c + dr]: c_kv normed, k_pe rotated
        RUN(linear(l.kv_a, h.data(), B, fresh.data(), isa));
        for (int64_t b = 0; b < B; b++) {
            float* f = &fresh[b * w];
            rmsnorm(f, l.kv_norm, c, l.kv_eps, f);
            rope(f + c, m, len[b]);
        }
        // each head's query in the latent space, its rotary part beside it: ql [B, H, c + dr]
        for (int64_t hd = 0; hd < H; hd++) {
            for (int64_t b = 0; b < B; b++) memcpy(&head_in[b * dn], &q[(b * H + hd) * qw], dn * sizeof(float));
            RUN(nanoseek_float_linear(head_in.data(), B, dn, l.w_ukT + hd * c * dn, 0, c, head_out.data(), isa));
            for (int64_t b = 0; b < B; b++) {
                float* row = &ql[(b * H + hd) * w];
                memcpy(row, &head_out[b * c], c * sizeof(float));
                memcpy(row + c, &q[(b * H + hd) * qw + dn], dr * sizeof(float));
                rope(row + c, m, len[b]);
            }
        }
        // the attention over each row's cached latents and its new one
        const size_t layer_at = (size_t)li * rows * max_len * w;
        const LatentAttention a{ql.data(), H * w, w, (const char*)kv + (layer_at + first_row * max_len * w) * item,
                                max_len * w, w, 0, kind, fresh.data(), w, w, 0, mask.data(), 1, B, 1, H, T, c, w,
                                (float)m.scale, lat.data(), H * c, c};
        RUN(nanoseek_latent_attention(&a, isa));
        for (int64_t b = 0; b < B; b++)
            store_latent((char*)kv + (layer_at + ((first_row + b) * max_len + len[b]) * w) * item, kind, &fresh[b * w], w);
        // each head's values from its latent output, through kv_b_proj's value rows; then o_proj
        for (int64_t hd = 0; hd < H; hd++) {
            for (int64_t b = 0; b < B; b++) memcpy(&head_in[b * c], &lat[(b * H + hd) * c], c * sizeof(float));
            const size_t rows_at = (size_t)(hd * (dn + dv) + dn) * c * (l.kv_b_bf16 ? 2 : 4);
            RUN(nanoseek_float_linear(head_in.data(), B, c, (const char*)l.kv_b + rows_at, (int)l.kv_b_bf16, dv,
                                      head_out.data(), isa));
            for (int64_t b = 0; b < B; b++) memcpy(&o_in[(b * H + hd) * dv], &head_out[b * dv], dv * sizeof(float));
        }
        RUN(linear(l.o, o_in.data(), B, y.data(), isa));
        for (int64_t k = 0; k < B * D; k++) x[k] += y[k];
        // the feed-forward: a dense SwiGLU or the experts
        for (int64_t b = 0; b < B; b++) rmsnorm(&x[b * D], l.post_norm, D, l.post_eps, &h[b * D]);
        if (l.moe) {
            const Moe& e = l.m;
            const int64_t J = e.K + e.C - e.E;
            std::vector<float> scores(B * e.E), weight(B * J), ks(e.K);
            std::vector<int64_t> chunk(B * J), chosen(e.K);
            const Mat gate{e.gate, nullptr, e.E, D, 0};
            RUN(linear(gate, h.data(), B, scores.data(), isa));
            for (int64_t b = 0; b < B; b++) {
                route(e, &scores[b * e.E], chosen.data(), ks.data());
                for (int64_t j = 0; j < J; j++) {
                    chunk[b * J + j] = j < e.K ? chosen[j] : e.E + j - e.K;
                    weight[b * J + j] = j < e.K ? ks[j] : 1.f;
                }
            }
            RUN(nanoseek_float_experts(h.data(), B, D, chunk.data(), weight.data(), J, e.gate_up, e.down, e.C, e.I,
                                       y.data(), isa));
        } else {
            const int64_t I = l.gate.N;
            mid.resize(2 * B * I);
            RUN(linear(l.gate, h.data(), B, mid.data(), isa));
            RUN(linear(l.up, h.data(), B, mid.data() + B * I, isa));
            for (int64_t k = 0; k < B * I; k++) mid[k] = silu(mid[k]) * mid[B * I + k];
            RUN(linear(l.down, mid.data(), B, y.data(), isa));
        }
        for (int64_t k = 0; k < B * D; k++) x[k] += y[k];
    }
    for (int64_t b = 0; b < B; b++) rmsnorm(&x[b * D], m.norm, D, m.eps, &h[b * D]);
    RUN(linear(m.head, h.data(), B, logits, isa));
#undef RUN
    for (int64_t b = 0; b < B; b++) len[b]++;
    return 0;
}
