"""
Write stories with a trained DeepSeek-V3 (train.py's out_dir/ckpt.pt):

    python sample.py --start="Once upon a time"
    python sample.py --start=FILE:prompt.txt --num_samples=4 --temperature=0.7 --top_p=0.9
    python sample.py --speculative=True --verbose=True      # MTP drafts, the main model verifies

Generation runs on MLA's compressed cache: the prompt is prefilled once, then every step feeds
only the newest token(s) with model.forward_cached(idx, cache, start_pos). Past block_size the
window slides: the last block_size // 2 tokens are prefilled again at positions 0.. (the model's
own semantics for a cropped context, like nanoGPT's crop, but in jumps so the cache stays usable).

The functions are importable (a benchmark uses them): filter_logits, generate,
generate_speculative, speculative_accept, DecodeSteps. The command line is at the bottom.

Decode steps run as CUDA graphs on CUDA (cuda_graph=True), optionally torch.compile'd too
(compile=True); see DecodeSteps. Measured on an H100 (16x4, bf16, greedy, batch 1; README's
Results): 46 tokens/s eager, 471 with graphs, 1,222 compiled + graphs; speculative 1.76x, 1.52x
and 1.18x faster than each of those, with ~70% of the drafts accepted.
"""

import codecs
import functools
import os
import sys
import time
from contextlib import nullcontext

import torch

from model import CheckpointError, load_checkpoint

EOT = 50256  # GPT-2's <|endoftext|>: every TinyStories story is followed by it (prepare.py)


# -----------------------------------------------------------------------------
# turning logits into tokens

def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit that top-k or nucleus (top-p) filtering removes, in that order.
    top_k: keep the k largest (a value tied with the k-th largest is kept too, as in nanoGPT);
    top_p: then keep the smallest set of most likely tokens whose probability adds up to >= top_p
    (the most likely token always stays). None (or top_p=1) turns a filter off. logits: (..., V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs       # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p                # the set reached top_p without this one
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _logits_of(logits, vocab_size):
    """fp32 logits with the padded ids (>= vocab_size, e.g. 50257..50303) made impossible."""
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_size,
                                    float("-inf"))
    return logits


def _probs(logits, temperature, top_k, top_p):
    """The distribution a token is drawn from: temperature, then top-k, then top-p. (B, V) fp32."""
    return filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)


def _draw(probs, generator=None):
    """One token per row from probs (B, V): the exponential race argmax_i p_i / E_i, E_i ~ Exp(1),
    picks i with probability p_i. Unlike torch.multinomial it never waits for the GPU."""
    e = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
    return (probs / e).argmax(dim=-1)


def _pick(logits, temperature, top_k, top_p, generator):
    if temperature == 0:
        return logits.argmax(dim=-1)  # greedy: filters can't change the argmax
    return _draw(_probs(logits, temperature, top_k, top_p), generator)


def speculative_accept(p, q, draft, generator=None):
    """The speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023) for one drafted
    token per row: accept draft ~ q with probability min(1, p(draft) / q(draft)), otherwise draw
    from normalize(max(0, p - q)). Either way the token is distributed exactly as p.
    p, q: (B, V) probabilities of the target and the draft model; draft: (B,) token ids.
    Returns (accepted (B,) bool, token (B,))."""
    pd = p.gather(-1, draft[:, None]).squeeze(-1)
    qd = q.gather(-1, draft[:, None]).squeeze(-1)
    u = torch.rand(pd.shape, generator=generator, device=p.device, dtype=p.dtype)
    accepted = u * qd < pd  # u < p/q without dividing (q(draft) > 0 since draft ~ q)
    residual = (p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    # (the residual is all zero only where p == q, and then the draft is always accepted)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)
    return accepted, torch.where(accepted, draft, _draw(residual, generator))


def _check(temperature, top_k, top_p, max_new_tokens):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def _cache_of(model, batch_size):
    # the cache in the weights' dtype (bf16 weights: a bf16 cache, as in DeepSeek's inference code)
    return model.make_cache(batch_size, dtype=model.tok_emb.weight.dtype)


class _EvalMode:
    """Generation runs the model in eval mode (no dropout) and restores the mode afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _main_step(model, ins, cache):
    return model.forward_cached(ins["tok"], cache, ins["pos"])


def _mtp_step(model, ins, cache):
    return model.mtp_cached(ins["h"], ins["tok"], cache, ins["pos"])


def _verify_and_draft(model, tok, cache, pos, vocab_size=None):
    """The model work of a greedy speculative step (the part compile=True compiles): tok (B, 2) =
    [pending token, draft] at positions pos, pos+1 -> the main model's picks (B, 2) (first, bonus)
    and the MTP's drafts (B, 2) from pairs (main hidden, next token) with next tokens = the picks."""
    logits, h = model.forward_cached(tok, cache, pos)
    pick = _logits_of(logits, vocab_size).argmax(dim=-1)
    return pick, _logits_of(model.mtp_cached(h, pick, cache, pos)[0], vocab_size).argmax(dim=-1)


def _greedy_spec_step(model, st, cache, vocab_size=None, eot=None, core=_verify_and_draft):
    """One step of greedy speculative decoding, with the generation's state on the device (st: the
    output buffer 'out' (B, L), token count 'n' and window start 's' (0-dim), 'draft' (B,),
    'finished' (B,) bool, counters 'accepted', 'drafted', 'steps'), updated in place. No host
    decision inside, so steps can be replayed back to back (a CUDA graph) without a sync.

    The main model runs [pending token out[n-1], draft] at positions pos, pos+1 (pos = n-1-s) ->
    first (its own choice for the draft's slot) and bonus (the token after the draft). The MTP
    then runs pairs (main hidden, next token) at pos, pos+1 with next tokens [first, bonus]: right
    whatever is accepted, since first == draft when the draft is accepted. Its logits at pos draft
    the token after `first` (if the step commits one token), at pos+1 the token after `bonus` (if
    it commits two). A rejected draft leaves junk at pos+1 in both caches and at out[n+1]; the
    next step writes there first. Batches run in lockstep: two tokens only if every unfinished row
    accepted. Once every row has finished (eot), n stops moving. core: _verify_and_draft, or its
    compiled self (the bookkeeping here stays out of it: the output buffer's length varies)."""
    out, n, fin = st["out"], st["n"], st["finished"]
    B = out.shape[0]
    pos = n - 1 - st["s"]
    pending = out.gather(1, (n - 1).expand(B, 1))
    pick, drafts = core(model, torch.cat([pending, st["draft"][:, None]], dim=1), cache, pos, vocab_size)
    accepted, live = pick[:, 0] == st["draft"], ~fin
    both = (accepted | fin).all()
    tok = pick
    if eot is not None:  # a finished row writes eot; a row finishes at its first eot
        t0 = torch.where(fin, eot, pick[:, 0])
        f1 = fin | (t0 == eot)
        t1 = torch.where(f1, eot, pick[:, 1])
        tok = torch.stack([t0, t1], dim=1)
        fin.copy_(torch.where(both, f1 | (t1 == eot), f1))
    out.scatter_(1, n + torch.arange(2, device=out.device).expand(B, 2), tok)
    go = live.any().long()
    st["accepted"].add_((accepted & live).sum())
    st["drafted"].add_(live.sum())
    st["steps"].add_(go)
    st["draft"].copy_(torch.where(both, drafts[:, 1], drafts[:, 0]))
    n.add_((1 + both.long()) * go)


_STEPS = {"main": _main_step, "mtp": _mtp_step, "spec": _greedy_spec_step}
_compiled = {}  # the torch.compile'd steps, made once per process: dynamo keeps one graph per shape


def _step_fn(kind, compile):
    if not compile:
        return _STEPS[kind]
    if kind == "spec":
        return functools.partial(_greedy_spec_step, core=_step_fn("core", True))
    if kind not in _compiled:
        _compiled[kind] = torch.compile(_verify_and_draft if kind == "core" else _STEPS[kind], dynamic=False)
    return _compiled[kind]


class DecodeSteps:
    """The decode steps of a generation: forward_cached ('main'), mtp_cached ('mtp') and the fused
    greedy speculative step ('spec', _greedy_spec_step). With compile or (on CUDA) cuda_graph they
    run at fixed shapes, the position a device tensor (model.py), so no step has a host sync or a
    shape of its own. compile: torch.compile each (one compilation per shape; fuses the ~900
    small kernels of a step into ~300). cuda_graph: on CUDA, capture each as a CUDA graph and
    replay it: one launch instead of hundreds. At these model sizes an eager step is bound by the
    CPU launching kernels, not by the GPU. With neither (or cuda_graph alone off CUDA) the steps
    run eagerly, 'main' and 'mtp' with int positions ('spec' reads its positions from its state).
    Build this BEFORE the prefill: warm-up runs write junk into the first cache slots, which the
    prefill then overwrites (and later slots are masked).
    shapes: the (kind, T) steps to prepare (T = 2 for 'spec'); others run eagerly when asked for.
    state, vocab_size, eot: the 'spec' step's state tensors (they are its inputs and outputs, read
    and written in place) and constants (_greedy_spec_step)."""

    def __init__(self, model, cache, batch_size, device, shapes, cuda_graph=True, compile=False,
                 vocab_size=None, state=None, eot=None):
        self.model, self.cache, self.state = model, cache, state
        self.spec_kw = {"vocab_size": vocab_size, "eot": eot}
        self.steps = {}
        graph = cuda_graph and torch.device(device).type == "cuda"
        if not (graph or compile):
            return
        d, dt = model.args.n_embd, model.tok_emb.weight.dtype
        for kind, T in [(k, T) for k, T in shapes if T <= model.args.block_size]:
            if kind == "spec":
                ins, kw = state, self.spec_kw
            else:
                ins, kw = {"tok": torch.zeros(batch_size, T, dtype=torch.long, device=device),
                           "pos": torch.zeros((), dtype=torch.long, device=device),
                           "h": torch.zeros(batch_size, T, d, dtype=dt, device=device)}, {}
            fn = _step_fn(kind, compile)
            run = lambda fn=fn, ins=ins, kw=kw: fn(model, ins, cache, **kw)  # noqa: E731
            # warm up (compilation, allocations, lazy init), on a side stream before a capture; a
            # 'spec' warm-up advances the state's n: put it back each time, so the writes stay at
            # out[n], out[n + 1] (the caller sets n and s so that they are in bounds)
            n0 = state["n"].clone() if kind == "spec" else None
            side = torch.cuda.Stream() if graph else None
            if graph:
                side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side) if graph else nullcontext():
                for _ in range(2):
                    run()
                    if n0 is not None:
                        state["n"].copy_(n0)
            if not graph:
                self.steps[(kind, T)] = (None, ins, run)
                continue
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs = run()
            self.steps[(kind, T)] = (g, ins, outs)

    def _run(self, kind, T, pos, **inputs):
        if (kind, T) not in self.steps:  # eagerly (main, mtp: with an int position)
            if kind == "spec":
                return _greedy_spec_step(self.model, self.state, self.cache, **self.spec_kw)
            return _STEPS[kind](self.model, dict(inputs, pos=pos), self.cache)
        g, ins, outs = self.steps[(kind, T)]
        for k, v in inputs.items():
            ins[k].copy_(v)
        if pos is not None:
            ins["pos"].fill_(pos)
        if g is None:
            return outs()
        g.replay()
        return outs  # overwritten by the next replay: use before then

    def main(self, tok, pos):
        """forward_cached(tok (B, T), pos) -> (logits, h)"""
        return self._run("main", tok.shape[1], pos, tok=tok)

    def mtp(self, h, tok, pos):
        """mtp_cached(h, tok, pos) -> (draft logits, hidden)"""
        return self._run("mtp", tok.shape[1], pos, h=h, tok=tok)

    def spec(self):
        """_greedy_spec_step on the state"""
        self._run("spec", 2, None)


# -----------------------------------------------------------------------------
# plain decoding: prefill once, then one token per step

@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eot=None,
             generator=None, *, vocab_size=None, on_tokens=None, stream_every=8, eot_check_every=16,
             cuda_graph=False, compile=False):
    """Continue every row of idx (B, T) by max_new_tokens tokens. Returns (B, T + n) token ids,
    n <= max_new_tokens (fewer only when every row has ended).

    temperature 0 is greedy; top_k/top_p filter after the temperature (filter_logits). With eot
    set, a row that produced eot goes on producing eot only, and generation stops once every row
    has (checked every eot_check_every steps: the check waits for the device). vocab_size: only
    ids below it are drawn (GPT-2's 50257 of the 50304-wide padded head). on_tokens(new (B, k)):
    called with the new tokens every stream_every steps and at the end (for streaming; reading
    them waits for the device, so every step would cost a sync). generator: a torch.Generator on
    the model's device, for reproducible sampling.

    The loop has no host sync except the periodic eot check (and whatever on_tokens does); the context window is cropped the
    way described at the top of this file (window_starts() is the rule). The model only ever sees
    fresh tensors, never views into the output buffer, whose offsets change every step.
    cuda_graph (CUDA only) / compile: run the 1-token step as a captured CUDA graph and/or
    torch.compile'd (DecodeSteps); the same tokens, up to floating-point rounding."""
    _check(temperature, top_k, top_p, max_new_tokens)
    B, P = idx.shape
    bs = model.args.block_size
    out = torch.empty(B, P + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :P] = idx
    if max_new_tokens == 0 or P == 0:
        if P == 0 and max_new_tokens:
            raise ValueError("idx is empty: start from at least one token (e.g. the end-of-text token)")
        return out
    with _EvalMode(model):
        cache = _cache_of(model, B)
        steps = DecodeSteps(model, cache, B, idx.device, [("main", 1)], cuda_graph, compile)
        s = max(0, P - bs)             # the window: out[:, s:n] sits at positions 0..n-s-1
        logits = model.forward_cached(out[:, s:P].clone(), cache, 0)[0][:, -1]
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        n = streamed = P
        for i in range(max_new_tokens):
            tok = _pick(_logits_of(logits, vocab_size), temperature, top_k, top_p, generator)
            if eot is not None:
                tok = torch.where(finished, eot, tok)
                finished |= tok == eot
            out[:, n] = tok
            n += 1
            if on_tokens is not None and n - streamed >= stream_every:
                on_tokens(out[:, streamed:n])
                streamed = n
            if i == max_new_tokens - 1:
                break
            if eot is not None and (i + 1) % eot_check_every == 0 and bool(finished.all()):
                break
            if n - s > bs:  # no room for the next position: slide the window and prefill again
                s = n - max(1, bs // 2)
                logits = model.forward_cached(out[:, s:n].clone(), cache, 0)[0][:, -1]
            else:
                logits = steps.main(tok[:, None], n - 1 - s)[0][:, -1]
        if on_tokens is not None and n > streamed:
            on_tokens(out[:, streamed:n])
    return out[:, :n]


def window_starts(prompt_len, total_len, block_size):
    """The window rule shared by generate and generate_speculative: the token at index m (>=
    prompt_len) is predicted from tokens s..m-1 at positions 0..m-1-s, where s starts at
    max(0, prompt_len - block_size) and jumps to m - block_size // 2 when m - s > block_size.
    Returns the s for each m in prompt_len..total_len-1 (tests build their reference with it)."""
    s, starts = max(0, prompt_len - block_size), []
    for m in range(prompt_len, total_len):
        if m - s > block_size:
            s = m - max(1, block_size // 2)
        starts.append(s)
    return starts


# -----------------------------------------------------------------------------
# speculative decoding with the MTP module as the draft model

@torch.no_grad()
def generate_speculative(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                         eot=None, generator=None, *, vocab_size=None, on_tokens=None, sync_every=16,
                         cuda_graph=False, compile=False):
    """Like generate(), but the MTP module (depth 0) drafts the token after next and the main model
    checks it: each step feeds [last token, draft] to forward_cached as a 2-token chunk, so one
    step can commit two tokens. Greedy (temperature 0) gives exactly generate()'s tokens in fp32;
    in bf16 the 1-token and 2-token forwards round differently, so the two can part where two
    logits tie in bf16 (seen on an H100 with a barely trained model: top-2 both 13.125), each
    still a greedy continuation. Sampling uses speculative_accept, which leaves the output
    distribution unchanged.
    Returns (tokens (B, T + n), stats {'accepted', 'drafted', 'steps'}), where drafted counts the
    drafts checked (per unfinished row), accepted those the main model kept, steps the main-model
    forwards after the prompt.

    Greedy runs ahead: up to sync_every fused steps (_greedy_spec_step: verify, commit, draft; the
    count of tokens lives on the device) between host syncs, as many as cannot reach the end of
    the window or of the generation even if each commits two tokens. on_tokens is called at the
    syncs. Sampling decides on the host after every step (one sync per step).

    Batch > 1 runs in lockstep, since forward_cached takes one start position for all rows: a step
    commits two tokens for every row only if every unfinished row accepted its draft, else one
    (a row's bonus token is then dropped and drawn again in the next step, which keeps the
    distribution exact, because whether it is dropped depends only on the other rows' independent
    draws). So the speed-up shrinks as the batch grows; batch 1 is the plain algorithm.

    Invariant between steps (n = tokens so far, window start s): the main cache holds tokens
    s..n-2 (the last token is pending), the MTP cache holds pairs (main hidden of token j, token
    j+1) for j = s..n-2, and `draft` (drawn from q, the MTP's logits at j = n-2) proposes token n.
    Entries written for a rejected draft are overwritten by the next step (positions are explicit)."""
    _check(temperature, top_k, top_p, max_new_tokens)
    if model.args.mtp_depth < 1:
        raise ValueError("speculative decoding needs an MTP module (this model has mtp_depth=0)")
    B, P = idx.shape
    if P == 0:
        raise ValueError("idx is empty: start from at least one token (e.g. the end-of-text token)")
    bs = model.args.block_size
    W = max(1, bs // 2)
    out = torch.empty(B, P + max_new_tokens + 1, dtype=torch.long, device=idx.device)
    out[:, :P] = idx
    stats = {"accepted": 0, "drafted": 0, "steps": 0}
    if max_new_tokens == 0:
        return out[:, :P], stats
    greedy = temperature == 0
    dev = idx.device
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    accepted_sum = torch.zeros((), dtype=torch.long, device=dev)
    # greedy's device-side state (_greedy_spec_step), counters included
    st = {"out": out, "finished": finished, "draft": torch.zeros(B, dtype=torch.long, device=dev),
          **{k: torch.zeros((), dtype=torch.long, device=dev) for k in ("n", "s", "accepted", "drafted", "steps")}}

    def draft_from(mtp_logits):
        """-> (draft token (B,), its distribution q (B, V) or None when greedy)."""
        logits = _logits_of(mtp_logits, vocab_size)
        if greedy:
            return logits.argmax(dim=-1), None
        q = _probs(logits, temperature, top_k, top_p)
        return _draw(q, generator), q

    def refill(s, n):
        """(Re)build both caches for the window s..n-1 (the last token pending) -> draft or None."""
        if n - 1 - s <= 0:
            return None
        h = model.forward_cached(out[:, s:n - 1].clone(), cache, 0)[1]
        return draft_from(model.mtp_cached(h, out[:, s + 1:n].clone(), cache, 0)[0][:, -1])

    def commit(tokens, n):
        """Write tokens (B, k) at n.., applying end-of-text; -> new n."""
        for j in range(tokens.shape[1]):
            tok = tokens[:, j]
            if eot is not None:
                tok = torch.where(finished, eot, tok)
                finished.logical_or_(tok == eot)
            out[:, n + j] = tok
        if on_tokens is not None:
            k = min(tokens.shape[1], P + max_new_tokens - n)
            on_tokens(out[:, n:n + k])
        return n + tokens.shape[1]

    with _EvalMode(model):
        cache = _cache_of(model, B)
        # greedy: one fused step (the rare 1-token steps run eagerly); sampling: the four pieces
        shapes = [("spec", 2)] if greedy else [("main", 1), ("main", 2), ("mtp", 1), ("mtp", 2)]
        st["n"].fill_(P)  # the warm-ups' step: pending token P - 1 at position 0, writes at out[P], out[P + 1]
        st["s"].fill_(P - 1)
        steps = DecodeSteps(model, cache, B, dev, shapes, cuda_graph, compile, vocab_size, st, eot)
        for k in ("accepted", "drafted", "steps"):  # (warm-up runs moved them)
            st[k].zero_()
        finished.zero_()
        n = P
        s = max(0, P - bs)
        draft = refill(s, n)
        while n < P + max_new_tokens:
            if n - s > bs:  # slide, exactly where generate() slides
                s = n - W
                draft = refill(s, n)
            pos = n - 1 - s                 # position of the pending token
            if greedy and draft is not None and pos + 1 < bs:
                # k fused steps, then one sync; each step starts at n <= limit - 1 (pos + 1 < bs)
                k = min(sync_every, (min(s + bs, P + max_new_tokens) - 1 - n) // 2 + 1)
                st["n"].fill_(n)
                st["s"].fill_(s)
                st["draft"].copy_(draft[0])
                for _ in range(k):
                    steps.spec()
                n_new, n_live = torch.stack([st["n"], (~finished).sum()]).tolist()
                if on_tokens is not None and n_new > n:
                    on_tokens(out[:, n:min(n_new, P + max_new_tokens)])
                n = n_new
                if n_live == 0:
                    break
                draft = (st["draft"], None) if n - s <= bs and n < P + max_new_tokens else None
                continue
            stats["steps"] += 1
            pending = out[:, n - 1:n].clone()
            if draft is None or pos + 1 >= bs:
                # no draft (a 1-token window) or no room for it: an ordinary step
                logits, h = steps.main(pending, pos)
                tok = _pick(_logits_of(logits[:, 0], vocab_size), temperature, top_k, top_p, generator)
                n = commit(tok[:, None], n)
                if eot is not None and bool(finished.all()):
                    break
                draft = None  # (a slide or the end would waste the MTP's work)
                if n - s <= bs and n < P + max_new_tokens:
                    draft = draft_from(steps.mtp(h, out[:, n - 1:n].clone(), pos)[0][:, -1])
                continue
            d, q = draft  # sampling from here on
            logits, h = steps.main(torch.cat([pending, d[:, None]], dim=1), pos)
            logits = _logits_of(logits, vocab_size)
            acc, first = speculative_accept(_probs(logits[:, 0], temperature, top_k, top_p), q, d, generator)
            bonus = _draw(_probs(logits[:, 1], temperature, top_k, top_p), generator)
            all_acc = (acc | finished).all()
            live = ~finished
            accepted_sum += (acc & live).sum()
            # the step's one host sync: did every unfinished row accept, and are any left?
            both, n_live = torch.stack([all_acc.long(), live.sum()]).tolist()
            if n_live == 0:  # every row ended in an earlier step
                stats["steps"] -= 1
                break
            stats["drafted"] += n_live
            if both:  # every row kept its draft: commit it and the bonus token
                n = commit(torch.stack([first, bonus], dim=1), n)
                hh, nxt = h, out[:, n - 2:n].clone()
            else:
                n = commit(first[:, None], n)
                hh, nxt = h[:, :1].contiguous(), out[:, n - 1:n].clone()
            # keep the MTP cache in step with the accepted tokens: (hidden of token j, token j+1)
            # at j = pos.. ; its last logits draft the next token
            draft = None
            if n - s <= bs and n < P + max_new_tokens:
                draft = draft_from(steps.mtp(hh, nxt, pos)[0][:, -1])
    acc, drafted, steps_ = torch.stack([accepted_sum + st["accepted"], st["drafted"], st["steps"]]).tolist()
    stats["accepted"] = acc
    stats["drafted"] += drafted
    stats["steps"] += steps_
    return out[:, :min(n, P + max_new_tokens)], stats


# -----------------------------------------------------------------------------
# streaming text

class TextStream:
    """An on_tokens callback for batch 1 that writes the decoded text as tokens arrive. Decodes
    bytes incrementally, so a character split over two tokens is written once it is whole."""

    def __init__(self, enc, file=None, eot=None):
        self.enc, self.file, self.eot = enc, file or sys.stdout, eot
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.done = False

    def __call__(self, tokens):
        text = []
        for t in tokens[0].tolist():
            if self.done or (self.eot is not None and t == self.eot):
                self.done = True
                break
            text.append(self.decoder.decode(self.enc.decode_single_token_bytes(t)))
        if text:
            self.file.write("".join(text))
            self.file.flush()

    def close(self):
        self.file.write(self.decoder.decode(b"", final=True))
        self.file.flush()


def story_text(enc, new_tokens, eot=None):
    """The text of one row's generated tokens, cut at the first end-of-text when eot is set."""
    ids = list(new_tokens)
    if eot is not None and eot in ids:
        ids = ids[:ids.index(eot)]
    return enc.decode(ids)


# -----------------------------------------------------------------------------
# command line

def fail(msg, code=1):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    out_dir = "out-tinystories"     # where train.py wrote ckpt.pt
    start = "Once upon a time"      # the prompt, or "FILE:path" to read it from a file; "" = a new story
    eot_prefix = True               # put <|endoftext|> before the prompt: every story starts after one
    num_samples = 1                 # stories, generated as one batch (1 streams to stdout)
    max_new_tokens = 500            # tokens per story at most
    temperature = 0.8               # 0 = greedy; < 1 sharper, > 1 more random
    top_k = None                    # keep only the top_k most likely tokens (None = all)
    top_p = 0.95                    # nucleus: the smallest set with this much probability (1.0 = all)
    stop_at_eot = True              # end a story at <|endoftext|>
    speculative = False             # MTP drafts the token after next, the main model verifies
    seed = 1337
    device = "auto"                 # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype = "auto"                  # 'auto' (bfloat16 on CUDA if supported, else float32), 'float32', 'bfloat16', 'float16'
    compile = False                 # torch.compile the decode steps (DecodeSteps): ~1 min of compiling
                                    # first, then faster steps; pays off for long or many generations
    cuda_graph = True               # on CUDA, replay each decode step as a CUDA graph (DecodeSteps)
    verbose = False                 # report tokens/s (and the draft acceptance rate) on stderr
    from configurator import configure
    configure(globals())

    # ---- the knobs (before anything slow) ----
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        fail(f"temperature must be >= 0 (0 = greedy), got {temperature!r}", 2)
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        fail(f"top_k must be an integer >= 1 or None, got {top_k!r}", 2)
    if not 0 < top_p <= 1:
        fail(f"top_p must be in (0, 1], got {top_p!r}", 2)
    if max_new_tokens < 0:
        fail(f"max_new_tokens must be >= 0, got {max_new_tokens}", 2)
    if num_samples < 1:
        fail(f"num_samples must be >= 1, got {num_samples}", 2)
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the prompt file '{path}': {getattr(e, 'strerror', None) or e}")

    # ---- device and precision ----
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device_type = torch.device(device).type
    except (RuntimeError, ValueError):
        fail(f"device='{device}' is not a device (use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps')", 2)
    if device_type not in ("cpu", "cuda", "mps"):
        fail(f"device='{device}' is not supported (use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps')", 2)
    if device_type == "cuda" and not torch.cuda.is_available():
        fail(f"device='{device}' but CUDA is not available (use --device=cpu or --device=auto)", 2)
    if device_type == "mps" and not torch.backends.mps.is_available():
        fail("device='mps' but MPS is not available", 2)
    if device_type == "cuda" and torch.device(device).index is not None \
            and torch.device(device).index >= torch.cuda.device_count():
        fail(f"device='{device}' but there are {torch.cuda.device_count()} CUDA devices", 2)
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"dtype='{dtype}' must be 'auto', 'float32', 'bfloat16' or 'float16'", 2)
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- the model ----
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    try:
        model, ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    except CheckpointError as e:
        fail(str(e))
    del ckpt
    if speculative and model.args.mtp_depth < 1:
        fail(f"{ckpt_path} has no MTP module (mtp_depth=0): speculative decoding needs one", 2)
    model.eval()
    # Weights in the sampling dtype; the buffers (RoPE tables, the expert-selection bias) stay
    # fp32, as they were in training under autocast.
    for p in model.parameters():
        p.data = p.data.to(getattr(torch, dtype))
    model.to(device)

    # ---- the prompt ----
    try:
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network on first use, a broken cache, no tiktoken
        fail(f"cannot load tiktoken's GPT-2 encoding ({type(e).__name__}); it is downloaded on first use "
             "(needs the network once), or point TIKTOKEN_CACHE_DIR at a cache that has it")
    ids = enc.encode(start, allowed_special={"<|endoftext|>"})
    if eot_prefix or not ids:
        ids = [EOT] + ids
    V = model.args.vocab_size
    if max(ids) >= V:
        fail(f"the prompt has token {max(ids)} but the model's vocabulary has {V} (a GPT-2 model needs >= 50257)")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None].repeat(num_samples, 1)
    eot = EOT if stop_at_eot and EOT < V else None
    gen = torch.Generator(device=device).manual_seed(seed)
    stream = TextStream(enc, sys.stdout, eot) if num_samples == 1 else None
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, eot=eot, generator=gen,
              vocab_size=min(V, enc.n_vocab), on_tokens=stream, cuda_graph=cuda_graph, compile=compile)

    def sync():
        if device_type == "cuda":
            torch.cuda.synchronize()

    try:
        if stream is not None:
            sys.stdout.write(start)
            sys.stdout.flush()
        sync()
        t0 = time.perf_counter()
        if speculative:
            y, st = generate_speculative(model, x, max_new_tokens, **kw)
        else:
            y, st = generate(model, x, max_new_tokens, **kw), None
        sync()
        dt = time.perf_counter() - t0
        if stream is not None:
            stream.close()
            print("\n---------------")
        else:
            for row in y[:, len(ids):].tolist():
                print(start + story_text(enc, row, eot))
                print("---------------")
        sys.stdout.flush()
        if verbose:
            # tokens written, up to and including each story's end-of-text (not the padding after it)
            rows = y[:, len(ids):].tolist()
            made = sum(r.index(eot) + 1 if eot is not None and eot in r else len(r) for r in rows)
            new = y.shape[1] - len(ids)
            msg = (f"{made} tokens ({num_samples} x up to {new}) in {dt:.2f}s: {made / dt:.1f} tokens/s "
                   f"({device}, {dtype}{', speculative' if speculative else ''})")
            if st is not None:
                rate = st["accepted"] / st["drafted"] if st["drafted"] else float("nan")
                msg += (f"; drafts accepted {st['accepted']}/{st['drafted']} = {rate:.1%}, "
                        f"{new / max(st['steps'], 1):.2f} tokens per step")
            print(msg, file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. | head
        sys.stderr.close()
        sys.exit(141)
