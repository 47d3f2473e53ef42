"""CPU tests for model.py. Small configs, fp32, the whole file in well under a minute."""
import math
import os
import runpy
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, fake_device, rel, tokens

from model import MLA, DeepSeekV3, Gate, ModelArgs, MoE, apply_rope, pick_device, rope_tables


def small(**kw):
    base = dict(block_size=64, vocab_size=96, n_layer=3, n_head=4, n_embd=64, q_lora_rank=32,
                kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                inter_dim=96, n_dense_layers=1, moe_inter_dim=24, n_routed_experts=8,
                n_activated_experts=2, n_expert_groups=4, n_limited_groups=2, n_shared_experts=1,
                mtp_depth=1, seq_aux_alpha=1e-4)
    base.update(kw)
    return ModelArgs(**base)


def model_of(args, seed=0):
    torch.manual_seed(seed)
    return DeepSeekV3(args)


# ---- RoPE ------------------------------------------------------------------------------------

def test_rope_inverse_frequencies_values():
    a = small(qk_rope_head_dim=32, rope_theta=10000.0)
    cos, sin = rope_tables(a)
    # position 1 holds the angles themselves: theta_i = 10000^(-2i/32)
    angles = torch.atan2(sin[1], cos[1])
    expected = torch.tensor([10000.0 ** (-2 * i / 32) for i in range(16)])
    assert torch.allclose(angles, expected, rtol=1e-5, atol=1e-7)
    assert angles[0].item() == pytest.approx(1.0) and angles[-1].item() == pytest.approx(10000 ** (-30 / 32), rel=1e-5)
    # the wrong parentheses (1 / (theta ** arange) / d) would give nearly zero for every i > 0
    assert angles[1].item() > 0.5


def test_rope_is_complex_rotation_of_adjacent_pairs():
    a = small()
    cos, sin = rope_tables(a)
    T, d = 10, a.qk_rope_head_dim
    x = torch.randn(2, T, 3, d)
    out = apply_rope(x, cos[:T], sin[:T])
    z = torch.view_as_complex(x.reshape(2, T, 3, d // 2, 2))
    rot = torch.polar(torch.ones_like(cos[:T]), torch.atan2(sin[:T], cos[:T]))[None, :, None, :]
    ref = torch.view_as_real(z * rot).flatten(-2)
    assert torch.allclose(out, ref, atol=1e-6)
    # relative positions only: <R(m) q, R(n) k> depends on m - n
    q, k = torch.randn(d), torch.randn(d)
    def dot(m, n):
        qm = apply_rope(q.view(1, 1, 1, d), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, d), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()
    assert dot(7, 3) == pytest.approx(dot(5, 1), abs=1e-5)


def test_yarn_frequencies_and_mscale():
    a = small(qk_rope_head_dim=32, rope_factor=4.0, original_seq_len=16, block_size=64, mscale=1.0)
    plain = small(qk_rope_head_dim=32)
    cos, sin = rope_tables(a)
    c0, s0 = rope_tables(plain)
    f, f0 = torch.atan2(sin[1], cos[1]), torch.atan2(s0[1], c0[1])
    # high-frequency dims keep their frequency, the lowest ones are divided by the factor
    assert f[0].item() == pytest.approx(f0[0].item(), rel=1e-6)
    assert f[-1].item() == pytest.approx(f0[-1].item() / 4.0, rel=1e-5)
    assert torch.all(f <= f0 * (1 + 1e-5)) and torch.all(f >= f0 / 4.0 * (1 - 1e-5))
    m = 0.1 * math.log(4.0) + 1.0
    assert MLA(a).scale == pytest.approx(m * m / math.sqrt(a.qk_head_dim))
    assert MLA(plain).scale == pytest.approx(1 / math.sqrt(plain.qk_head_dim))


# ---- attention, causality, cache --------------------------------------------------------------

@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_causality(q_lora_rank):
    a = small(q_lora_rank=q_lora_rank)
    m = model_of(a).eval()
    x = tokens(a)
    y = torch.zeros_like(x)
    with torch.no_grad():
        l1, _ = m(x, y)
        x2 = x.clone()
        x2[:, 15:] = (x2[:, 15:] + 7) % a.vocab_size
        l2, _ = m(x2, y)
    assert torch.allclose(l1[:, :15], l2[:, :15], atol=1e-6, rtol=0)  # bitwise may differ: other batching
    assert (l1[:, 15:] - l2[:, 15:]).abs().amax(-1).min() > 1e-3  # every later position changes


def test_every_head_reads_the_whole_latent():
    """Each head's keys and values are rebuilt from the WHOLE kv latent, not from a 1/n_head slice of
    it: nudge any one latent channel and every head's output moves."""
    a = small()
    attn = MLA(a)
    x = torch.randn(1, 5, a.n_embd)
    cos, sin = rope_tables(a)
    nudge, seen = {}, {}
    attn.kv_norm.register_forward_hook(lambda mod, inp, out: out + nudge["d"])
    attn.wo.register_forward_pre_hook(lambda mod, inp: seen.update(y=inp[0]))  # the heads, side by side

    def heads(d):
        nudge["d"] = d
        with torch.no_grad():
            attn(x, cos[:5], sin[:5])
        return seen["y"].view(5, a.n_head, a.v_head_dim)
    before = heads(0.0)
    for c in range(a.kv_lora_rank):
        moved = (heads(F.one_hot(torch.tensor(c), a.kv_lora_rank).float()) - before).abs().amax(dim=(0, 2))
        assert (moved > 1e-4).all(), f"latent channel {c} reaches only heads {moved.nonzero().flatten()}"


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=0), dict(rope_factor=2.0, original_seq_len=16),
                                dict(n_routed_experts=0, n_dense_layers=0)])
def test_cached_decode_matches_full_forward(kw):
    a = small(**kw)
    m = model_of(a).eval()
    x = tokens(a, B=3, T=20)
    with torch.no_grad():
        full, _ = m(x, torch.zeros_like(x))
        # prefill 7, then one token at a time, then a chunk of 3, then one by one
        cache = m.make_cache(3)
        outs = [m.forward_cached(x[:, :7], cache, 0)[0]]
        pos = 7
        for step in [1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1]:
            outs.append(m.forward_cached(x[:, pos:pos + step], cache, pos)[0])
            pos += step
        cached = torch.cat(outs, dim=1)
    assert cached.shape == full.shape
    assert rel(cached, full) <= 1e-5


def test_cache_size_per_token():
    a = small()
    m = model_of(a)
    mla, per_head = m.cache_bytes_per_token(torch.bfloat16)
    assert mla == a.n_layer * (a.kv_lora_rank + a.qk_rope_head_dim) * 2
    assert per_head == a.n_layer * a.n_head * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * 2
    cache = m.make_cache(2, 16)
    assert len(cache) == a.n_layer + a.mtp_depth
    assert cache[0][0].shape == (2, 16, a.kv_lora_rank) and cache[0][1].shape == (2, 16, a.qk_rope_head_dim)


def test_sequence_longer_than_block_size_raises():
    a = small(block_size=16)
    m = model_of(a)
    with pytest.raises(ValueError, match="block_size"):
        m(tokens(a, T=17))
    with pytest.raises(ValueError, match="block_size"):
        m.forward_cached(tokens(a, T=5), m.make_cache(2), start_pos=12)


def test_attention_dropout_only_in_training():
    a = small(dropout=0.3)
    m = model_of(a)
    x = tokens(a)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x, x)[0], m(x, x)[0])
    m.train()
    with torch.no_grad():
        assert not torch.equal(m(x, x)[1], m(x, x)[1])


# ---- MoE ------------------------------------------------------------------------------------

def experts_by_hand(moe, x, w, idx):
    """The routed experts the plain way: token by token, sum_k w_k * expert_k(x)."""
    rows = []
    for n in range(x.shape[0]):
        y = torch.zeros(x.shape[1])
        for k, e in enumerate(idx[n].tolist()):
            y = y + w[n, k] * (moe.w2[e] @ (F.silu(moe.w1[e] @ x[n]) * (moe.w3[e] @ x[n])))
        rows.append(y)
    return torch.stack(rows)


def moe_grads(a, impl, x):
    """y, counts, and the gradients of x and of every parameter; impl None: the experts by hand."""
    torch.manual_seed(3)
    moe = MoE(replace(a, moe_impl=impl or "auto"))
    if impl is None:
        moe.run_experts = lambda xf, w, idx, counts, group: experts_by_hand(moe, xf, w, idx)
    with torch.no_grad():
        for p in (moe.w1, moe.w3, moe.w2, moe.gate.weight):
            p.normal_(0, 0.2)
    moe.train()
    x = x.clone().requires_grad_(True)
    y, counts, aux = moe(x)
    (y.square().sum() + aux).backward()
    return y, counts, x.grad, {n: p.grad for n, p in moe.named_parameters()}


@pytest.mark.parametrize("impl", ["grouped", "padded"])
@pytest.mark.parametrize("n", [33, 1, 200])
def test_experts_match_a_by_hand_reference(impl, n):
    """Both expert paths, in fp32: outputs and gradients those of the experts run token by token; 1 token (a
    decode step: tiles of one row) and 200 (tiles of several rows, padded) too."""
    a = small()
    x = torch.randn(1, n, a.n_embd)
    y0, c0, gx0, g0 = moe_grads(a, None, x)
    y1, c1, gx1, g1 = moe_grads(a, impl, x)
    assert torch.equal(c0, c1) and c0.sum() == n * a.n_activated_experts
    assert rel(y1, y0) < 1e-5
    assert rel(gx1, gx0) < 1e-5
    for n in g0:
        assert rel(g1[n], g0[n]) < 1e-5, n


def test_experts_with_no_tokens_and_experts_with_all():
    """Any routing, no token dropped, the two paths alike: every token on two experts (the others idle: the
    grouped path's empty groups), on the first and the last, spread out."""
    a = small(n_expert_groups=1, n_limited_groups=1)
    x = torch.randn(2, 40, a.n_embd)
    torch.manual_seed(0)
    moe = MoE(replace(a, moe_impl="padded"))
    ref = MoE(replace(a, moe_impl="grouped"))
    ref.load_state_dict(moe.state_dict())
    for bias in ([9.0, 9.0] + [0.0] * 6, [9.0] + [0.0] * 6 + [9.0], [0.0] * 8):
        for m in (moe, ref):
            m.gate.bias[:] = torch.tensor(bias)
        y, counts, _ = moe(x)
        assert counts.sum() == 80 * a.n_activated_experts and counts.max() >= 80 * (bias[0] > 0)
        assert rel(y, ref(x)[0]) < 1e-6


def test_bias_changes_selection_not_gate_weights():
    a = small(n_expert_groups=1, n_limited_groups=1, route_scale=2.5)
    gate = Gate(a)
    x = torch.randn(50, a.n_embd)
    w0, idx0, scores = gate(x)
    gate.bias[5] = 10.0  # now expert 5 is always picked
    w1, idx1, scores1 = gate(x)
    assert torch.equal(scores, scores1)
    assert (idx1 == 5).any(-1).all() and not (idx0 == 5).any(-1).all()
    # the weights are the UNBIASED scores of the chosen experts, normalised, times route_scale
    expected = scores.gather(1, idx1)
    expected = expected / expected.sum(-1, keepdim=True) * 2.5
    assert torch.allclose(w1, expected, atol=1e-6)
    assert torch.allclose(w1.sum(-1), torch.full((50,), 2.5), atol=1e-5)


def test_softmax_scores_are_not_renormalised():
    a = small(score_func="softmax", n_expert_groups=1, n_limited_groups=1)
    gate = Gate(a)
    x = torch.randn(20, a.n_embd)
    w, idx, scores = gate(x)
    assert torch.allclose(scores.sum(-1), torch.ones(20), atol=1e-6)
    assert torch.allclose(w, scores.gather(1, idx))


def test_softmax_routing_is_v2s():
    """score_func='softmax' (DeepSeek-V2): no balancing bias, and groups ranked by their BEST score, not
    by the sum of their two best (DeepSeek's Gate: amax when there is no bias)."""
    a = small(score_func="softmax", n_routed_experts=8, n_expert_groups=4, n_limited_groups=2,
              n_activated_experts=2, route_scale=1.5)
    gate = Gate(a)
    assert gate.bias is None and "bias" not in gate.state_dict()
    # one token whose logits are column 0 of the gate: groups of 2 experts
    logits = torch.tensor([3.0, -5.0, 2.2, 2.0, 2.5, -5.0, -5.0, -5.0])
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = logits
    w, idx, scores = gate(F.one_hot(torch.tensor([0]), a.n_embd).float())
    # by hand: best scores per group 3.0, 2.2, 2.5, -5 -> groups 0 and 2 -> experts 0 and 4 (the top-2 sums,
    # e^3 + e^-5 = 20.1, e^2.2 + e^2 = 16.4, e^2.5 = 12.2, would keep groups 0 and 1 and pick expert 2)
    p = logits.exp() / logits.exp().sum()
    assert idx[0].sort().values.tolist() == [0, 4]
    assert torch.allclose(w[0], 1.5 * p[idx[0]], atol=1e-7)  # softmax weights: not renormalised
    m = model_of(replace(a, bias_update_speed=0.1)).train()
    m(tokens(a), tokens(a))[1].backward()
    assert m.update_expert_bias() is not None and all(l.tokens_per_expert.sum() == 0 for l in m.moe_layers())


def test_group_limited_routing_stays_in_chosen_groups():
    a = small(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)
    gate = Gate(a)
    gate.bias.normal_(0, 0.1)
    x = torch.randn(500, a.n_embd)
    w, idx, scores = gate(x)
    biased = (scores + gate.bias).view(-1, 4, 4)
    top_groups = biased.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # (N, 2)
    chosen_groups = idx // 4
    assert (chosen_groups.unsqueeze(-1) == top_groups.unsqueeze(1)).any(-1).all()
    # and within the allowed groups it is the plain top-k of biased scores
    allowed = torch.zeros(500, 4, dtype=torch.bool).scatter_(1, top_groups, True)
    masked = biased.masked_fill(~allowed.unsqueeze(-1), -1e9).flatten(1)
    assert torch.equal(idx.sort(-1).values, masked.topk(3, dim=-1).indices.sort(-1).values)


def test_ep_ranks_per_token_and_the_group_limit():
    """Expert parallelism's fan-out: how many of ep ranks (16 / ep consecutive experts each) a token's experts
    are on. Group-limited routing, one group per rank, caps it at n_limited_groups; plain top-k does not."""
    def ep_ranks_per_token(idx, n_routed_experts, ep):  # (the mean over the tokens idx (N, k))
        on = torch.zeros(len(idx), ep).scatter_(1, idx // (n_routed_experts // ep), 1.0)
        return on.sum(1).mean().item()
    idx = torch.tensor([[0, 1, 2], [0, 1, 5], [4, 8, 12]])  # on 4 ranks: 1, 2 and 3 of them
    assert ep_ranks_per_token(idx, 16, 4) == pytest.approx(2.0)
    a = small(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)
    limited, free = Gate(a), Gate(replace(a, n_expert_groups=1, n_limited_groups=1))
    free.load_state_dict(limited.state_dict())  # the same scores, with and without the group limit
    x = torch.randn(500, a.n_embd)
    assert ep_ranks_per_token(limited(x)[1], 16, 4) <= 2 < ep_ranks_per_token(free(x)[1], 16, 4)


def test_bias_update_direction_and_counts_cleared():
    a = small(bias_update_speed=0.01)
    m = model_of(a).train()
    x = tokens(a, B=4, T=32)
    m(x, x)[1].backward()
    layers = m.moe_layers()
    assert len(layers) == (a.n_layer - a.n_dense_layers) + a.mtp_depth
    counts = [l.tokens_per_expert.clone() for l in layers]
    assert counts[0].sum() == 4 * 32 * a.n_activated_experts          # a main block: every token
    assert counts[-1].sum() == 4 * 31 * a.n_activated_experts         # MTP block: T - 1 positions
    biases = [l.gate.bias.clone() for l in layers]
    maxvio = m.update_expert_bias()
    c = counts[0]
    expected = 0.01 * torch.sign(c.mean() - c)
    expected = expected - expected.mean()
    assert torch.allclose(layers[0].gate.bias - biases[0], expected, atol=1e-7)
    over, under = c.argmax(), c.argmin()
    assert layers[0].gate.bias[over] < biases[0][over] and layers[0].gate.bias[under] > biases[0][under]
    assert maxvio.item() == pytest.approx(
        torch.stack([(k.max() / k.mean() - 1) for k in counts]).mean().item(), rel=1e-5)
    assert all(l.tokens_per_expert.sum() == 0 for l in layers)
    # eval forwards count nothing
    m.eval()
    with torch.no_grad():
        m(x, x)
    assert all(l.tokens_per_expert.sum() == 0 for l in layers)


def test_optimizer_step_skips_a_non_finite_step_on_the_device():
    """model.optimizer_step: a NaN gradient norm leaves parameters, AdamW's moments and step count,
    and the expert biases as they were (and still clears the counts); a finite one moves them."""
    a = small(bias_update_speed=0.01)
    m = model_of(a).train()
    opt = m.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
    x = tokens(a, B=4, T=32)

    def snapshot():
        return ([p.detach().clone() for p in m.parameters()], [l.gate.bias.clone() for l in m.moe_layers()],
                {k: v.clone() for st in opt.state.values() for k, v in st.items()})

    for norm, moves in ((torch.tensor(1.0), True), (torch.tensor(float("nan")), False), (torch.tensor(2.0), True)):
        m(x, x)[1].backward()
        before = snapshot()
        finite, maxvio = m.optimizer_step(opt, norm)
        after = snapshot()
        assert finite.item() == float(moves) and torch.isfinite(maxvio)
        same = [torch.equal(u, v) for u, v in zip(before[0] + before[1], after[0] + after[1])]
        assert (not any(same)) if moves else all(same)
        if before[2]:  # the optimizer's state exists after the first step
            assert all(torch.equal(before[2][k], after[2][k]) for k in before[2]) != moves
        assert all(l.tokens_per_expert.sum() == 0 for l in m.moe_layers())
        opt.zero_grad(set_to_none=True)
    assert {float(st["step"]) for st in opt.state.values()} == {2.0}


def test_bias_is_a_saved_fp32_buffer_outside_the_optimizer():
    a = small()
    m = model_of(a)
    sd = m.state_dict()
    bias_keys = [k for k in sd if k.endswith("gate.bias")]
    assert bias_keys and all(sd[k].dtype == torch.float32 for k in bias_keys)
    assert not any(k.endswith("tokens_per_expert") for k in sd)
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(m.get_buffer(k)) not in in_opt for k in bias_keys)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for n, p in m.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), n
    assert id(m.blocks[1].ffn.w1) in decayed and id(m.norm.weight) not in decayed


def test_seq_aux_loss_by_hand():
    """Paper eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch, where f_i counts expert
    i among each token's top-K UNBIASED affinities s_{i,t} (not the biased, group-limited choice)."""
    a = small(seq_aux_alpha=0.5, n_expert_groups=4, n_limited_groups=2)
    torch.manual_seed(0)
    moe = MoE(a).train()
    moe.gate.bias.copy_(torch.tensor([0.3, -0.3, 0.0, 0.2, -0.2, 0.1, 0.0, -0.1]))  # steers the choice
    x = torch.randn(2, 7, a.n_embd)
    _, _, aux = moe(x)
    E, K, T = a.n_routed_experts, a.n_activated_experts, 7
    total, differs = 0.0, False
    for b in range(2):
        _, chosen, scores = moe.gate(x[b])
        f = torch.zeros(E)
        for t in range(T):
            s = scores[t].tolist()
            top = sorted(range(E), key=lambda i: -s[i])[:K]
            differs |= sorted(top) != sorted(chosen[t].tolist())
            for e in top:
                f[e] += E / (K * T)
        P = [sum(scores[t, i].item() / sum(scores[t].tolist()) for t in range(T)) / T for i in range(E)]
        total += sum(f[i].item() * P[i] for i in range(E))
    assert differs  # the example tells the two apart
    assert aux.item() == pytest.approx(0.5 * total / 2, rel=1e-5)
    moe.eval()
    assert moe(x)[2].item() == 0.0


def test_noisy_topk_only_in_training():
    a = small(noisy_topk=True, noise_std=0.5, n_expert_groups=1, n_limited_groups=1)
    gate = Gate(a)
    x = torch.randn(200, a.n_embd)
    gate.eval()
    assert torch.equal(gate(x)[1], gate(x)[1])
    gate.train()
    assert not torch.equal(gate(x)[1], gate(x)[1])


# ---- MTP and the loss -------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_by_hand(depth):
    a = small(mtp_depth=depth, seq_aux_alpha=0.0, mtp_lambda=0.3)
    m = model_of(a).train()
    x = tokens(a, T=16)
    y = tokens(a, T=16, seed=5)
    _, loss = m(x, y)
    # by hand: run the trunk, then module k on positions 0..T-k-1 with tokens x[t+k], target y[t+k]
    with torch.no_grad():
        T = 16
        cos, sin = m.rope_cos[:T], m.rope_sin[:T]
        h = m.tok_emb(x)
        for blk in m.blocks:
            h = blk(h, cos, sin)[0]
        h = m.norm(h)
        main = F.cross_entropy(m.head(h).flatten(0, 1), y.flatten())
        ces, hk = [], h
        for k in range(1, depth + 1):
            mod = m.mtp[k - 1]
            e = m.tok_emb(x[:, k:])
            hk = mod.block(mod.eh_proj(torch.cat([mod.enorm(e), mod.hnorm(hk[:, :T - k])], -1)),
                           cos[:T - k], sin[:T - k])[0]
            ces.append(F.cross_entropy(m.head(mod.norm(hk)).flatten(0, 1), y[:, k:].flatten()))
        expected = main + 0.3 * torch.stack(ces).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    m.eval()
    with torch.no_grad():
        assert m(x, y)[1].item() == pytest.approx(main.item(), rel=1e-5)  # eval: main CE only


def test_mtp_cached_matches_training_path():
    a = small(mtp_depth=1)
    m = model_of(a).eval()
    x = tokens(a, B=2, T=12)
    with torch.no_grad():
        cache = m.make_cache(2)
        _, h = m.forward_cached(x, cache, 0)
        draft_full, _ = m.mtp_cached(h[:, :-1], x[:, 1:], cache, 0)
        # the same drafts one position at a time
        cache2 = m.make_cache(2)
        _, h2 = m.forward_cached(x, cache2, 0)
        steps = [m.mtp_cached(h2[:, t:t + 1], x[:, t + 1:t + 2], cache2, t)[0] for t in range(11)]
        # and from the training formulation
        T = 11
        mod = m.mtp[0]
        hk = mod(h[:, :T], m.tok_emb(x[:, 1:]), m.rope_cos[:T], m.rope_sin[:T])[0]
        ref = m.head(mod.norm(hk))
    assert rel(draft_full, ref) < 1e-5
    assert rel(torch.cat(steps, 1), ref) < 1e-5


def test_plain_inference_skips_mtp():
    a = small()
    m = model_of(a).eval()
    x = tokens(a)
    with torch.no_grad():
        before = m(x)[0]
        for p in m.mtp.parameters():
            p.add_(1.0)
        assert torch.equal(before, m(x)[0])
    assert m(x)[0].shape == (2, 1, a.vocab_size)


# ---- accounting -------------------------------------------------------------------------------

def test_parameter_counts_by_hand():
    a = small(q_lora_rank=32, mtp_depth=1, n_layer=3, n_dense_layers=1, tie_embeddings=False)
    m = model_of(a)
    d, V, H = 64, 96, 4
    attn = (d * 32 + 32 + 32 * H * 24) + (d * (16 + 8) + 16 + 16 * H * (16 + 12)) + H * 12 * d
    norms = 2 * d
    dense = 3 * d * 96
    expert = 3 * d * 24
    moe = 8 * expert + 1 * expert + 8 * d  # routed + shared + router
    total = V * d + d * V + d + (attn + norms + dense) + 2 * (attn + norms + moe)
    n = m.get_num_params()
    assert n["total"] == total
    assert n["embedding"] == V * d
    assert n["active"] == total - 2 * (8 - 2) * expert
    assert n["mtp"] == 2 * d + 2 * d * d + attn + norms + moe + d
    assert sum(p.numel() for p in m.parameters()) == n["total"] + n["mtp"]
    tied = model_of(replace(a, tie_embeddings=True)).get_num_params()
    assert tied["total"] == total - V * d
    # FLOPs: 6 x matmul weights per token + attention
    f = m.estimate_flops_per_token(T=64)
    mtp_active = n["mtp"] - (8 - 2) * expert
    expected = 6 * (n["active"] - V * d + mtp_active + V * d) + 6 * 4 * 64 * H * (24 + 12)
    assert f == expected
    assert m.estimate_flops_per_token(T=16) < f
    assert m.estimate_mfu(2e5, 989e12, T=64) == pytest.approx(f * 2e5 / 989e12)  # MFU: that over a peak


def test_differences_ignore_training_only_knobs():
    """ModelArgs.differences: what train.py's resume refuses to change (and export.py's round trip checks)."""
    a = small()
    assert a.differences(replace(a, dropout=0.2, seq_aux_alpha=0.0, mtp_lambda=1.0, moe_impl="padded")) == []
    assert a.differences(replace(a, n_layer=4, score_func="softmax")) == ["n_layer", "score_func"]
    assert a.differences(replace(a, beta_fast=16, mscale=0.5)) == []  # YaRN is off in both
    yarn = replace(a, rope_factor=2.0)
    assert yarn.differences(replace(yarn, beta_fast=16)) == ["beta_fast"]
    assert yarn.differences(a) == ["rope_factor"]


def test_flagship_parameter_counts():
    """config/tinystories_16x4.py's counts, as its header and the README state them."""
    cfg = runpy.run_path(os.path.join(ROOT, "config", "tinystories_16x4.py"))
    a = ModelArgs(**{f.name: cfg[f.name] for f in fields(ModelArgs) if f.name in cfg})
    assert a == ModelArgs()  # the defaults are the flagship
    with torch.device("meta"):
        n = DeepSeekV3(a).get_num_params()
    assert n == {"total": 123_849_728, "active": 78_433_280, "embedding": 25_755_648, "mtp": 10_447_680}


# ---- the device's class decides precision, compile and the expert path ---------------------

@pytest.mark.parametrize("cc,mps,expected", [
    ((9, 0), False, ("cuda", "bfloat16", True, "grouped", "GPU90 (sm90): bfloat16, compiled, grouped experts")),
    ((10, 0), False, ("cuda", "bfloat16", True, "grouped", "GPU100 (sm100): bfloat16, compiled, grouped experts")),
    ((8, 0), False, ("cuda", "bfloat16", True, "padded", "GPU80 (sm80): bfloat16, compiled, padded experts")),
    ((8, 6), False, ("cuda", "bfloat16", True, "padded", "GPU86 (sm86): bfloat16, compiled, padded experts")),
    ((8, 9), False, ("cuda", "bfloat16", True, "padded", "GPU89 (sm89): bfloat16, compiled, padded experts")),
    ((7, 5), False, ("cuda", "float16", True, "padded", "GPU75 (sm75): float16, compiled, padded experts")),
    ((7, 0), False, ("cuda", "float16", True, "padded", "GPU70 (sm70): float16, compiled, padded experts")),
    ((6, 0), False, ("cuda", "float16", False, "padded",
                     "GPU60 (sm60): float16, not compiled (Triton needs sm70 or newer), padded experts")),
    (None, True, ("mps", "float32", False, "padded", "mps: float32, not compiled, padded experts")),
    (None, False, ("cpu", "float32", False, "padded", "cpu: float32, not compiled, padded experts")),
])
def test_each_device_class_gets_its_path(monkeypatch, cc, mps, expected):
    """'auto' everywhere: bf16 only where native (a P100 or T4 would emulate it), Triton from sm70, grouped_mm
    on Hopper and newer; the line says what was picked."""
    fake_device(monkeypatch, cc, mps)
    assert pick_device() == expected


@pytest.mark.parametrize("cc,kw,expected", [
    ((9, 0), dict(dtype="float16"), ("float16", True, "padded")),  # (grouped_mm: bf16)
    ((9, 0), dict(dtype="float32", compile=False), ("float32", False, "padded")),
    ((9, 0), dict(moe_impl="padded"), ("bfloat16", True, "padded")),
    ((8, 0), dict(moe_impl="grouped", compile=False), ("bfloat16", False, "grouped")),
    ((8, 6), dict(dtype="float16"), ("float16", True, "padded")),
    ((7, 5), dict(dtype="float32", compile=False), ("float32", False, "padded")),
    ((6, 0), dict(dtype="float32"), ("float32", False, "padded")),
    (None, dict(compile=True), ("float32", True, "padded")),  # (the CPU compiles through C++)
    (None, dict(moe_impl="grouped"), ("float32", False, "grouped")),  # (eager CPU: fp32 grouped_mm runs)
])
def test_knobs_force_each_choice(monkeypatch, cc, kw, expected):
    fake_device(monkeypatch, cc)
    assert pick_device(**kw)[1:4] == expected


@pytest.mark.parametrize("cc,mps,kw,needle", [
    (None, False, dict(dtype="float16"), "dtype='float16' needs a CUDA GPU"),
    (None, True, dict(dtype="float16"), "dtype='float16' needs a CUDA GPU"),
    (None, False, dict(dtype="bfloat16"), "dtype='bfloat16' needs a GPU of compute capability 8+"),
    ((7, 5), False, dict(dtype="bfloat16"), "dtype='bfloat16' needs a GPU of compute capability 8+: GPU75"),
    ((6, 0), False, dict(compile=True), "compile=True: Triton needs a GPU of compute capability 7+: GPU60"),
    ((7, 5), False, dict(moe_impl="grouped"), "moe_impl='grouped'"),
    ((9, 0), False, dict(moe_impl="grouped", dtype="float16"), "moe_impl='grouped'"),
    (None, False, dict(moe_impl="grouped", compile=True), "moe_impl='grouped'"),
    (None, True, dict(moe_impl="grouped"), "moe_impl='grouped'"),
    (None, False, dict(dtype="int8"), "dtype='int8' must be"),
    (None, False, dict(compile="maybe"), "compile='maybe' must be True, False or None"),
    (None, False, dict(device="cuda"), "device='cuda' is not available"),
])
def test_what_a_device_cannot_run_is_one_line(monkeypatch, cc, mps, kw, needle):
    fake_device(monkeypatch, cc, mps)
    with pytest.raises(ValueError) as e:
        pick_device(**kw)
    assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,field", [
    (dict(n_activated_experts=9), "n_activated_experts"),
    (dict(n_activated_experts=0), "n_activated_experts"),
    (dict(n_expert_groups=3), "n_expert_groups"),
    (dict(n_limited_groups=5), "n_limited_groups"),
    (dict(n_expert_groups=4, n_limited_groups=1, n_activated_experts=3), "n_limited_groups"),
    (dict(n_expert_groups=8, n_limited_groups=2), "n_expert_groups"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(n_embd=0), "n_embd"),
    (dict(n_head=-2), "n_head"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(score_func="relu"), "score_func"),
    (dict(moe_impl="loop"), "moe_impl"),
    (dict(rope_factor=2.0, beta_fast=1, beta_slow=32), "beta_fast"),
    (dict(beta_fast=4, beta_slow=4), "beta_fast"),
    (dict(beta_slow=0), "beta_fast"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_dense_layers=4), "n_dense_layers"),
    (dict(rope_factor=0.5), "rope_factor"),
    (dict(block_size=2.5), "block_size"),
    (dict(mtp_depth=-1), "mtp_depth"),
])
def test_impossible_args_raise(kw, field):
    with pytest.raises(ValueError, match=field):
        small(**kw)


# ---- training ---------------------------------------------------------------------------------

def test_overfits_one_batch():
    a = small(mtp_depth=1)
    m = model_of(a).train()
    x = tokens(a, B=4, T=32)
    y = torch.roll(x, -1, dims=1)
    opt = m.configure_optimizers(0.0, 3e-3, (0.9, 0.95))
    first = None
    for _ in range(60):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.update_expert_bias()
        first = first if first is not None else loss.item()
    m.eval()
    with torch.no_grad():
        final = m(x, y)[1].item()
    assert first > 4.0 and final < 0.5


def test_checkpointing_gives_same_loss_and_grads():
    a = small(dropout=0.1, noisy_topk=True)
    m = model_of(a).train()
    x = tokens(a)
    torch.manual_seed(7)
    l0 = m(x, x)[1]
    l0.backward()
    g0 = [p.grad.clone() for p in m.parameters()]
    c0 = [l.tokens_per_expert.clone() for l in m.moe_layers()]
    m.zero_grad()
    for l in m.moe_layers():
        l.tokens_per_expert.zero_()
    m.use_checkpointing = True
    torch.manual_seed(7)
    l1 = m(x, x)[1]
    l1.backward()
    assert l1.item() == pytest.approx(l0.item(), rel=1e-6)
    for p, g in zip(m.parameters(), g0):
        assert torch.allclose(p.grad, g, atol=1e-6)
    # the recompute in backward must not count tokens a second time
    assert all(torch.equal(l.tokens_per_expert, c) for l, c in zip(m.moe_layers(), c0))


class ZeroFills(torch.utils._python_dispatch.TorchDispatchMode):
    """The shapes of the tensors zero-filled while it is on."""
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "zero" in func.__name__ or "fill" in func.__name__:
            self.shapes.append(tuple(out.shape))
        return out


def test_compile_fullgraph_training_step():
    a = small(n_layer=2, mtp_depth=1)
    m = model_of(a).train()
    x = tokens(a, B=2, T=16)
    ref_loss = m(x, x)[1]
    ref_loss.backward()
    ref_grad = m.blocks[1].ffn.w1.grad.clone()
    m.zero_grad()
    for l in m.moe_layers():
        l.tokens_per_expert.zero_()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")  # (inductor's kernels: tests/test_gpu.py)
    logits, loss = cm(x, x)
    with ZeroFills() as fills:  # a logits output would get a zero gradient filled, the logits' size
        loss.backward()
    assert (*x.shape, a.vocab_size) not in fills.shapes and logits is None
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert rel(m.blocks[1].ffn.w1.grad, ref_grad) < 1e-4
    assert m.blocks[1].ffn.tokens_per_expert.sum() == 2 * 16 * a.n_activated_experts


def test_cached_decode_with_device_positions():
    # start_pos as a 0-dim tensor (the CUDA-graph path) gives the same logits as int positions
    a = small()
    m = model_of(a).eval()
    x = tokens(a, B=2, T=12)
    with torch.no_grad():
        c1, c2 = m.make_cache(2), m.make_cache(2)
        ref = [m.forward_cached(x[:, :5], c1, 0)[0]]
        got = [m.forward_cached(x[:, :5], c2, torch.tensor(0))[0]]
        for t in range(5, 12):
            ref.append(m.forward_cached(x[:, t:t + 1], c1, t)[0])
            logits, h = m.forward_cached(x[:, t:t + 1], c2, torch.tensor(t))
            got.append(logits)
        d1 = m.mtp_cached(h, x[:, 11:12], c1, 11)[0]
        d2 = m.mtp_cached(h, x[:, 11:12], c2, torch.tensor(11))[0]
    assert rel(torch.cat(got, 1), torch.cat(ref, 1)) < 1e-6
    assert rel(d2, d1) < 1e-6
