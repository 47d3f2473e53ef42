"""
DeepSeek-V3 (arXiv 2412.19437) in one file, at a size one GPU trains. The parts a token meets:
  1) Multi-head latent attention (MLA): keys and values rebuilt from a small shared latent, plus one
     rotary key shared by all heads ("decoupled RoPE"). Inference caches only the latent and that key,
     and absorbs the key/value up-projections into the query and the output ("absorb" mode).
  2) DeepSeekMoE: always-on shared experts plus fine-grained routed ones, sigmoid affinities, group-
     limited top-k routing, and auxiliary-loss-free balancing by a per-expert bias that only steers selection.
  3) Multi-token prediction (MTP): sequential modules that predict tokens t+2, t+3, ... with the shared
     embedding and head; a training signal and a draft model for speculative decoding.
Names follow nanoGPT for the common knobs and DeepSeek's released inference/model.py for theirs.
"""

import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    # --- the usual GPT knobs (nanoGPT's names) ---
    block_size: int = 512           # longest sequence the model sees (RoPE tables are this long)
    vocab_size: int = 50304         # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    n_layer: int = 8                # transformer blocks in the main model
    n_head: int = 8                 # attention heads
    n_embd: int = 512               # model width d
    dropout: float = 0.0            # residual and attention dropout (training only)
    tie_embeddings: bool = False    # share the token embedding with the output head (DeepSeek: no)
    # --- multi-head latent attention ---
    q_lora_rank: int = 192          # query latent width; 0 = plain d -> n_head*qk_head_dim projection
    kv_lora_rank: int = 128         # key/value latent width: what the inference cache stores
    qk_nope_head_dim: int = 64      # per-head query/key dims that carry content (no position)
    qk_rope_head_dim: int = 32      # per-head query dims with RoPE; the key's are shared by all heads
    v_head_dim: int = 64            # per-head value dims (may differ from the q/k head dim)
    # --- feed-forward: dense layers first, DeepSeekMoE after ---
    inter_dim: int = 1408           # hidden width of the dense SwiGLU MLP
    n_dense_layers: int = 1         # the first n_dense_layers blocks use the dense MLP
    moe_inter_dim: int = 352        # hidden width of each (fine-grained) expert
    n_routed_experts: int = 16      # routed experts per MoE layer; 0 = a dense model ("dense twin")
    n_shared_experts: int = 1       # always-on experts (run as one MLP of n_shared*moe_inter_dim)
    n_activated_experts: int = 4    # routed experts per token (top-k)
    n_expert_groups: int = 1        # experts are split into this many groups ...
    n_limited_groups: int = 1       # ... and a token may only use this many of them
    score_func: str = "sigmoid"     # expert affinity: 'sigmoid' (V3) or 'softmax' (V2: no balancing bias)
    route_scale: float = 1.0        # the gate weights (summing to 1) are multiplied by this
    # --- auxiliary-loss-free balancing and the small sequence-wise balance loss ---
    bias_update_speed: float = 1e-3  # gamma: b_i += gamma * sign(mean_load - load_i) per step
    seq_aux_alpha: float = 1e-4     # weight of the sequence-wise balance loss; 0 turns it off
    noisy_topk: bool = False        # add Gaussian noise to the selection scores in training
    noise_std: float = 0.01         # its standard deviation (the scores live in (0, 1))
    # --- multi-token prediction ---
    mtp_depth: int = 1              # sequential MTP modules; 0 turns MTP off
    mtp_lambda: float = 0.3         # loss = main CE + mtp_lambda * mean(MTP CEs)
    # --- rotary embeddings and YaRN ---
    rope_theta: float = 10000.0     # RoPE base
    rope_factor: float = 1.0        # YaRN context-extension factor; > 1 turns YaRN on
    original_seq_len: int = 512     # context length the model was trained at before extension
    beta_fast: int = 32             # YaRN: rotations above which dims are left alone ...
    beta_slow: int = 1              # ... and below which they are fully interpolated
    mscale: float = 1.0             # YaRN: softmax scale *= (0.1 * mscale * ln(factor) + 1)^2
    norm_eps: float = 1e-6          # RMSNorm epsilon (DeepSeek's value)
    # --- implementation choices (not architecture) ---
    moe_impl: str = "auto"          # 'grouped' or 'padded'; 'auto' = padded unless pick_device resolves it

    # knobs that change how the model trains, not the function it computes (train.py's resume may change them)
    TRAINING_ONLY = ("dropout", "bias_update_speed", "seq_aux_alpha", "noisy_topk", "noise_std", "mtp_lambda",
                     "moe_impl")

    def __post_init__(self):
        def bad(name, rule):
            raise ValueError(f"ModelArgs.{name}={getattr(self, name)!r}: {rule}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "original_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        for name in ("q_lora_rank", "n_dense_layers", "n_routed_experts", "n_shared_experts",
                     "mtp_depth", "inter_dim", "moe_inter_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be a non-negative integer")
        E, G = self.n_routed_experts, self.n_expert_groups
        L, K = self.n_limited_groups, self.n_activated_experts
        moe, per_group = E > 0, E // max(G, 1)  # (a G < 1 fails "must divide")
        rules = [  # (field, whether it holds, the rule), checked in this order
            *((n, getattr(self, n) >= 0, "must be >= 0") for n in ("bias_update_speed", "seq_aux_alpha",
                                                                    "mtp_lambda", "noise_std")),
            ("qk_rope_head_dim", self.qk_rope_head_dim % 2 == 0, "must be even (RoPE rotates pairs of dims)"),
            ("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
            ("score_func", self.score_func in ("sigmoid", "softmax"), "must be 'sigmoid' or 'softmax'"),
            ("moe_impl", self.moe_impl in ("auto", "grouped", "padded"), "must be auto, grouped or padded"),
            ("rope_theta", self.rope_theta > 0, "must be > 0"),
            ("route_scale", self.route_scale > 0, "must be > 0"),
            ("rope_factor", self.rope_factor >= 1.0, "must be >= 1 (1: no YaRN)"),
            ("beta_fast", 0 < self.beta_slow < self.beta_fast, f"must exceed beta_slow={self.beta_slow} > 0"),
            ("n_dense_layers", self.n_dense_layers <= self.n_layer, f"cannot exceed n_layer={self.n_layer}"),
            ("inter_dim", self.inter_dim > 0 or self.n_dense_layers == 0 < E, "must be > 0 for dense layers"),
            ("moe_inter_dim", not moe or self.moe_inter_dim > 0, "must be > 0 for routed experts"),
            ("n_activated_experts", not moe or 1 <= K <= E, f"must be in [1, n_routed_experts={E}]"),
            ("n_expert_groups", not moe or per_group * G == E, f"must divide n_routed_experts={E}"),
            ("n_expert_groups", not moe or G == 1 or per_group >= 2 or self.score_func != "sigmoid",
             "each group needs >= 2 experts (groups are ranked by their top-2 sum)"),
            ("n_limited_groups", not moe or 1 <= L <= G, f"must be in [1, n_expert_groups={G}]"),
            ("n_limited_groups", not moe or L * per_group >= K,
             f"{L} groups of {per_group} experts hold fewer than n_activated_experts={K}")]
        for name, ok, rule in rules:
            if not ok:
                bad(name, rule)

    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def differences(self, other):
        """Fields in which `other` is a different model (not TRAINING_ONLY ones, nor YaRN's while off)."""
        free = set(self.TRAINING_ONLY)
        if self.rope_factor == other.rope_factor == 1.0:
            free |= {"original_seq_len", "beta_fast", "beta_slow", "mscale"}
        return [f.name for f in fields(self) if f.name not in free
                and getattr(self, f.name) != getattr(other, f.name)]


# ---- small pieces --------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (bf16 sums of squares lose bits), scale in the input dtype, as in the reference
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


def rope_tables(args: ModelArgs):
    """cos/sin tables (block_size, qk_rope_head_dim // 2), with YaRN when rope_factor > 1."""
    d, base = args.qk_rope_head_dim, args.rope_theta
    # theta_i = base^(-2i/d): the parentheses matter, base ** (arange / d), not (base ** arange) / d
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if args.rope_factor > 1.0:
        # YaRN: dims that turn many times within the original context keep their frequency,
        # dims that turn less than once are interpolated by the factor, a linear ramp in between.
        def dim_of(n_rot):  # the dim whose wavelength fits n_rot times in original_seq_len
            return d * math.log(args.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(dim_of(args.beta_fast)), 0)
        high = min(math.ceil(dim_of(args.beta_slow)), d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
        inv_freq = inv_freq / args.rope_factor * (1 - keep) + inv_freq * keep
    angles = torch.outer(torch.arange(args.block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs of x (..., T, n, d) as complex numbers (DeepSeek's layout); cos/sin: (T, d/2)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Also a shared expert (or several, fused)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = F.linear(x, torch.cat([self.w1.weight, self.w3.weight])).chunk(2, dim=-1)  # one wider GEMM
        return self.w2(F.silu(a) * b)


# ---- multi-head latent attention -----------------------------------------------------------------

class MLA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, d = args.n_head, args.n_embd
        self.n_head, self.rank = H, args.kv_lora_rank
        self.dn, self.dr, self.dv = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        if args.q_lora_rank == 0:
            self.wq = nn.Linear(d, H * args.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(d, args.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
            self.wq_b = nn.Linear(args.q_lora_rank, H * args.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d, self.rank + self.dr, bias=False)  # kv latent AND the one shared rotary key
        self.kv_norm = RMSNorm(self.rank, args.norm_eps)
        self.wkv_b = nn.Linear(self.rank, H * (self.dn + self.dv), bias=False)  # latent -> keys, values
        self.wo = nn.Linear(H * self.dv, d, bias=False)
        self.scale = args.qk_head_dim ** -0.5
        if args.rope_factor > 1.0:  # YaRN's attention temperature, applied to the softmax scale
            m = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
            self.scale *= m * m

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        B, T, _ = x.shape
        q = self.wq(x) if self.args.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(B, T, self.n_head, self.dn + self.dr).split([self.dn, self.dr], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        kv, k_pe = self.wkv_a(x).split([self.rank, self.dr], dim=-1)
        kv, k_pe = self.kv_norm(kv), apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        if cache is None:
            # Training: expand the latent to every head's keys and values (each head reads the
            # WHOLE latent through its own slice of wkv_b) and use the fused causal attention.
            k_nope, v = self.wkv_b(kv).view(B, T, self.n_head, -1).split([self.dn, self.dv], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)              # (B, H, T, dn+dr)
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_head, -1)], dim=-1).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.scale,
                                               dropout_p=self.args.dropout if self.training else 0.0)
            return self.wo(y.transpose(1, 2).reshape(B, T, -1))
        # Inference ("absorb" mode): the cached latents are never expanded; fixed shapes, no host sync.
        # score = q_nope . (W_uk c) + q_pe . k_pe = (W_uk^T q_nope) . c + q_pe . k_pe, so fold W_uk
        # into the query; likewise the values: out = W_uv (sum_s p_s c_s), fold W_uv into the output.
        kv_cache, pe_cache = cache
        pos = start_pos + torch.arange(T, device=x.device)
        kv_cache[:B].index_copy_(1, pos, kv.to(kv_cache.dtype))
        pe_cache[:B].index_copy_(1, pos, k_pe.to(pe_cache.dtype))
        mask = torch.arange(kv_cache.shape[1], device=x.device) <= pos[:, None]  # query i sees keys <= pos[i]
        w_uk, w_uv = self.wkv_b.weight.view(self.n_head, -1, self.rank).split([self.dn, self.dv], dim=1)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)                    # (B, T, H, rank)
        c, k_pe = kv_cache[:B].type_as(q_lat), pe_cache[:B].type_as(q_lat)
        # all heads read the same cached latent and rotary key: plain matmuls (SDPA would expand them)
        scores = torch.einsum("bthc,bsc->bths", q_lat, c) + torch.einsum("bthr,bsr->bths", q_pe, k_pe)
        scores = (scores * self.scale).masked_fill(~mask[:, None], float("-inf"))
        p = scores.float().softmax(dim=-1).type_as(q_lat)                     # (B, T, H, S)
        y = torch.einsum("bthc,hdc->bthd", torch.einsum("bths,bsc->bthc", p, c), w_uv)
        return self.wo(y.reshape(B, T, -1))


# ---- DeepSeekMoE ---------------------------------------------------------------------------------

class Gate(nn.Module):
    """Scores every routed expert, picks the top-k (group-limited, bias-steered), weights them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.randn(args.n_routed_experts, args.n_embd) * 0.02)
        # The balancing bias (V3's; V2's softmax routing has none): fp32, saved with the model, never seen
        # by the optimizer. It only changes WHICH experts are picked; gate weights use the unbiased scores.
        self.register_buffer("bias", torch.zeros(len(self.weight)) if args.score_func == "sigmoid" else None)

    def forward(self, x):
        """x: (N, d) -> weights (N, k) fp32, indices (N, k), scores (N, E) fp32."""
        a = self.args
        with torch.autocast(x.device.type, enabled=False):  # route in fp32: near-ties matter
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if a.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.bias is None else scores + self.bias
        if a.noisy_topk and self.training:
            choice = choice + torch.randn_like(choice) * a.noise_std
        if a.n_expert_groups > 1:
            # keep the n_limited_groups best groups: by the sum of their two best (biased) scores in V3,
            # by their best score in V2 (no bias), as DeepSeek's Gate does
            g = choice.view(-1, a.n_expert_groups, a.n_routed_experts // a.n_expert_groups)
            group_score = g.amax(-1) if self.bias is None else g.sort(dim=-1).values[..., -2:].sum(-1)
            top_groups = group_score.argsort(dim=-1, descending=True, stable=True)[:, :a.n_limited_groups]
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, top_groups, True)
            choice = g.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        # (sorts, not topk: compiled, the sort of a few experts or groups is part of the routing kernel)
        idx = choice.argsort(dim=-1, descending=True, stable=True)[:, :a.n_activated_experts]
        w = scores.gather(1, idx)
        if a.score_func == "sigmoid":  # sigmoid scores don't sum to 1: normalise over the chosen
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * a.route_scale, idx, scores


class ExpertLinear(torch.autograd.Function):
    """Each expert's rows times its weights w (E, out, in), backward written out: rows x (R, in) sorted by
    expert (offs: their ends) via torch._grouped_mm (its CPU backward fails), or tiles x (N, M, in): a bmm."""

    @staticmethod
    def forward(ctx, x, w, offs, tiles):
        ctx.save_for_backward(x, w, offs, tiles)
        return torch._grouped_mm(x, w.mT, offs=offs) if tiles is None else torch.bmm(x, w[tiles].mT)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs, tiles = ctx.saved_tensors
        if tiles is not None:  # w gathered again, not kept N times; dw: each tile's dy^T x, summed in fp32
            dw = torch.zeros(w.shape, device=w.device).index_add_(0, tiles, torch.bmm(dy.mT, x).float())
            return torch.bmm(dy, w[tiles]), dw.to(w.dtype), None, None
        dy = dy.contiguous()  # (the CPU kernel wants its second operand column-major: the transposed copy)
        return (torch._grouped_mm(dy, w.mT.contiguous().mT, offs=offs),
                torch._grouped_mm(dy.t(), x, offs=offs), None, None)  # dw per expert: dy_e^T x_e


class Dispatch(torch.autograd.Function):
    """xs = x[order // K]: each token copied to its K slots in the order `order` (inverse: inv); K = 1
    permutes. The backward gathers by inv and sums each token's K rows, where autograd would scatter-add."""

    @staticmethod
    def forward(ctx, x, order, inv, K):
        ctx.save_for_backward(inv)
        ctx.K = K
        return x[order // K] if K > 1 else x[order]

    @staticmethod
    def backward(ctx, dxs):
        dx = dxs[ctx.saved_tensors[0]]  # (inv)
        return dx.view(-1, ctx.K, dx.shape[-1]).sum(1) if ctx.K > 1 else dx, None, None, None


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        E, d, h = args.n_routed_experts, args.n_embd, args.moe_inter_dim
        self.gate = Gate(args)  # the routed experts, below, in 3-D tensors: one grouped matmul runs them all
        self.w1 = nn.Parameter(torch.randn(E, h, d) * 0.02)  # (DeepSeekV3 re-initialises all of
        self.w3 = nn.Parameter(torch.randn(E, h, d) * 0.02)  # these; a lone MoE still works)
        self.w2 = nn.Parameter(torch.randn(E, d, h) * 0.02)
        self.shared = MLP(d, args.n_shared_experts * h) if args.n_shared_experts > 0 else None
        # tokens routed to each expert since the last update_expert_bias(); cleared every step, so not saved
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.ep_group = None  # expert parallelism: the ranks holding the experts between them (parallel.py)

    def forward(self, x):
        """x: (B, T, d) -> (y, counts (E,), seq_aux_loss scalar)."""
        a = self.args
        B, T, d = x.shape
        xf = x.reshape(-1, d)
        w, idx, scores = self.gate(xf)
        E, K = a.n_routed_experts, a.n_activated_experts
        ones = torch.ones(idx.numel(), device=x.device)
        counts = torch.zeros(E, device=x.device).scatter_add_(0, idx.flatten(), ones)  # (bincount syncs)
        y = self.run_experts(xf, w, idx, counts, self.ep_group)
        y = y if self.shared is None else y + self.shared(xf)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.training and a.seq_aux_alpha > 0:
            # Sequence-wise balance loss (paper eq. 17-20): alpha * sum_i f_i * P_i per sequence, f_i =
            # the share of the sequence's top-k affinities (plain top-k: no bias, groups or noise) that
            # are expert i's (x E/K), P_i = mean of expert i's normalised affinity. Gradient through P only.
            P = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)
            top = scores.argsort(dim=-1, descending=True, stable=True)[:, :K].reshape(B, T * K)
            f = torch.zeros(B, E, device=x.device).scatter_add_(1, top, torch.ones_like(top, dtype=P.dtype))
            aux = a.seq_aux_alpha * (f * (E / (K * T)) * P).sum(-1).mean()
        return y.view(B, T, d), counts, aux

    def run_experts(self, x, w, idx, counts, group=None):
        # sort the (token, slot) pairs by expert, run each expert on its contiguous rows, unsort
        K, d = idx.shape[1], x.shape[1]
        order = idx.flatten().argsort(stable=True)   # row r of the sorted batch is slot order[r]
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xs = Dispatch.apply(x.to(dt), order, inv, K)
        ws = w.flatten()[order].unsqueeze(-1)              # each sorted row's gate weight
        if group is not None:  # expert parallelism: the experts are on group's ranks (parallel.py, imported
            from parallel import experts_elsewhere  # here: one process never needs torch.distributed)
            ys = experts_elsewhere(self, xs, ws, counts, group)
        else:
            offs, tiles = counts.cumsum(0).to(torch.int32), None
            if self.args.moe_impl != "grouped":
                # each expert's rows zero-padded to whole tiles of M rows, one bmm: N tiles fit any routing
                # (static shapes, no host sync, no token dropped); M = rows / 4E pads ~a quarter more rows
                E, rows, c = counts.numel(), order.numel(), counts.long()
                M = max(-(-rows // (4 * E)), 1)  # (at least 1: an EP rank may get no rows)
                n = (c + M - 1) // M  # tiles per expert
                N, ends = (rows + min(E, rows) * (M - 1)) // M, n.cumsum(0)  # N >= sum(n) for any counts
                tiles = torch.searchsorted(ends, torch.arange(N, device=x.device), right=True).clamp(0, E - 1)
                # sorted row r of expert e goes to r - (e's first sorted row) + M * (e's first tile)
                pos = torch.arange(rows, device=x.device) + ((ends - n) * M - offs + c)[idx.flatten()[order]]
                xs = xs.new_zeros(N * M, d).index_copy(0, pos, xs).view(N, M, d)
                ws = ws.new_zeros(N * M, 1).index_copy(0, pos, ws).view(N, M, 1)
            w13 = torch.cat([self.w1, self.w3], dim=1).to(dt)  # both input projections in one GEMM
            a, b = ExpertLinear.apply(xs, w13, offs, tiles).chunk(2, dim=-1)
            # scale by the gate weight before the down-projection: W2(g h) = g W2(h), on fewer dims
            ys = ExpertLinear.apply((F.silu(a) * b * ws).to(dt), self.w2.to(dt), offs, tiles)
            ys = ys if tiles is None else ys.flatten(0, 1).index_select(0, pos)  # (unpadded)
        return Dispatch.apply(ys, inv, order, 1).view(-1, K, d).sum(1, dtype=torch.float32).type_as(x)


# ---- blocks, MTP and the model -------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.n_embd, args.norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.n_embd, args.norm_eps)
        self.is_moe = args.n_routed_experts > 0 and layer_id >= args.n_dense_layers
        self.ffn = MoE(args) if self.is_moe else MLP(args.n_embd, args.inter_dim)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        """-> (x, expert counts or None, balance loss). The counts come OUT of the block rather than
        being added to a buffer inside it, so activation checkpointing's recompute can't count twice."""
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, start_pos))
        h = self.ffn(self.ffn_norm(x))
        h, counts, aux = h if self.is_moe else (h, None, x.new_zeros((), dtype=torch.float32))
        return x + self.drop(h), counts, aux


class MTPModule(nn.Module):
    """Predicts token t+k+1 from the depth-(k-1) hidden state at t and the embedding of token t+k."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(args.n_embd, args.norm_eps)
        self.hnorm = RMSNorm(args.n_embd, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.n_embd, args.n_embd, bias=False)
        self.block = Block(args, layer_id)
        self.norm = RMSNorm(args.n_embd, args.norm_eps)  # before the shared head

    def forward(self, h, emb, cos, sin, cache=None, start_pos=0):
        """-> (hidden for the next depth, the same normed for the head, expert counts, balance loss)"""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))  # (DeepSeek's order)
        x, counts, aux = self.block(x, cos, sin, cache, start_pos)
        return x, self.norm(x), counts, aux


class DeepSeekV3(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_emb = nn.Embedding(args.vocab_size, args.n_embd)
        self.drop = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList([Block(args, i) for i in range(args.n_layer)])
        self.norm = RMSNorm(args.n_embd, args.norm_eps)
        self.head = nn.Linear(args.n_embd, args.vocab_size, bias=False)
        # MTP blocks have MoE FFNs like the last layers (DeepSeek-V3's MTP layer 61 is a MoE layer)
        self.mtp = nn.ModuleList([MTPModule(args, args.n_layer + k) for k in range(args.mtp_depth)])
        if args.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.use_checkpointing = False  # activation checkpointing per block (train.py sets it)
        self.fused_ce = None            # optional fused linear+cross-entropy: use_liger()
        self.apply(self._init_weights)

    @torch.no_grad()
    def _init_weights(self, module):
        # GPT-2/nanoGPT: N(0, 0.02) for every matrix; those writing into the residual stream (wo, w2) get
        # 1/sqrt(2 * layers) of that, so the residual's variance doesn't grow with depth. Norms stay 1.
        resid_std = 0.02 / math.sqrt(2 * (self.args.n_layer + self.args.mtp_depth))
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 2:  # (the only matrix named w2 that is not a Linear's: the experts')
                nn.init.normal_(p, 0.0, resid_std if name == "w2" else 0.02)
        if isinstance(module, (MLA, MLP)):  # (apply() visits them after their Linears)
            nn.init.normal_(module.wo.weight if isinstance(module, MLA) else module.w2.weight, 0.0, resid_std)

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids. Training mode with targets: (None, loss = main CE + mtp_lambda *
        mean(MTP CEs) + balance loss); no logits: a compiled backward would zero-fill a gradient that big.
        Eval mode: (logits, main CE), like any LM; no MTP. Without targets: last position's logits."""
        B, T = idx.shape
        if T > self.args.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.args.block_size}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.drop(self.tok_emb(idx))
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, counts, a = self.run_block(block, x, cos, sin)
            aux = aux + a
            if counts is not None and self.training:
                block.ffn.tokens_per_expert.add_(counts)
        h = self.norm(x)
        if targets is None:
            return self.head(h[:, [-1]]), None
        logits, loss = self.lm_loss(h, targets)
        if self.training and self.args.mtp_depth > 0 and T > self.args.mtp_depth:
            # depth k at position t sees h^{k-1}_t and token t+k, predicts t+k+1 (targets[t+k]); all t at once
            mtp_losses, hk = [], h
            for k, mod in enumerate(self.mtp, start=1):
                emb = self.tok_emb(idx[:, k:])
                hk, hn, counts, a = self.run_block(mod, hk[:, :T - k], emb, cos[:T - k], sin[:T - k])
                aux = aux + a
                if counts is not None:
                    mod.block.ffn.tokens_per_expert.add_(counts)
                mtp_losses.append(self.lm_loss(hn, targets[:, k:])[1])
            loss = loss + self.args.mtp_lambda * torch.stack(mtp_losses).mean()
        return (None, loss + aux) if self.training else (logits, loss)

    def use_liger(self):  # Liger's fused linear cross-entropy for the loss (liger-kernel installed, CUDA)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        # summed, not averaged: in fp16 its in-forward gradient x 1/tokens (before the loss scale) underflows
        flce = LigerFusedLinearCrossEntropyLoss(ignore_index=-1, reduction="sum")
        self.fused_ce = torch.compiler.disable(lambda w, h, t: flce(w, h, t) / (t >= 0).sum())  # (eagerly)

    def run_block(self, block, *xs):
        if self.use_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *xs, use_reentrant=False)
        return block(*xs)

    def lm_loss(self, h, targets):
        if self.fused_ce is not None:  # never materialises the (B, T, vocab) logits
            return None, self.fused_ce(self.head.weight, h.flatten(0, 1), targets.flatten())
        logits = self.head(h)
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    @torch.no_grad()
    def update_expert_bias(self, scale=None):
        """Once per optimizer step: b_i += speed * sign(mean_load - load_i) over the tokens counted (all
        ranks) since the last call (then cleared), re-centred. `scale` (0-d, 0 or 1) skips it without a
        host sync. Returns the mean MaxVio (max/mean - 1)."""
        if not (layers := self.moe_layers()):
            return None
        counts = torch.stack([m.tokens_per_expert for m in layers])         # (L, E)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        mean = counts.mean(-1, keepdim=True)
        delta = self.args.bias_update_speed * torch.sign(mean - counts) * (1 if scale is None else scale)
        for m, dl in zip(layers, delta):
            if m.gate.bias is not None:  # (softmax routing has no bias)
                m.gate.bias.add_(dl)
                centre = m.gate.bias.mean()  # a common shift changes no choice: keep the biases near 0
                m.gate.bias.sub_(centre if scale is None else centre * scale)  # (skipped step: as was)
            m.tokens_per_expert.zero_()
        return (counts.amax(-1) / mean.squeeze(-1).clamp_min(1e-9) - 1).mean()

    def make_cache(self, batch_size, max_len=None, device=None, dtype=torch.float32):
        """Per layer (main, then MTP): kv latent (B, S, kv_lora_rank), rotary key (B, S, qk_rope_head_dim)."""
        a, kw = self.args, dict(device=device or self.tok_emb.weight.device, dtype=dtype)
        shape = (batch_size, max_len or self.args.block_size)
        # separate tensors, not views of one: a compiled step then mutates inputs that alias nothing
        return [(torch.zeros(*shape, a.kv_lora_rank, **kw), torch.zeros(*shape, a.qk_rope_head_dim, **kw))
                for _ in range(a.n_layer + a.mtp_depth)]

    def cache_bytes_per_token(self, dtype=torch.bfloat16):
        """(MLA cache, an uncompressed per-head K/V cache) in bytes per token, main model."""
        a, b = self.args, torch.finfo(dtype).bits // 8
        return (a.n_layer * (a.kv_lora_rank + a.qk_rope_head_dim) * b,
                a.n_layer * a.n_head * (a.qk_head_dim + a.v_head_dim) * b)

    def rope_at(self, start_pos, T):
        if not isinstance(start_pos, torch.Tensor) and start_pos + T > self.args.block_size:
            raise ValueError(f"position {start_pos + T} exceeds block_size {self.args.block_size}")
        pos = start_pos + torch.arange(T, device=self.rope_cos.device)
        return self.rope_cos[pos], self.rope_sin[pos]

    @torch.no_grad()
    def forward_cached(self, idx, cache, start_pos=0):
        """Run new tokens idx (B, T) at positions start_pos.. against the cache, which they extend. Returns
        logits (B, T, vocab) and the final-normed hidden states (B, T, d) for the MTP. start_pos may be a
        0-dim device tensor (no host sync: CUDA-graphable); callers keep start_pos + T <= block_size."""
        cos, sin = self.rope_at(start_pos, idx.shape[1])
        x = self.tok_emb(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache[i], start_pos)[0]
        h = self.norm(x)
        return self.head(h), h

    @torch.no_grad()
    def mtp_cached(self, h, next_idx, cache, start_pos=0, depth=0):
        """MTP module `depth` at positions start_pos..: h (B, T, d) is the previous depth's hidden
        state there (forward_cached's h for depth 0) and next_idx (B, T) the tokens one position
        later. Returns logits for the tokens two positions later (a draft) and the new hidden."""
        cos, sin = self.rope_at(start_pos, h.shape[1])
        mod = self.mtp[depth]
        x, xn = mod(h, self.tok_emb(next_idx), cos, sin, cache[self.args.n_layer + depth], start_pos)[:2]
        return self.head(xn), x

    def get_num_params(self):
        """Counts for the main model (MTP apart): total, active per token, embedding; and mtp."""
        total = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("mtp."))
        mtp = sum(p.numel() for p in self.mtp.parameters())
        return {"total": total, "active": total - self.idle_params(self.blocks),
                "embedding": self.tok_emb.weight.numel(), "mtp": mtp}

    def idle_params(self, blocks):
        """Parameters of the routed experts a token does NOT use in these blocks."""
        a = self.args
        per_layer = (a.n_routed_experts - a.n_activated_experts) * 3 * a.n_embd * a.moe_inter_dim
        return per_layer * sum(b.is_moe for b in blocks)

    def estimate_flops_per_token(self, T=None):
        """Training FLOPs per token: 6 x active matmul weights (embedding lookup excluded, the head
        and the MTP modules included) plus attention's 6 * T * H * (qk_dim + v_dim) per layer."""
        a, n = self.args, self.get_num_params()
        matmul = n["active"] - (0 if a.tie_embeddings else n["embedding"])  # (tied: the head's matrix)
        mtp = n["mtp"] - self.idle_params([m.block for m in self.mtp])
        matmul += mtp + a.mtp_depth * self.head.weight.numel()  # each MTP module runs the head again
        attn = 6 * (a.n_layer + a.mtp_depth) * (T or a.block_size) * a.n_head * (a.qk_head_dim + a.v_head_dim)
        return 6 * matmul + attn

    def estimate_mfu(self, tokens_per_s, peak_flops=989e12, T=None):  # (989 TFLOP/s: an H100's bf16 dense)
        return self.estimate_flops_per_token(T) * tokens_per_s / peak_flops

    @torch.no_grad()
    def optimizer_step(self, optimizer, grad_norm):
        """The optimizer step and the expert-bias update, both skipped without a host sync when grad_norm
        is not finite (fused AdamW honours found_inf, as for GradScaler). Returns (finite 0-d, MaxVio)."""
        finite = torch.isfinite(grad_norm).float()
        optimizer.found_inf = 1.0 - finite
        optimizer.step()
        return finite, self.update_expert_bias(finite)

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        """AdamW; weight decay on matrices only (2-D and the 3-D expert stacks), never on norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # fused: one kernel for all parameters, and it can skip a step on the device (found_inf)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)


def pick_device(device="auto", dtype="auto", compile=None, moe_impl="auto"):
    """-> (device, dtype, compile, moe_impl, a line saying so): 'auto' by the GPU's class; or ValueError."""
    count = {"cpu": 1, "mps": int(torch.backends.mps.is_available()), "cuda": torch.cuda.device_count()}
    device = ("cuda" if count["cuda"] else "mps" if count["mps"] else "cpu") if device == "auto" else device
    kind, colon, i = device.partition(":")
    if kind not in count or colon and not (kind == "cuda" and i.isdigit()) or int(i or 0) >= count[kind]:
        raise ValueError(f"device='{device}' is not available here (use --device=cpu or --device=auto)")
    cuda, cc = kind == "cuda", torch.cuda.get_device_capability(device) if kind == "cuda" else (0, 0)
    name = f"{torch.cuda.get_device_name(device)} (sm{cc[0]}{cc[1]})" if cuda else kind
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)  # (older GPUs emulate it, slowly)
    triton = cc >= (7, 0) or not cuda  # torch.compile's GPU backend needs compute capability >= 7.0
    dtype = ("bfloat16" if bf16 else "float16" if cuda else "float32") if dtype == "auto" else dtype
    compile = cuda and triton if compile is None else compile
    if moe_impl == "auto":  # grouped_mm: fast on Hopper; on 8.x a loop over the experts that syncs
        moe_impl = "grouped" if cc >= (9, 0) and dtype == "bfloat16" else "padded"
    for bad, msg in [
        (dtype not in ("float32", "bfloat16", "float16"),
         f"dtype='{dtype}' must be 'auto', 'float32', 'bfloat16' or 'float16'"),
        (dtype == "float16" and not cuda, f"dtype='float16' needs a CUDA GPU: on {kind} use float32"),
        (dtype == "bfloat16" and not bf16, f"dtype='bfloat16' needs a GPU of compute capability 8+: {name}"),
        (not isinstance(compile, bool), f"compile={compile!r} must be True, False or None (= auto)"),
        (compile and not triton, f"compile=True: Triton needs a GPU of compute capability 7+: {name}"),
        (moe_impl == "grouped" and (dtype != "bfloat16" if cuda else kind != "cpu" or compile),
         "moe_impl='grouped' (torch._grouped_mm) needs CUDA in bfloat16, or an eager CPU: use padded")]:
        if bad:
            raise ValueError(msg)
    how = "compiled" if compile else "not compiled" + ("" if triton else " (Triton needs sm70 or newer)")
    return device, dtype, compile, moe_impl, f"{name}: {dtype}, {how}, {moe_impl} experts"


# ---- checkpoints (train.py and rl.py write them; sample.py, export.py and the resumes read them) -

class CheckpointError(ValueError):
    """A checkpoint that can't be used; the message is one line meant for the user."""


def save_checkpoint(path, ckpt, keep_prev=True):
    """Write ckpt to path via a temporary file flushed to disk and renamed over the old one (kept as
    *.prev.pt if keep_prev): a kill at any moment leaves the old or the new checkpoint, never half of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_prev and os.path.exists(path):
        os.replace(path, path.removesuffix(".pt") + ".prev.pt")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, map_location="cpu", moe_impl="auto"):
    """-> (DeepSeekV3 with the checkpoint's weights, the checkpoint dict); bad files raise CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path} (train one with train.py, or point out_dir at one)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {msg}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model'/'model_args')")
    if unknown := sorted(set(ckpt["model_args"]) - {f.name for f in fields(ModelArgs)}):
        raise CheckpointError(f"{path} is from a different architecture (unknown model args: {unknown[:5]})")
    try:
        args = ModelArgs(**{**ckpt["model_args"], "moe_impl": moe_impl})  # (saved: the trainer GPU's)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} holds impossible model args: {e}") from None
    model = DeepSeekV3(args)
    # a compiled model's state_dict carries this prefix; the weights are the same
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its model args ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected weights, e.g. {(missing or unexpected)[0]})")
    return model, ckpt
