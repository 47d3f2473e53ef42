"""CPU tests for sample.py: the cached and speculative decoders against plain recomputation, the
sampling filters and the speculative-sampling rule against exact math, and the command line."""
import os
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, save_ckpt

import sample
from model import DeepSeekV3, ModelArgs
from sample import filter_logits, generate, generate_speculative, speculative_accept, window_starts


def small(**kw):
    base = dict(block_size=16, vocab_size=48, n_layer=2, n_head=2, n_embd=32, q_lora_rank=16,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, inter_dim=48,
                n_dense_layers=1, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2,
                n_shared_experts=1, mtp_depth=1)
    base.update(kw)
    return ModelArgs(**base)


def model_of(args, seed=0, head_scale=1.0):
    torch.manual_seed(seed)
    m = DeepSeekV3(args).eval()
    if head_scale != 1.0:  # peakier distributions than the N(0, 0.02) init gives
        with torch.no_grad():
            m.head.weight.mul_(head_scale)
    return m


def prompt(B, T, V, seed):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))



@pytest.fixture(scope="module")
def trained():
    """A model whose main path and MTP have learnt a little: sequences that count up by a fixed
    stride (mod vocab), so the next-next token is predictable and drafts get accepted."""
    a = small(block_size=32, vocab_size=32)
    m = model_of(a, seed=3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    m.train()
    for _ in range(40):
        start = torch.randint(0, 32, (8, 1), generator=g)
        stride = torch.randint(1, 4, (8, 1), generator=g)
        seq = (start + stride * torch.arange(33)) % 32
        _, loss = m(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


# ---- filters ---------------------------------------------------------------------------------

def kept(logits):
    return [sorted(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in logits]


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0], [0.0, -1.0, 7.0, 6.5, -3.0]])
    assert kept(filter_logits(logits, top_k=2)) == [[1, 4], [2, 3]]
    assert kept(filter_logits(logits, top_k=1)) == [[1], [2]]
    assert kept(filter_logits(logits, top_k=5)) == [[0, 1, 2, 3, 4]] * 2
    assert kept(filter_logits(logits, top_k=99)) == [[0, 1, 2, 3, 4]] * 2
    # the kept logits are unchanged
    out = filter_logits(logits, top_k=3)
    assert torch.equal(out[0, [1, 2, 4]], logits[0, [1, 2, 4]])
    assert filter_logits(logits, None, None) is logits


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.2, 0.1]])
    logits = probs.log()
    # sorted: 0.5 (1), 0.2 (3), 0.15 (2), 0.1 (4), 0.05 (0)
    assert kept(filter_logits(logits, top_p=0.3)) == [[1]]
    assert kept(filter_logits(logits, top_p=0.5)) == [[1]]          # 0.5 alone reaches 0.5
    assert kept(filter_logits(logits, top_p=0.6)) == [[1, 3]]
    assert kept(filter_logits(logits, top_p=0.8)) == [[1, 2, 3]]
    assert kept(filter_logits(logits, top_p=0.9)) == [[1, 2, 3, 4]]
    assert kept(filter_logits(logits, top_p=0.96)) == [[0, 1, 2, 3, 4]]
    assert kept(filter_logits(logits, top_p=1.0)) == [[0, 1, 2, 3, 4]]
    assert kept(filter_logits(logits, top_p=1e-6)) == [[1]]          # the best token always stays
    # top-k first, then top-p on the renormalised survivors: 0.5, 0.2, 0.15 -> .588, .235, .176
    assert kept(filter_logits(logits, top_k=3, top_p=0.8)) == [[1, 3]]
    assert kept(filter_logits(logits, top_k=3, top_p=0.83)) == [[1, 2, 3]]
    # rows are independent, and the order of the vocabulary doesn't matter
    two = torch.stack([logits[0], logits[0].flip(0)])
    assert kept(filter_logits(two, top_p=0.6)) == [[1, 3], [1, 3]]


# ---- the speculative-sampling rule -----------------------------------------------------------

def test_speculative_accept_matches_exact_math():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    q = torch.tensor([0.1, 0.3, 0.3, 0.1, 0.2])   # q puts mass where p has none
    N = 400_000
    draft = torch.multinomial(q, N, replacement=True, generator=g)
    acc, tok = speculative_accept(p.expand(N, -1), q.expand(N, -1), draft, generator=g)
    emp = torch.bincount(tok, minlength=5).double() / N
    assert (emp - p.double()).abs().max() < 4e-3
    assert emp[4] == 0  # never a token p rules out
    assert acc.double().mean().item() == pytest.approx(torch.minimum(p, q).sum().item(), abs=4e-3)
    # accepted rows keep the draft; a rejected draft is replaced by a token from max(0, p - q)
    assert torch.equal(tok[acc], draft[acc])
    resid = (p - q).clamp_min(0)
    assert set(tok[~acc].tolist()) <= set(torch.nonzero(resid).flatten().tolist())
    # p == q: always accepted
    acc, tok = speculative_accept(q.expand(1000, -1), q.expand(1000, -1), draft[:1000], generator=g)
    assert acc.all() and torch.equal(tok, draft[:1000])


# ---- cached decoding == recomputing the prefix -----------------------------------------------

def test_window_rule():
    # block 8, window 4: predict token m from s..m-1 with m - s <= 8, jumping to m - 4
    assert window_starts(3, 20, 8) == [0] * 6 + [5] * 5 + [10] * 5 + [15]
    assert window_starts(11, 14, 8) == [3, 8, 8]          # a long prompt: cropped to the block, then slides
    assert window_starts(2, 6, 1) == [1, 2, 3, 4]         # block 1: only the last token


def reference(model, idx, n_new, temperature=0, vocab_size=None):
    """Greedy (or top-1 after masking) by running the full forward on the window every step."""
    bs = model.args.block_size
    out, P = idx.clone(), idx.shape[1]
    s = max(0, P - bs)
    for m in range(P, P + n_new):
        if m - s > bs:
            s = m - max(1, bs // 2)
        logits = model(out[:, s:m])[0][:, -1]
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("P, bs", [(5, 16), (1, 16), (16, 16), (23, 16), (4, 7), (3, 2)])
def test_cached_greedy_matches_uncached(P, bs):
    a = small(block_size=bs)
    m = model_of(a, seed=P)
    x = prompt(3, P, a.vocab_size, seed=bs)
    with torch.no_grad():
        ref = reference(m, x, 45)
    got = generate(m, x, 45, temperature=0)
    assert got.shape == ref.shape == (3, P + 45)
    assert torch.equal(got, ref)
    # masking the padded ids: the reference masks the same way
    with torch.no_grad():
        ref = reference(m, x, 20, vocab_size=40)
    assert torch.equal(generate(m, x, 20, temperature=0, vocab_size=40), ref)
    assert (ref[:, P:] < 40).all()


def test_decoding_feeds_one_token_per_step():
    """Prefill once, then single tokens; past block_size one re-prefill of block_size // 2."""
    a = small(block_size=16)
    m = model_of(a)
    calls = []
    orig = m.forward_cached

    def spy(idx, cache, start_pos=0):
        calls.append((idx.shape[1], start_pos))
        return orig(idx, cache, start_pos)

    m.forward_cached = spy
    generate(m, prompt(2, 5, a.vocab_size, 0), 20, temperature=0)
    # 5-token prefill, tokens 6..16 one by one at positions 5..15, then window 8 and one by one
    assert calls[0] == (5, 0)
    assert calls[1:12] == [(1, p) for p in range(5, 16)]
    assert calls[12] == (8, 0)
    assert calls[13:] == [(1, p) for p in range(8, 8 + 19 - 12)]


def test_eot_stopping():
    a = small()
    m = model_of(a, seed=1)
    x = prompt(4, 3, a.vocab_size, 5)
    free = generate(m, x, 30, temperature=0)
    eot = int(free[0, 6])  # a token row 0 produces at step 4
    y = generate(m, x, 30, temperature=0, eot=eot, eot_check_every=1)
    for row, frow in zip(y[:, 3:].tolist(), free[:, 3:].tolist()):
        if eot in frow:
            k = frow.index(eot)
            assert row[:k + 1] == frow[:k + 1] and set(row[k:]) == {eot}
        else:
            assert row == frow[:len(row)]
    # once every row has ended, generation stops (checked every eot_check_every steps)
    z = generate(m, x[:1], 30, temperature=0, eot=eot, eot_check_every=1)
    assert z.shape[1] == 3 + 4
    z = generate(m, x[:1], 30, temperature=0, eot=eot, eot_check_every=8)
    assert z.shape[1] == 3 + 8 and set(z[0, 6:].tolist()) == {eot}


def test_fixed_seed_reproduces_and_streaming_sees_every_token():
    a = small()
    m = model_of(a, head_scale=20)
    x = prompt(2, 4, a.vocab_size, 1)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    seen = []
    y1 = generate(m, x, 30, generator=torch.Generator().manual_seed(7), on_tokens=seen.append, **kw)
    y2 = generate(m, x, 30, generator=torch.Generator().manual_seed(7), **kw)
    y3 = generate(m, x, 30, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert torch.equal(torch.cat(seen, dim=1), y1[:, 4:])
    s1, st1 = generate_speculative(m, x, 30, generator=torch.Generator().manual_seed(7), **kw)
    s2, st2 = generate_speculative(m, x, 30, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(s1, s2) and st1 == st2 and s1.shape == y1.shape


# ---- speculative decoding ----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["random", "trained"])
def test_speculative_greedy_matches_plain(which, trained):
    m = trained if which == "trained" else model_of(small(block_size=16), seed=11)
    V = m.args.vocab_size
    drafted = accepted = 0
    for seed, (B, P) in enumerate([(1, 1), (1, 6), (3, 9), (2, 40), (1, 31)]):
        if which == "trained":  # prompts the model knows: counting by a stride
            x = ((torch.arange(B)[:, None] * 5 + (seed + 1) * torch.arange(P)) % V)
        else:
            x = prompt(B, P, V, seed)
        plain = generate(m, x, 70, temperature=0)
        spec, st = generate_speculative(m, x, 70, temperature=0)
        assert torch.equal(spec, plain), (which, seed)
        assert st["accepted"] <= st["drafted"]
        drafted += st["drafted"]
        accepted += st["accepted"]
        streamed = []
        generate_speculative(m, x, 70, temperature=0, on_tokens=streamed.append)
        assert torch.equal(torch.cat(streamed, dim=1), plain[:, P:])
    if which == "trained":  # the accept path (two tokens per step) is really exercised
        assert accepted / drafted > 0.5
    else:
        assert drafted > 0


def test_compiled_fixed_shape_steps_give_the_same_tokens(trained, monkeypatch):
    """compile=True runs DecodeSteps' fixed-shape steps (device-tensor positions, the whole cache
    under a mask: what a CUDA graph captures) through torch.compile: same greedy tokens as eager,
    across a window slide, for plain and speculative decoding; and a second generation of another
    length reuses the compiled steps (a recompile per generation once made them 100x slower on a
    GPU). The aot_eager backend keeps this fast: dynamo's capture is what can go wrong here."""
    import functools
    monkeypatch.setattr(sample, "_compiled", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    m = trained
    x = (torch.arange(2)[:, None] * 7 + 3 * torch.arange(6)) % m.args.vocab_size
    plain = generate(m, x, 40, temperature=0)  # 46 tokens > block 32: one slide
    spec, st = generate_speculative(m, x, 40, temperature=0, compile=True)
    assert torch.equal(spec, plain) and st["accepted"] > 0
    assert torch.equal(generate(m, x, 40, temperature=0, compile=True), plain)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    assert torch.equal(generate_speculative(m, x, 20, temperature=0, compile=True)[0], plain[:, :26])
    assert torch.equal(generate(m, x, 25, temperature=0, compile=True), plain[:, :31])


def test_speculative_greedy_eot_and_lengths(trained):
    m = trained
    x = (torch.arange(2)[:, None] * 3 + torch.arange(5)) % 32
    plain = generate(m, x, 40, temperature=0)
    eot = int(plain[0, 12])
    a = generate(m, x, 40, temperature=0, eot=eot)
    b, _ = generate_speculative(m, x, 40, temperature=0, eot=eot)
    for ra, rb in zip(a[:, 5:].tolist(), b[:, 5:].tolist()):
        cut = lambda r: r[:r.index(eot) + 1] if eot in r else r  # noqa: E731
        assert cut(ra) == cut(rb)
    for n in (0, 1, 2, 3):
        assert generate_speculative(m, x, n, temperature=0)[0].shape == (2, 5 + n)
        assert torch.equal(generate_speculative(m, x, n, temperature=0)[0], plain[:, :5 + n])


def test_speculative_mtp_cache_stays_consistent(trained):
    """After a run, the MTP cache entries for the accepted tokens equal a fresh recomputation."""
    m = trained
    x = (torch.arange(1)[:, None] + 2 * torch.arange(6)) % 32
    caches = []
    orig = m.make_cache
    m.make_cache = lambda *a, **k: caches.append(orig(*a, **k)) or caches[-1]
    try:
        y, st = generate_speculative(m, x, 20, temperature=0)
    finally:
        del m.make_cache
    assert st["accepted"] > 0
    cache = caches[0]
    n = y.shape[1]  # 26 tokens, no slide (block 32): the main cache holds 0..n-2 at least
    fresh = m.make_cache(1)
    with torch.no_grad():
        _, h = m.forward_cached(y[:, :n - 1], fresh, 0)
        m.mtp_cached(h[:, :n - 2], y[:, 1:n - 1], fresh, 0)
    L = m.args.n_layer
    for i in range(L):  # main layers: tokens 0..n-2 (the last one is pending)
        for j in (0, 1):
            assert torch.allclose(cache[i][j][:, :n - 1], fresh[i][j][:, :n - 1], atol=1e-5)
    # MTP layer: pairs (h_j, token j+1) for j = 0..n-4 (the last step's update is skipped at the end)
    for j in (0, 1):
        assert torch.allclose(cache[L][j][:, :n - 3], fresh[L][j][:, :n - 3], atol=1e-5)


def exact_two_token_dist(m, x, temperature, top_k, top_p):
    """P(x_P = a, x_P+1 = b) under plain sampling, from full forwards. (V, V)."""
    V = m.args.vocab_size

    def probs(seq):
        logits = m(seq)[0][:, -1].float()
        return filter_logits(logits / temperature, top_k, top_p).softmax(-1)

    with torch.no_grad():
        p1 = probs(x)[0]
        ext = torch.cat([x.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        p2 = probs(ext)
    return p1[:, None] * p2


class OracleDraft:
    """The model, except that its 'MTP' returns the main model's own logits for the token after
    next (recomputed from the tokens it has been fed), so q == p: nearly every draft is accepted
    and a big lockstep batch takes the two-token (bonus) path at every step."""

    def __init__(self, m):
        self.m, self.args = m, m.args
        self.seen = None

    def __getattr__(self, name):  # make_cache, tok_emb, training, eval(), train()
        return getattr(self.m, name)

    def note(self, idx, pos):
        if self.seen is None or self.seen.shape[0] != idx.shape[0]:
            self.seen = torch.zeros(idx.shape[0], self.args.block_size + 2, dtype=torch.long)
        self.seen[:, pos:pos + idx.shape[1]] = idx

    def forward_cached(self, idx, cache, start_pos=0):
        self.note(idx, start_pos)
        return self.m.forward_cached(idx, cache, start_pos)

    def mtp_cached(self, h, next_idx, cache, start_pos=0, depth=0):
        self.note(next_idx, start_pos + 1)
        with torch.no_grad():
            logits = [self.m(self.seen[:, :start_pos + 2 + t])[0] for t in range(next_idx.shape[1])]
        return torch.cat(logits, dim=1), h


@pytest.mark.parametrize("draft", ["mtp", "oracle"])
@pytest.mark.parametrize("top_k, top_p", [(None, None), (4, 0.9)])
def test_speculative_sampling_preserves_distribution(top_k, top_p, draft):
    """The joint law of the next two tokens from many rows at once, against the exact product of
    the model's conditionals (and plain sampling as the yardstick for sampling noise). With the
    random MTP, lockstep almost never keeps both tokens: this checks the reject/resample path;
    with the oracle draft every step keeps both: this checks the bonus-token path."""
    a = small(vocab_size=6, n_layer=1, n_routed_experts=0)  # (a dense MTP block too: quicker)
    m = model_of(a, seed=6, head_scale=12)
    x = torch.tensor([[1, 4, 2]])
    kw = dict(temperature=1.0, top_k=top_k, top_p=top_p)
    exact = exact_two_token_dist(m, x, 1.0, top_k, top_p).flatten().double()
    assert exact.max() < 0.3  # a spread-out law, not a near-deterministic model

    def tv(samples):
        k = samples[:, 3] * 6 + samples[:, 4]
        emp = torch.bincount(k, minlength=36).double() / len(k)
        return 0.5 * (emp - exact).abs().sum().item()

    # 8000 draws of the right law are ~0.02 away in total variation; the bugs this catches (no
    # accept test, resampling from p rather than p - q, the bonus drawn from the wrong position)
    # are 0.2 to 0.5 away
    N = 8000
    X = x.expand(N, -1)
    if draft == "mtp":
        plain = generate(m, X, 2, generator=torch.Generator().manual_seed(0), **kw)
        assert tv(plain) < 0.05
        spec, st = generate_speculative(m, X, 2, generator=torch.Generator().manual_seed(1), **kw)
        assert 0.2 < st["accepted"] / st["drafted"] < 0.8 and st["steps"] == 2
    else:
        spec, st = generate_speculative(OracleDraft(m), X, 2, generator=torch.Generator().manual_seed(1), **kw)
        assert st["accepted"] / st["drafted"] > 0.99 and st["steps"] == 1
    assert spec.shape == (N, 5)
    assert tv(spec) < 0.05


# ---- command line ------------------------------------------------------------------------------

def gpt2_tiny(**kw):
    base = dict(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=16, q_lora_rank=0,
                kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, inter_dim=32,
                n_dense_layers=1, moe_inter_dim=8, n_routed_experts=4, n_activated_experts=2,
                mtp_depth=1)
    base.update(kw)
    return ModelArgs(**base)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    save_ckpt(model_of(gpt2_tiny()), str(d / "ok" / "ckpt.pt"))
    save_ckpt(model_of(gpt2_tiny(mtp_depth=0)), str(d / "nomtp" / "ckpt.pt"))
    save_ckpt(model_of(small()), str(d / "smallvocab" / "ckpt.pt"))
    os.makedirs(d / "corrupt")
    (d / "corrupt" / "ckpt.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    os.makedirs(d / "foreign")
    torch.save({"model": {}, "model_args": {"n_layer": 2, "rotary_pct": 0.25}}, str(d / "foreign" / "ckpt.pt"))
    os.makedirs(d / "notours")
    torch.save({"state_dict": {}}, str(d / "notours" / "ckpt.pt"))
    (d / "prompt.txt").write_text("Tom had a red ball.")
    return d


def run_cli(*args):
    """In a real process, from the repo root."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "sample.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def story(stdout):
    """stdout less the configurator's 'Overriding' lines."""
    return "".join(l for l in stdout.splitlines(True) if not l.startswith("Overriding"))


def test_cli_end_to_end(ckpts):
    """Real processes (they run side by side): a streamed story, a speculative one from a FILE:
    prompt with --verbose, and a missing checkpoint."""
    ok = str(ckpts / "ok")
    common = [f"--out_dir={ok}", "--device=cpu", "--max_new_tokens=40", "--temperature=0.9", "--top_k=50"]
    procs = {
        "one": run_cli(*common, "--start=Once upon a time", "--seed=3"),
        "spec": run_cli(*common, f"--start=FILE:{ckpts / 'prompt.txt'}", "--speculative=True",
                        "--verbose=True", "--top_p=0.9"),
        "missing": run_cli(f"--out_dir={ckpts / 'nowhere'}", "--device=cpu"),
    }
    res = {k: (*p.communicate(timeout=120), p.returncode) for k, p in procs.items()}
    for k in ("one", "spec"):
        out, err, rc = res[k]
        assert rc == 0 and "Traceback" not in err, (k, err)
    out, err, _ = res["one"]
    text = story(out)
    assert text.startswith("Once upon a time") and text.endswith("\n---------------\n")
    assert len(text) > len("Once upon a time") + 20
    # the story the importable generate() writes with the same settings and seed
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    from model import load_checkpoint
    m, _ = load_checkpoint(os.path.join(ok, "ckpt.pt"))
    ids = [50256] + enc.encode("Once upon a time")
    y = generate(m, torch.tensor([ids]), 40, temperature=0.9, top_k=50, top_p=0.95, eot=50256,
                 generator=torch.Generator().manual_seed(3), vocab_size=50257)
    assert text == "Once upon a time" + sample.story_text(enc, y[0, len(ids):].tolist(), 50256) + "\n---------------\n"
    out, err, _ = res["spec"]
    assert story(out).startswith("Tom had a red ball.") and len(story(out)) > 40
    assert "tokens/s" in err and "drafts accepted" in err and len(err.strip().splitlines()) == 1
    out, err, rc = res["missing"]
    assert rc != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: no checkpoint"), err


def test_cli_in_process(ckpts, monkeypatch, capsys):
    """The command line without a new process: batches, seeds, greedy speculative, zero tokens."""
    ok = [f"--out_dir={ckpts / 'ok'}", "--device=cpu"]
    code, cap = run_main(monkeypatch, capsys, *ok, "--max_new_tokens=30", "--num_samples=3", "--seed=5")
    stories = story(cap.out).split("---------------\n")
    assert code == 0 and len(stories) == 4 and stories[-1] == ""
    assert all(t.startswith("Once upon a time") for t in stories[:3]) and len(set(stories[:3])) == 3
    code, again = run_main(monkeypatch, capsys, *ok, "--max_new_tokens=30", "--num_samples=3", "--seed=5")
    assert again.out == cap.out  # a fixed seed writes the same stories
    code, other = run_main(monkeypatch, capsys, *ok, "--max_new_tokens=30", "--num_samples=3", "--seed=6")
    assert other.out != cap.out
    # greedy speculative from an empty prompt (<|endoftext|>) writes the plain greedy story
    code, cap = run_main(monkeypatch, capsys, *ok, "--max_new_tokens=40", "--start=", "--temperature=0",
                         "--speculative=True", "--verbose=True")
    assert code == 0 and "drafts accepted" in cap.err
    import tiktoken
    from model import load_checkpoint
    m, _ = load_checkpoint(str(ckpts / "ok" / "ckpt.pt"))
    y = generate(m, torch.tensor([[50256]]), 40, temperature=0, eot=50256, vocab_size=50257)
    text = sample.story_text(tiktoken.get_encoding("gpt2"), y[0, 1:].tolist(), 50256)
    assert story(cap.out) == text + "\n---------------\n"
    code, cap = run_main(monkeypatch, capsys, *ok, "--max_new_tokens=0", "--start=Hello there")
    assert code == 0 and story(cap.out) == "Hello there\n---------------\n" and cap.err == ""
    code, cap = run_main(monkeypatch, capsys, *ok, "--max_new_tokens=5", "--num_samples=2",
                         f"--start=FILE:{ckpts / 'prompt.txt'}")
    assert code == 0
    assert [t.startswith("Tom had a red ball.") for t in story(cap.out).split("---------------\n")] == [True, True, False]


def test_cli_streams_tokens_as_they_are_made(ckpts):
    """With one story, text appears on stdout while generation is still running."""
    p = run_cli(f"--out_dir={ckpts / 'ok'}", "--device=cpu", "--max_new_tokens=1000000",
                "--stop_at_eot=False", "--start=Once upon a time")
    try:
        got = ""
        deadline = time.time() + 60
        while len(story(got)) < len("Once upon a time") + 40 and time.time() < deadline:
            got += p.stdout.read(1)
        assert len(story(got)) >= len("Once upon a time") + 40
        assert p.poll() is None  # a million tokens are far from done
        p.send_signal(signal.SIGINT)  # Ctrl-C: a clean exit, no traceback
        _, err = p.communicate(timeout=30)
        assert p.returncode != 0 and "Traceback" not in err
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_text_stream_joins_split_characters():
    import io
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    text = "Mia saw a 🐶 and said héllo"
    ids = enc.encode(text)
    f = io.StringIO()
    writes = []
    s = sample.TextStream(enc, f, eot=50256)
    f.write = lambda t, w=f.write: (writes.append(t), w(t))[1]
    for t in ids + [50256, 11, 12]:
        s(torch.tensor([[t]]))
    s.close()
    assert f.getvalue() == text and "\ufffd" not in "".join(writes)
    assert len([w for w in writes if w]) >= len(text.split())  # written piece by piece


def run_main(monkeypatch, capsys, *args):
    """sample.py's command line in this process (fast: torch is already imported)."""
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    monkeypatch.chdir(ROOT)
    try:
        runpy.run_path(os.path.join(ROOT, "sample.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


@pytest.mark.parametrize("name, args, needle", [
    ("missing checkpoint", ["--out_dir={d}/nowhere"], "no checkpoint"),
    ("corrupt checkpoint", ["--out_dir={d}/corrupt"], "unreadable"),
    ("foreign architecture", ["--out_dir={d}/foreign"], "different architecture"),
    ("not a checkpoint", ["--out_dir={d}/notours"], "not a checkpoint"),
    ("small vocabulary", ["--out_dir={d}/smallvocab"], "vocabulary"),
    ("no MTP", ["--out_dir={d}/nomtp", "--speculative=True"], "MTP"),
    ("temperature < 0", ["--temperature=-0.5"], "temperature"),
    ("top_p = 0", ["--top_p=0"], "top_p"),
    ("top_p > 1", ["--top_p=1.5"], "top_p"),
    ("top_k = 0", ["--top_k=0"], "top_k"),
    ("top_k text", ["--top_k=many"], "top_k"),
    ("max_new_tokens < 0", ["--max_new_tokens=-1"], "max_new_tokens"),
    ("num_samples = 0", ["--num_samples=0"], "num_samples"),
    ("missing FILE:", ["--start=FILE:{d}/no_such_prompt.txt"], "no_such_prompt.txt"),
    ("bad device", ["--device=tpu"], "device"),
    ("bad dtype", ["--dtype=int8"], "dtype"),
    ("unknown key", ["--temprature=0.5"], "temprature"),
    ("wrong type", ["--num_samples=two"], "num_samples"),
])
def test_cli_bad_input(ckpts, monkeypatch, capsys, name, args, needle):
    args = [a.format(d=ckpts) for a in args]
    if not any(a.startswith("--out_dir") for a in args):
        args.append(f"--out_dir={ckpts / 'ok'}")
    code, cap = run_main(monkeypatch, capsys, "--device=cpu", *args) if name != "bad device" \
        else run_main(monkeypatch, capsys, *args)
    assert code not in (0, None), name
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, cap.err)
    assert "Traceback" not in cap.err


def test_cli_tokenizer_unavailable(ckpts, monkeypatch, capsys):
    """No network on first use (tiktoken downloads GPT-2's files once): one line, no traceback."""
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    code, cap = run_main(monkeypatch, capsys, "--device=cpu", f"--out_dir={ckpts / 'ok'}")
    lines = cap.err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and "TIKTOKEN_CACHE_DIR" in lines[0], cap.err
