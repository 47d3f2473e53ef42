"""CPU tests for sample.py: cached and speculative decoding against plain recomputation, the
sampling filters and the speculative-sampling rule against exact math, and the command line."""
import io
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
from model import DeepSeekV3, ModelArgs, load_checkpoint
from sample import filter_logits, generate, speculative_accept


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


def gen(m, x, n, **kw):
    return generate(m, x, n, **kw)[0]


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
    assert filter_logits(logits, None, 1.0) is logits  # the documented 'off' values


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

    def accept(p, q, draft):
        u, e = torch.rand(len(draft), generator=g), torch.empty(len(draft), 5).exponential_(generator=g)
        return speculative_accept(p.expand(len(draft), -1), q.expand(len(draft), -1), draft, u, e)
    draft = torch.multinomial(q, N, replacement=True, generator=g)
    acc, tok = accept(p, q, draft)
    emp = torch.bincount(tok, minlength=5).double() / N
    assert (emp - p.double()).abs().max() < 4e-3
    assert emp[4] == 0  # never a token p rules out
    assert acc.double().mean().item() == pytest.approx(torch.minimum(p, q).sum().item(), abs=4e-3)
    # accepted rows keep the draft; a rejected draft is replaced by a token from max(0, p - q)
    assert torch.equal(tok[acc], draft[acc])
    resid = (p - q).clamp_min(0)
    assert set(tok[~acc].tolist()) <= set(torch.nonzero(resid).flatten().tolist())
    # p == q: always accepted
    acc, tok = accept(q, q, draft[:1000])
    assert acc.all() and torch.equal(tok, draft[:1000])
    # greedy, the one-hot case (noise u = 0, e = 1): the draft stays iff it is p's argmax, else the argmax
    one_hot = torch.eye(5)
    d = torch.tensor([0, 1, 2, 3])
    acc, tok = speculative_accept(one_hot[[0, 0, 2, 4]], one_hot[d], d, torch.zeros(4), torch.ones(4, 5))
    assert acc.tolist() == [True, False, True, False] and tok.tolist() == [0, 0, 2, 4]


@pytest.mark.parametrize("kw, needle", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0), "top_p"),
    (dict(top_p=None), "1.0 = off"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "empty"), (dict(speculative=True, mtp_depth=0), "MTP")])
def test_bad_arguments_raise(kw, needle):
    m = model_of(small(mtp_depth=kw.pop("mtp_depth", 1)))
    args = dict(idx=torch.zeros(1, 2, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match=needle):
        generate(m, **{**args, **kw})


# ---- cached decoding == recomputing the prefix -----------------------------------------------

def reference(model, idx, n_new, vocab_size=None):
    """Greedy by running the full forward on the window every step, with the window rule of
    sample.py's docstring: token m is predicted from s..m-1, s jumps to m - block_size // 2."""
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


@pytest.mark.parametrize("P, bs", [(5, 16), (1, 16), (16, 16), (23, 16), (4, 7), (3, 2), (2, 1)])
def test_cached_greedy_matches_uncached(P, bs):
    """Plain and speculative greedy decoding, across window slides, against the full forward."""
    a = small(block_size=bs)
    m = model_of(a, seed=P)
    x = prompt(3, P, a.vocab_size, seed=bs)
    with torch.no_grad():
        ref = reference(m, x, 45)
    assert ref.shape == (3, P + 45)
    assert torch.equal(gen(m, x, 45, temperature=0), ref)
    assert torch.equal(gen(m, x, 45, temperature=0, speculative=True), ref)
    # masking the padded ids: the reference masks the same way
    with torch.no_grad():
        ref = reference(m, x, 20, vocab_size=40)
    assert torch.equal(gen(m, x, 20, temperature=0, vocab_size=40), ref)
    assert (ref[:, P:] < 40).all()


def test_decoding_feeds_one_token_per_step():
    """Prefill once (all but the pending token), then single tokens; past block_size one re-prefill."""
    a = small(block_size=16)
    m = model_of(a)
    calls = []
    orig = m.forward_cached

    def spy(idx, cache, start_pos=0):
        calls.append((idx.shape[1], int(start_pos)))
        return orig(idx, cache, start_pos)

    m.forward_cached = spy
    gen(m, prompt(2, 5, a.vocab_size, 0), 20, temperature=0)
    # 4-token prefill, tokens 6..17 from positions 4..15; then the window 9..16 (7 + the pending one)
    assert calls == [(4, 0)] + [(1, p) for p in range(4, 16)] + [(7, 0)] + [(1, p) for p in range(7, 15)]


@pytest.mark.parametrize("speculative", [False, True])
def test_eot_stopping(speculative, trained):
    """A row that wrote eot writes only eot; once every row has, the token count stops and the
    generation with it. (The trained model keeps drafts: eot also comes within 2-token commits.)"""
    x = (torch.arange(3)[:, None] * 3 + torch.arange(5)) % 32
    free = gen(trained, x, 40, temperature=0)
    eot = int(free[0, 11])  # (speculative: the first token of a 2-token commit in rows 0 and 2)
    y = gen(trained, x, 40, temperature=0, eot=eot, speculative=speculative)
    for row, frow in zip(y[:, 5:].tolist(), free[:, 5:].tolist()):
        k = frow.index(eot) if eot in frow else len(frow)
        assert row[:k + 1] == frow[:k + 1] and set(row[k:]) <= {eot}
    k = 5 + free[0, 5:].tolist().index(eot)
    for every in (1, 8):  # one row: it stops at its eot (+ the other token of a 2-token commit)
        seen = []
        z, _ = generate(trained, x[:1], 40, temperature=0, eot=eot, sync_every=every, on_tokens=seen.append,
                        speculative=speculative)
        assert torch.equal(z[:, :k + 1], free[:1, :k + 1]) and set(z[0, k:].tolist()) == {eot}
        assert z.shape[1] <= k + 2 and torch.equal(torch.cat(seen, dim=1), z[:, 5:])


def test_fixed_seed_reproduces_and_streaming_sees_every_token():
    a = small()
    m = model_of(a, head_scale=20)
    x = prompt(2, 4, a.vocab_size, 1)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    for spec in (False, True):
        seen = []
        y1, st1 = generate(m, x, 30, generator=torch.Generator().manual_seed(7), on_tokens=seen.append,
                           speculative=spec, **kw)
        y2, st2 = generate(m, x, 30, generator=torch.Generator().manual_seed(7), speculative=spec, **kw)
        y3 = gen(m, x, 30, generator=torch.Generator().manual_seed(8), speculative=spec, **kw)
        assert torch.equal(y1, y2) and st1 == st2 and not torch.equal(y1, y3)
        assert y1.shape == (2, 34) and torch.equal(torch.cat(seen, dim=1), y1[:, 4:])


# ---- speculative decoding ----------------------------------------------------------------------

def test_speculative_greedy_matches_plain_with_accepted_drafts(trained):
    """A model whose drafts get accepted (two tokens per step), on prompts it knows (counting by a
    stride), batched: the plain greedy tokens, streamed as they come."""
    drafted = accepted = 0
    for seed, (B, P) in enumerate([(1, 1), (1, 6), (3, 9), (2, 40), (1, 31)]):
        x = (torch.arange(B)[:, None] * 5 + (seed + 1) * torch.arange(P)) % trained.args.vocab_size
        plain, streamed = gen(trained, x, 70, temperature=0), []
        spec, st = generate(trained, x, 70, temperature=0, speculative=True, on_tokens=streamed.append)
        assert torch.equal(spec, plain) and torch.equal(torch.cat(streamed, dim=1), plain[:, P:]), seed
        for n in (0, 1, 2, 3):  # short generations end where a 2-token step would overshoot
            assert torch.equal(gen(trained, x, n, temperature=0, speculative=True), plain[:, :P + n])
        drafted += st["drafted"]
        accepted += st["accepted"]
    assert accepted / drafted > 0.5


def test_compiled_step_gives_the_same_tokens(trained, monkeypatch):
    """compile=True runs _step through torch.compile: the same greedy tokens as eager, across a
    window slide, for plain and speculative decoding; and a generation of another length reuses the
    compiled step (a recompile per generation once made it 100x slower on a GPU). The aot_eager
    backend keeps this fast: dynamo's capture is what can go wrong here."""
    import functools
    sample._compiled_step.cache_clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    m = trained
    x = (torch.arange(2)[:, None] * 7 + 3 * torch.arange(6)) % m.args.vocab_size
    plain = gen(m, x, 40, temperature=0)  # 46 tokens > block 32: one slide
    spec, st = generate(m, x, 40, temperature=0, speculative=True, compile=True)
    assert torch.equal(spec, plain) and st["accepted"] > 0
    assert torch.equal(gen(m, x, 40, temperature=0, compile=True), plain)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    assert torch.equal(gen(m, x, 20, temperature=0, speculative=True, compile=True), plain[:, :26])
    assert torch.equal(gen(m, x, 25, temperature=0, compile=True), plain[:, :31])
    sample._compiled_step.cache_clear()


def test_speculative_mtp_cache_stays_consistent(trained, monkeypatch):
    """After a run, the MTP cache entries for the accepted tokens equal a fresh recomputation."""
    m = trained
    x = (torch.arange(1)[:, None] + 2 * torch.arange(6)) % 32
    caches, orig = [], m.make_cache
    monkeypatch.setattr(m, "make_cache", lambda *a, **k: caches.append(orig(*a, **k)) or caches[-1])
    y, st = generate(m, x, 20, temperature=0, speculative=True)
    monkeypatch.undo()
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
    # MTP layer: pairs (h_j, token j+1) for j = 0..n-4 (the last step's update may be cut off at the end)
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
        self.note(idx, int(start_pos))
        return self.m.forward_cached(idx, cache, start_pos)

    def mtp_cached(self, h, next_idx, cache, start_pos=0, depth=0):
        pos = int(start_pos)
        self.note(next_idx, pos + 1)
        with torch.no_grad():
            logits = [self.m(self.seen[:, :pos + 2 + t])[0] for t in range(next_idx.shape[1])]
        return torch.cat(logits, dim=1), h


@pytest.mark.parametrize("draft", ["mtp", "oracle"])
@pytest.mark.parametrize("top_k, top_p", [(None, 1.0), (4, 0.9)])
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
        assert tv(gen(m, X, 2, generator=torch.Generator().manual_seed(0), **kw)) < 0.05
        spec, st = generate(m, X, 2, generator=torch.Generator().manual_seed(1), speculative=True, **kw)
        assert 0.2 < st["accepted"] / st["drafted"] < 0.8 and st["drafted"] == 2 * N  # two steps
    else:
        g = torch.Generator().manual_seed(1)
        spec, st = generate(OracleDraft(m), X, 2, generator=g, speculative=True, **kw)
        assert st["accepted"] / st["drafted"] > 0.99 and st["drafted"] == N  # one step, two tokens
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
    torch.save({"model": {}, "model_args": {"n_layer": 2, "rotary_pct": 0.25}}, d / "foreign" / "ckpt.pt")
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
    """stdout less the configurator's 'Overriding' lines (where it still prints them there)."""
    return "".join(l for l in stdout.splitlines(True) if not l.startswith("Overriding"))


def story_of(enc, tokens, eot=50256):
    """The text sample.py writes for one row of new tokens: up to its first end-of-text."""
    tokens = tokens.tolist()
    return enc.decode(tokens[:tokens.index(eot)] if eot in tokens else tokens)


@pytest.mark.needs_gpt2
def test_cli_end_to_end(ckpts):
    """Real processes (side by side): a streamed story, and a speculative one from a FILE: prompt
    with --verbose. stdout holds the stories and nothing else."""
    ok = str(ckpts / "ok")
    common = [f"--out_dir={ok}", "--device=cpu", "--max_new_tokens=40", "--temperature=0.9", "--top_k=50"]
    procs = {
        "one": run_cli(*common, "--start=Once upon a time", "--seed=3"),
        "spec": run_cli(*common, f"--start=FILE:{ckpts / 'prompt.txt'}", "--speculative=True",
                        "--verbose=True", "--top_p=1.0"),
    }
    res = {k: (*p.communicate(timeout=120), p.returncode) for k, p in procs.items()}
    for k, (out, err, rc) in res.items():
        assert rc == 0 and "Traceback" not in err, (k, err)
    # the story the importable generate() writes with the same settings and seed
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    m, _ = load_checkpoint(os.path.join(ok, "ckpt.pt"))
    ids = [50256] + enc.encode("Once upon a time")
    y = gen(m, torch.tensor([ids]), 40, temperature=0.9, top_k=50, top_p=0.95, eot=50256,
            generator=torch.Generator().manual_seed(3), vocab_size=50257)
    text = "Once upon a time" + story_of(enc, y[0, len(ids):])
    assert len(text) > len("Once upon a time") + 20 and story(res["one"][0]) == text + "\n---------------\n"
    out, err, _ = res["spec"]
    assert story(out).startswith("Tom had a red ball.") and len(story(out)) > 40
    assert "tokens/s" in err and "drafts accepted" in err and len(err.strip().splitlines()) == 1


@pytest.mark.needs_gpt2
def test_cli_in_process(ckpts, monkeypatch, capsys):
    """The command line without a new process: a batch, greedy speculative, zero tokens, a FILE:
    prompt for a batch. (test_cli_end_to_end checks the seed against generate()'s story.)"""
    ok = [f"--out_dir={ckpts / 'ok'}", "--device=cpu"]
    code, cap = run_main(monkeypatch, capsys, *ok, "--max_new_tokens=30", "--num_samples=3", "--seed=5")
    stories = story(cap.out).split("---------------\n")
    assert code == 0 and len(stories) == 4 and stories[-1] == ""
    assert all(t.startswith("Once upon a time") for t in stories[:3]) and len(set(stories[:3])) == 3
    # greedy speculative from an empty prompt (<|endoftext|>) writes the plain greedy story
    code, cap = run_main(monkeypatch, capsys, *ok, "--max_new_tokens=40", "--start=", "--temperature=0",
                         "--speculative=True", "--verbose=True")
    assert code == 0 and "drafts accepted" in cap.err
    import tiktoken
    m, _ = load_checkpoint(str(ckpts / "ok" / "ckpt.pt"))
    y = gen(m, torch.tensor([[50256]]), 40, temperature=0, eot=50256, vocab_size=50257)
    assert story(cap.out) == story_of(tiktoken.get_encoding("gpt2"), y[0, 1:]) + "\n---------------\n"
    code, cap = run_main(monkeypatch, capsys, *ok, "--max_new_tokens=0", "--start=Hello there")
    assert code == 0 and story(cap.out) == "Hello there\n---------------\n" and cap.err == ""
    code, cap = run_main(monkeypatch, capsys, *ok, "--max_new_tokens=5", "--num_samples=2",
                         f"--start=FILE:{ckpts / 'prompt.txt'}")
    assert code == 0
    stories = story(cap.out).split("---------------\n")
    assert [t.startswith("Tom had a red ball.") for t in stories] == [True, True, False]


@pytest.mark.needs_gpt2
def test_cli_streams_tokens_as_they_are_made(ckpts):
    """With one story, text appears on stdout while generation is still running; Ctrl-C ends it
    cleanly; a reader that leaves early (| head) gets no BrokenPipeError traceback."""
    args = [f"--out_dir={ckpts / 'ok'}", "--device=cpu", "--max_new_tokens=1000000", "--stop_at_eot=False"]
    p, piped = run_cli(*args), run_cli(*args)
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
        # | head: the reader takes the start and closes the pipe
        assert len(piped.stdout.read(100)) == 100
        piped.stdout.close()
        err = piped.stderr.read()
        assert piped.wait(timeout=60) == -signal.SIGPIPE and err == "", err
    finally:
        for q in (p, piped):
            if q.poll() is None:
                q.kill()
                q.communicate()


@pytest.mark.needs_gpt2
def test_text_stream_joins_split_characters():
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    text = "Mia saw a 🐶 and said héllo"
    ids = enc.encode(text)
    f = io.StringIO()
    writes = []
    s = sample.TextStream(enc, eot=50256, file=f)
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
    pytest.param("small vocabulary", ["--out_dir={d}/smallvocab"], "vocabulary",
                 marks=pytest.mark.needs_gpt2),  # (the check needs the tokens of the prompt)
    ("no MTP", ["--out_dir={d}/nomtp", "--speculative=True"], "MTP"),
    ("temperature < 0", ["--temperature=-0.5"], "temperature"),
    ("top_p = 0", ["--top_p=0"], "top_p"),
    ("top_p > 1", ["--top_p=1.5"], "top_p"),
    ("top_p None", ["--top_p=None"], "top_p"),  # 1.0 turns it off
    ("top_k = 0", ["--top_k=0"], "top_k"),
    ("top_k text", ["--top_k=many"], "top_k"),
    ("max_new_tokens < 0", ["--max_new_tokens=-1"], "max_new_tokens"),
    ("num_samples = 0", ["--num_samples=0"], "num_samples"),
    ("missing FILE:", ["--start=FILE:{d}/no_such_prompt.txt"], "no_such_prompt.txt"),
    ("bad device", ["--device=tpu"], "device"),
    ("bad dtype", ["--dtype=int8"], "dtype"),
    ("unknown key", ["--temprature=0.5"], "temprature"),
    ("wrong type", ["--num_samples=two"], "num_samples"),
    ("EOT is no knob", ["--EOT=13"], "EOT"),
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
