"""DeepSeekMoE: fine-grained routed experts + always-on shared experts, and their balancing.

Routing (per token, in fp32):
- V3 (`scoring_func="sigmoid"`, `topk_method="noaux_tc"`): s = sigmoid(logits); selection uses
  s + e_score_correction_bias; experts are split into n_group groups scored by the sum of
  their top-2 biased scores; only the best topk_group groups compete for the top-k; the
  weights are the *unbiased* s of the chosen experts, renormalised if norm_topk_prob, times
  routed_scaling_factor.
- V2 (`scoring_func="softmax"`): p = softmax(logits); `greedy` takes the top-k of p,
  `group_limited_greedy` first keeps the topk_group groups with the largest max(p).

Balancing during training:
- auxiliary-loss-free (V3): the gate counts how many tokens each expert received; after each
  optimizer step `update_router_bias` nudges the bias by gamma toward the mean load (sign rule);
- sequence-wise balance loss (alpha = config.aux_loss_alpha): alpha * sum_i f_i * P_i per sequence.

Letters: N tokens, D hidden, E routed experts, K experts per token, G groups.
"""

from __future__ import annotations

import weakref
from itertools import accumulate, groupby

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..kernels import float_experts_take, int4_experts_available, int4_grouped
from .config import ModelConfig
from .layers import MLP, linear

# stacking copies the experts' weights (see MoE.prepare_compiled_decode): done up to this many bytes of them
STACK_MAX_BYTES = 256 * 2**20
# MoE.int4_routed takes up to this many tokens (as many rows as an int4 layer multiplies through the kernel:
# quant.FAST_INT4_ROWS; more are a prompt, whose experts convert their weights)
INT4_GROUPED_TOKENS = 64


class Gate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.n_routed_experts
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring_func, self.topk_method = config.scoring_func, config.topk_method
        self.norm_topk_prob, self.scale = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.has_bias = self.topk_method == "noaux_tc"
        if self.has_bias:  # routing bias: updated by the sign rule, never by gradients; kept in fp32
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        # tokens routed to each expert since the last bias update (training only)
        self.register_buffer("expert_load", torch.zeros(self.n_experts), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.has_bias and self.e_score_correction_bias.dtype != torch.float32:  # .to(bf16) must not round it
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        self.expert_load = self.expert_load.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> weights [N, K] (fp32), expert ids [N, K], scores [N, E] (fp32, for the balance loss)."""
        logits = linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.has_bias else scores
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # (N, G, E/G)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
            else:
                group_scores = grouped.max(dim=-1).values
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(-1, self.n_experts)
        indices = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.training:
            self.expert_load += torch.bincount(indices.flatten(), minlength=self.n_experts)
        return weights * self.scale, indices, scores


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
            if config.n_shared_experts > 0 else None
        )
        self.aux_alpha = config.aux_loss_alpha if config.seq_aux else 0.0
        self.aux_loss: torch.Tensor | None = None  # set by forward in training when aux_alpha > 0
        self.n_shared = config.n_shared_experts if self.shared_experts is not None else 0
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # see prepare_compiled_decode
        self.handle: int | None = None  # likewise
        self.float_kernel = False  # likewise: whether a compiled decode step runs them as nanoseek::float_experts
        self._int4: torch.Tensor | bool = False  # see int4_table
        self._int4_kept: list = []  # what its addresses point to
        self._int4_known = False  # whether _int4 says what the experts are now (see _refresh_int4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        flat = x.view(-1, D)  # (N, D)
        weights, indices, scores = self.gate(flat)
        table = self.int4_table(flat, weights)
        if table is not None:  # routed and shared experts in one call
            return torch.ops.nanoseek.int4_experts(flat, weights, indices, table, len(self.experts)).view(B, S, D)
        if not self.training and torch.compiler.is_compiling():
            if self.float_kernel and flat.dtype == torch.float32:
                # what selected_experts computes, as nanoseek's operator (kernels/float.cpp): each chosen row read
                # once for all the tokens that chose it
                C = len(self.experts) + self.n_shared
                return torch.ops.nanoseek.float_experts(flat, weights, indices, *self.stacked, len(self.experts),
                                                        C).view(B, S, D)
            if self.stacked is not None:
                run = self.selected_experts if indices.shape[0] < self.many_tokens() else self.all_experts
                return run(flat, weights, indices).view(B, S, D)
            y = torch.ops.nanoseek.routed_experts(flat, weights, indices, self.handle).view(B, S, D)
        else:
            y = self.routed(flat, weights, indices).view(B, S, D)
            self.aux_loss = None
            if self.training and self.aux_alpha > 0:
                self.aux_loss = self.aux_alpha * sequence_balance_loss(
                    scores.view(B, S, -1), indices.view(B, S, -1), self.gate.n_experts
                )
        return y if self.shared_experts is None else y + self.shared_experts(x)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sort the N*K (token, expert) pairs by expert, run each expert that got tokens on its
        contiguous slice, and scatter-add the weighted outputs back to their tokens. In training
        an expert without tokens still runs on its empty slice, so every expert has a gradient
        (zero when unused): data-parallel reduction needs the same gradients on every process.
        Where a new matrix shape is expensive (see `row_bucket`) each slice is padded with unused
        rows up to a bucketed size, so the experts' matrix products keep a few shapes."""
        if not self.training and not (torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad)):
            y = self.int4_routed(x, weights, indices)
            if y is not None:
                return y
        if x.shape[0] == 1 and not self.training:
            return self.one_token(x, weights, indices)
        K, E = indices.shape[1], len(self.experts)
        xm = x.to(matmul_dtype(x))  # under autocast: cast once here, not each expert's slice in each projection
        flat_idx = indices.flatten()  # (N*K,)
        order = flat_idx.argsort(stable=True)
        token_of = order // K  # token behind each sorted pair
        gate_of = weights.flatten().index_select(0, order).to(xm.dtype)  # (N*K,)
        counts = torch.bincount(flat_idx, minlength=E).tolist()
        padded = pads_expert_rows(xm)
        sizes = counts
        if padded:
            sizes = [row_bucket(c) for c in counts]
            # where each sorted pair sits among the padded slices: shifted by the padding of the experts before it
            shift = torch.tensor(list(accumulate((s - c for s, c in zip(sizes, counts)), initial=0))[:-1], device=x.device)
            slot = torch.arange(len(order), device=x.device) + shift.repeat_interleave(torch.tensor(counts, device=x.device))
            token_of = token_of.new_zeros(sum(sizes)).index_copy_(0, slot, token_of)  # padding rows read token 0...
            gate_of = gate_of.new_zeros(sum(sizes)).index_copy_(0, slot, gate_of)
        chunks = xm.index_select(0, token_of).split(sizes)  # index_select: its backward is a fast index_add
        gates = gate_of.unsqueeze(1).split(sizes)  # (n_e, 1) each
        outs = torch.cat([self.experts[e](chunk, gates[e]) for e, chunk in enumerate(chunks)
                          if counts[e] > 0 or self.training])
        # ...and add exact zeros to it: their gate weight 0 scales the intermediate activation, and experts
        # have no bias (dropping those rows instead took two more passes over the pairs, and two in backward)
        return torch.zeros_like(x).index_add_(0, token_of, outs.to(x.dtype))

    def int4_table(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """What the operator nanoseek::int4_experts (kernels/ops.cpp) reads to run this layer for x (decoding,
        outside autograd, up to INT4_GROUPED_TOKENS tokens eagerly) where every expert, routed and shared, is an
        int4 layer nanoseek's kernel takes and the library carries the operator, else None (see `_int4_experts`)."""
        compiling = torch.compiler.is_compiling()
        if self.training or x.device.type != "cpu" or (not compiling and x.shape[0] > INT4_GROUPED_TOKENS) or \
                (torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad)):
            return None
        if compiling:  # (prepare_compiled_decode builds it before a graph is traced)
            return self._int4 if isinstance(self._int4, torch.Tensor) else None
        return self._int4 if self.one_operator() else None

    def one_operator(self) -> bool:
        """Whether this layer decodes as one call of nanoseek::int4_experts (see `int4_table`)."""
        if not self._int4_known:
            self._refresh_int4()
        return isinstance(self._int4, torch.Tensor)

    def _refresh_int4(self) -> None:
        """Make `_int4` say what the experts are now: int64 [experts, 13], a row per expert (routed, then the
        shared ones as one) with the addresses of its gate, up and down projections' codes, scales, zeros and units,
        then its intermediate size; False where an expert is not an int4 layer nanoseek's kernel takes, or the
        library does not carry the operator. It keeps the tensors it points to alive (`_int4_kept`) and is
        rewritten in place where it has the same shape, since a compiled graph holds the tensor it was traced with."""
        mlps = list(self.experts) + ([self.shared_experts] if self.shared_experts is not None else [])
        operands = [[getattr(layer, "int4_operands", lambda: None)() for layer in (m.gate_proj, m.up_proj, m.down_proj)]
                    for m in mlps]
        self._int4_known = True
        if any(None in expert for expert in operands) or not int4_experts_available():
            self._forget_int4()
            self._int4 = False
            return
        with torch.inference_mode(False):  # (a table made in inference mode could not be rewritten outside it)
            table = torch.tensor([[t.data_ptr() for layer in expert for t in layer] + [m.gate_proj.out_features]
                                  for expert, m in zip(operands, mlps)], dtype=torch.int64)
            if isinstance(self._int4, torch.Tensor) and self._int4.shape == table.shape:
                self._int4.copy_(table)
            else:
                self._int4 = table
        self._int4_kept = operands  # (only now are the tensors the table pointed to before let go)

    def _forget_int4(self) -> None:
        """Let go of the tensors the table points to, its addresses zeroed first (the operator refuses a zero one:
        a compiled graph still holding the table fails rather than read freed memory); made again at its next use."""
        if isinstance(self._int4, torch.Tensor):
            with torch.inference_mode(False):
                self._int4.zero_()
        self._int4_kept, self._int4_known = [], False

    def _apply(self, fn, recurse=True):
        self._forget_int4()  # the experts' tensors may move
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._forget_int4()  # loading may replace them
        super()._load_from_state_dict(*args, **kwargs)

    def __setstate__(self, state):
        super().__setstate__(state)
        # a copy (deepcopy, pickle) has its own tensors: the table it was given points to the original's
        self._int4, self._int4_kept, self._int4_known = False, [], False

    def int4_routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """`routed` where the chosen experts' layers all multiply through nanoseek's int4 kernel (quantized
        experts on a CPU; `int4_operands` says), outside autograd, for up to INT4_GROUPED_TOKENS tokens: every chosen
        expert's gate and up projections in one kernel call, their down projections in a second, instead
        of three calls (each splitting its weight between the threads) per expert. None otherwise. (Where the
        library carries nanoseek::int4_experts, `forward` runs the whole layer through it instead; see int4_table.)"""
        N, K = indices.shape
        if N > INT4_GROUPED_TOKENS:
            return None
        chosen = indices.flatten().tolist()  # (N*K pairs of token and expert, token-major)
        order = sorted(range(N * K), key=chosen.__getitem__)  # the pairs grouped by expert
        runs = []  # per chosen expert: its first pair in `order`, its pairs, its three layers' operands
        start = 0
        for e, pairs in groupby(order, key=chosen.__getitem__):
            mlp, n = self.experts[e], len(list(pairs))
            ops = [getattr(layer, "int4_operands", lambda: None)() for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            if None in ops:
                return None
            runs.append((start, n, *ops))
            start += n
        order_t = torch.tensor(order, device=x.device)
        token_of = order_t // K
        # each pair's token, grouped by expert (one token: its pairs are distinct experts, each reading row 0)
        xs, row_of = (x.float().contiguous(), lambda a: 0) if N == 1 else (x.float().index_select(0, token_of), lambda a: a)
        I = runs[0][2][0].shape[0]  # the experts' intermediate size (gate_proj's output)
        gate_out, up_out = xs.new_empty(2, N * K, I)
        int4_grouped([(xs, row_of(a), *op, out, a, n) for a, n, gate, up, _ in runs for op, out in ((gate, gate_out), (up, up_out))])
        gate = weights.flatten().index_select(0, order_t).float()  # (N*K,)
        h = F.silu(gate_out).mul_(up_out).mul_(gate[:, None])  # (N*K, I)
        out = xs.new_empty(N * K, x.shape[1])
        int4_grouped([(h, a, *down, out, a, n) for a, n, _, _, down in runs])
        if N == 1:
            return out.sum(0, keepdim=True).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, out.to(x.dtype))

    def one_token(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`routed` for one token (decoding a single sequence): its K experts one after the other, with
        none of the sorting, splitting and gathering that grouping many tokens by expert takes (at
        DeepSeek-V2-Lite's shape 0.17 ms of a layer's 3.2, int8 on a 2-core Xeon)."""
        xm = x.to(matmul_dtype(x))
        gates = weights.to(xm.dtype).t().unsqueeze(-1)  # (K, 1, 1): each expert's scale for the token
        y = None
        for k, e in enumerate(indices[0].tolist()):
            out = self.experts[e](xm, gates[k])
            y = out if y is None else y.add_(out)
        return y.to(x.dtype)

    def many_tokens(self) -> int:
        """The fewest tokens a compiled decode step runs through `all_experts` rather than
        `selected_experts`: where the chosen experts' rows, read per token, outnumber four times every
        expert's (measured: see selected_experts)."""
        return 4 * (self.gate.n_experts + self.n_shared) // (self.gate.top_k + self.n_shared) + 1

    def all_experts(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Routed and shared experts as one wide MLP over every token, each expert's slice of the
        intermediate activation scaled by its gate weight (0 when not chosen, 1 for the shared ones).
        No host sync and no data-dependent shape, so a compiled decode step stays one graph; it costs
        n_routed_experts / num_experts_per_tok times the routed FLOPs, which only pays for small
        models, where launching operations costs more than the arithmetic. Reads `stacked`."""
        N, E = x.shape[0], len(self.experts)
        w_gate_up, w_down = (w.to(x.dtype) for w in self.stacked)  # (bf16 weights under fp32 activations: NarrowLinear)
        scale = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter(1, indices, weights.to(x.dtype))
        scale = torch.cat([scale, scale.new_ones(N, self.n_shared)], dim=1)  # (N, E + shared chunks)
        g, u = (x @ w_gate_up.t()).chunk(2, dim=-1)  # (N, chunks * I) each
        h = (F.silu(g) * u).view(N, scale.shape[1], -1) * scale[:, :, None]  # (N, chunks, I)
        return h.view(N, -1) @ w_down.t()

    def selected_experts(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The same as `all_experts`, reading only the experts each token chose (and the shared ones):
        each product is written as multiply-and-sum over weights picked by index, which inductor
        compiles to one reduction loading the chosen rows where they lie (eagerly it would copy them;
        it runs only compiled). For a few tokens this reads K + shared of the E + shared experts'
        weights: on the shipped model's shape at one token 3x faster than `all_experts`, still ahead
        at 16 tokens, behind from about 32 (one Xeon, compiled, interleaved)."""
        N = indices.shape[0]
        C = len(self.experts) + self.n_shared  # chunks of moe_intermediate_size in `stacked`
        shared = torch.arange(len(self.experts), C, device=x.device).expand(N, self.n_shared)
        chunk = torch.cat([indices, shared], dim=1)  # (N, K + shared): the chunks each token reads
        scale = torch.cat([weights, weights.new_ones(N, self.n_shared)], dim=1).to(x.dtype)
        w_gate_up, w_down = self.stacked
        gate_up = w_gate_up.view(2, C, -1, x.shape[1])  # (gate | up, chunk, I, D)
        g = (x[:, None, None, :] * gate_up[0][chunk]).sum(-1)  # (N, K + shared, I)
        u = (x[:, None, None, :] * gate_up[1][chunk]).sum(-1)
        h = F.silu(g) * u * scale[:, :, None]  # (N, K + shared, I)
        down = w_down.view(w_down.shape[0], C, -1)  # (D, chunk, I)
        return (down[:, chunk] * h[None]).sum((-1, -2)).t().to(x.dtype)  # (D, N) -> (N, D)

    @torch.no_grad()
    def prepare_compiled_decode(self) -> None:
        """Make ready (again, after the weights changed) what a compiled decode step reads. Small float
        experts are stacked (`stacked`: [gate_proj; up_proj] of every expert, shared last: [2 * chunks * I, D],
        and down_proj side by side: [D, chunks * I]; written in place when the shapes allow, so a compiled
        graph that reads it stays valid), for `selected_experts` and `all_experts`, or, in fp32 where nanoseek's
        kernels build, for the operator `float_experts` that computes them (`float_kernel`). Larger or quantized
        experts stay as they are: the graph calls `routed` as one opaque operator (`nanoseek::routed_experts`,
        which finds this module by `handle`), so only the chosen experts' weights are read, through their
        own kernels, while the attention, norms and shared experts around them are compiled. (Stacking
        copies the weights, and `all_experts` runs every expert: both pay only for small models.)"""
        self._refresh_int4()
        mlps = list(self.experts) + ([self.shared_experts] if self.shared_experts is not None else [])
        layers = [layer for m in mlps for layer in (m.gate_proj, m.up_proj, m.down_proj)]
        if not all(isinstance(layer, nn.Linear) for layer in layers) or \
                sum(layer.weight.numel() * layer.weight.element_size() for layer in layers) > STACK_MAX_BYTES:
            self.stacked, self.handle, self.float_kernel = None, id(self), False
            _ROUTED_EXPERTS[self.handle] = self
            return
        gate_up = torch.cat([m.gate_proj.weight for m in mlps] + [m.up_proj.weight for m in mlps])
        down = torch.cat([m.down_proj.weight for m in mlps], dim=1)
        if self.stacked is not None and self.stacked[0].shape == gate_up.shape and self.stacked[0].dtype == gate_up.dtype:
            self.stacked[0].copy_(gate_up)
            self.stacked[1].copy_(down)
        else:
            self.stacked = (gate_up, down)
            for t in self.stacked:  # their shapes are constants in a compiled step, not sizes passed at every call
                torch._dynamo.mark_static(t)
        self.float_kernel = gate_up.device.type == "cpu" and gate_up.dtype == torch.float32 and \
            float_experts_take(gate_up.shape[1], self.experts[0].gate_proj.out_features)


# the MoE layers whose compiled decode steps call their routed experts eagerly, by handle
_ROUTED_EXPERTS: weakref.WeakValueDictionary[int, MoE] = weakref.WeakValueDictionary()


@torch.library.custom_op("nanoseek::routed_experts", mutates_args=())
def routed_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, moe: int) -> torch.Tensor:
    """`MoE.routed` of the layer whose handle is `moe`: x [N, D], weights and indices [N, K] -> [N, D]."""
    return _ROUTED_EXPERTS[moe].routed(x, weights, indices)


@routed_experts.register_fake
def _(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, moe: int) -> torch.Tensor:
    return torch.empty_like(x)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matrix products run in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def pads_expert_rows(x: torch.Tensor) -> bool:
    """Whether expert slices are padded to bucketed row counts: for reduced-precision matrix
    products on a CPU, where oneDNN generates a kernel for each new shape (about 1 ms each, 10-20x
    the product itself at an expert's size: measured on a Xeon with AMX), and the row count of an
    expert's slice changes with every batch."""
    return x.device.type == "cpu" and matmul_dtype(x) in (torch.bfloat16, torch.float16)


def row_bucket(n: int) -> int:
    """n rounded up to one of 8 sizes per power of two above 32 (at most 1/8 more rows), so the
    row counts an expert sees in a run fall into a few dozen shapes."""
    if n <= 32:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """V3's complementary sequence-wise balance loss, averaged over sequences (without alpha).

    scores [B, S, E] router affinities, indices [B, S, K] chosen experts.
    f_i = E / (K * S) * (number of tokens of the sequence routed to i);
    P_i = mean over the sequence of s_i / sum_j s_j; loss = sum_i f_i * P_i (1.0 when balanced).
    """
    B, S, K = indices.shape
    counts = torch.zeros(B, n_experts, device=scores.device).scatter_add_(
        1, indices.view(B, S * K), torch.ones(B, S * K, device=scores.device)
    )  # (B, E)
    f = counts * n_experts / (K * S)
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    return (f * P).sum(dim=-1).mean()


@torch.no_grad()
def update_router_bias(model: nn.Module, gamma: float) -> dict[str, float]:
    """Auxiliary-loss-free balancing (V3 §2.1.2), called by the trainer after each step.

    For every gate with a correction bias: load = tokens each expert received since the last
    call (summed over data-parallel ranks); bias += gamma * sign(mean load - load), i.e.
    overloaded experts become less attractive, underloaded ones more. Resets the counts and
    returns the worst max/mean load ratio seen, for logging (1.0 = perfectly balanced; nothing when no
    expert saw a token: a GRPO step whose groups all scored alike).
    """
    worst = 0.0
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        load = gate.expert_load
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        if load.sum() == 0:
            continue
        worst = max(worst, (load.max() / load.mean()).item())
        if gate.has_bias and gamma > 0:
            gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        load.zero_()
    return {"expert_imbalance": worst} if worst else {}
