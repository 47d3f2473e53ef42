"""
Write stories with a trained DeepSeek-V3 (train.py's out_dir/ckpt.pt):

    python sample.py --start="Once upon a time"
    python sample.py --start=FILE:prompt.txt --num_samples=4 --temperature=0.7 --top_p=0.9
    python sample.py --speculative=True --verbose=True      # MTP drafts, the main model verifies

One way to decode (generate): prefill the prompt into MLA's compressed cache, then run one
fixed-shape step (_step) again and again: the pending token in, with speculative=True also the
MTP module's draft of the next one, kept or replaced by the speculative-sampling rule (greedy is
its one-hot case). The state, token count too, stays on the device (a CUDA graph replays the step,
torch.compile fuses it); every few steps the host reads it to stream, stop at end-of-text and
slide the window: token m is predicted from tokens s..m-1 at positions 0..m-1-s, s jumping to
m - block_size // 2 once m - s > block_size (a cropped context, like nanoGPT's crop, in jumps).
"""

import codecs
import functools
import os
import sys
import time

import torch

from configurator import fail
from model import CheckpointError, load_checkpoint, pick_device
from prepare import PrepareError, load_encoding


# ---- turning logits into tokens ------------------------------------------------------------------

def filter_logits(logits, top_k=None, top_p=1.0):
    """Set to -inf every logit that top-k or nucleus (top-p) filtering removes, in that order.
    top_k: keep the k largest (a value tied with the k-th largest is kept too, as in nanoGPT);
    top_p: then keep the smallest set of most likely tokens whose probability adds up to >= top_p
    (the most likely token always stays). top_k=None and top_p=1.0 turn them off. logits: (..., V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs       # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p                # the set reached top_p without this one
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probs_of(logits, temperature, top_k, top_p, vocab_size):
    """The distribution (..., vocab_size) fp32 to draw from: ids below vocab_size (GPT-2's 50257 of the
    padded head), then temperature, top-k, top-p. Temperature 0 (greedy): the argmax's one-hot."""
    logits = logits[..., :vocab_size].float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)


def draw(p, e):
    """One token per row from p (..., V), which need not sum to 1: the exponential race argmax_i
    p_i / e_i with e_i ~ Exp(1) picks i with probability p_i / sum(p). Unlike torch.multinomial it
    never waits for the GPU, and the noise e comes in, so a captured step can replay it."""
    return (p / e).argmax(dim=-1)


def speculative_accept(p, q, draft, u, e):
    """The speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023) for one drafted
    token per row: accept draft ~ q when u < p(draft) / q(draft), otherwise draw from max(0, p - q).
    Either way the token is distributed exactly as p; one-hot p and q (greedy) keep the draft iff it
    is p's argmax. p, q: (B, V); draft: (B,); noise u ~ U[0, 1) (B,), e ~ Exp(1) (B, V).
    Returns (accepted (B,) bool, token (B,))."""
    pd = p.gather(-1, draft[:, None])[:, 0]
    qd = q.gather(-1, draft[:, None])[:, 0]
    accepted = u * qd < pd  # u < p/q without dividing (q(draft) > 0 since draft ~ q)
    # max(0, p - q), floored at a 1e-30 share of p: never all zero (where p == q up to rounding)
    return accepted, torch.where(accepted, draft, draw(torch.maximum(p - q, 1e-30 * p), e))


def _check(temperature, top_k, top_p, max_new_tokens):
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (type(top_k) is int and top_k >= 1):  # (not a bool)
        raise ValueError(f"top_k must be an integer >= 1 or None (off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {top_p!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


# ---- the decoding step ---------------------------------------------------------------------------

def _step(model, cache, pending, st, cfg, T):
    """One step's model work and draws, fixed shapes, no host sync (compile=True compiles this):
    pending (B, 1) at position st['pos'], with T = 2 and a draft ~ st['q']. Updates st; -> the
    tokens for out[n..] (B, T) and how many count (2 if every unfinished row kept its draft; 0 once
    all have ended). The draft's slot yields the bonus token; the MTP then runs (main hidden, new
    token) at both positions, right whatever is kept, so its logits draft the token after a 1- or a
    2-token commit. A rejected draft leaves junk at the second position, written first next step.
    Rows run in lockstep: dropping a row's bonus since another row rejected keeps the law exact."""
    pos, fin, e, eot = st["pos"], st["fin"], st["e"], cfg[4]
    tok = pending if T == 1 else torch.cat([pending, draw(st["q"], e[:, 2])[:, None]], dim=1)
    logits, h = model.forward_cached(tok, cache, pos)
    if T == 1:  # (greedy: the argmax itself, rather than a draw from its one-hot)
        new = logits[..., :cfg[3]].argmax(-1) if cfg[0] == 0 else draw(probs_of(logits, *cfg[:4]), e[:, :1])
        keep, both = 1, None
    else:
        p = probs_of(logits, *cfg[:4])
        live = ~fin
        accepted, first = speculative_accept(p[:, 0], st["q"], tok[:, 1], st["u"], e[:, 0])
        new = torch.stack([first, draw(p[:, 1], e[:, 1])], dim=1)
        both = (accepted | fin).all()
        q = probs_of(model.mtp_cached(h, new, cache, pos)[0], *cfg[:4])
        st["q"].copy_(torch.where(both, q[:, 1], q[:, 0]))  # the next draft's law
        st["accepted"].add_((accepted & live).sum())
        st["drafted"].add_(live.sum())
        keep = 1 + both.long()
    if eot is not None:  # end of text: a row that has written eot writes only eot from then on
        cols, ended = [], [fin]
        for t in new.unbind(1):
            cols.append(torch.where(ended[-1], eot, t))
            ended.append(ended[-1] | (cols[-1] == eot))
        new, keep = torch.stack(cols, dim=1), keep * (~fin).any()
        fin.copy_(ended[1] if both is None else torch.where(both, ended[2], ended[1]))
    return new, keep


@functools.cache
def _compiled_step():
    return torch.compile(_step, dynamic=False)  # one per process: dynamo keeps a graph per shape


def _step_fn(model, cache, out, st, cfg, T, generator, graph, compile):
    """The step with T tokens in, as a callable: noise, _step on the pending token, the new tokens
    written at n. graph: captured as a CUDA graph, one launch instead of hundreds (eager, a step is
    bound by the CPU launching kernels), after two runs on a side stream (compiling, allocating)."""
    core, at = _compiled_step() if compile else _step, torch.arange(T, device=out.device)

    def run():  # (n, pos and keep stay on the device)
        n = st["n"]
        new, keep = core(model, cache, out.gather(1, (n - 1).expand(out.shape[0], 1)), st, cfg, T)
        out.scatter_(1, (n + at).expand_as(new), new)
        n.add_(keep)
        st["pos"].add_(keep)
    if graph:
        saved, side = {k: v.clone() for k, v in st.items()}, torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # each from the state as given (writes at out[n], cache slot pos..)
                run()
                for k, v in saved.items():
                    st[k].copy_(v)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()

    def step():
        if cfg[0] > 0:  # sampling: fresh noise, drawn outside the graph so that each replay has its own
            st["u"].uniform_(generator=generator)
            st["e"].exponential_(generator=generator).clamp_min_(1e-20)
        (g.replay if graph else run)()
    return step


def _prefill(model, cache, out, st, s, n, cfg, speculative):
    """(Re)build the caches for the window out[:, s:n] but its pending last token: main model, and MTP
    pairs (main hidden of token j, token j+1) for the draft's law. -> whether a draft is ready."""
    if n - 1 - s == 0:
        return not speculative  # no pair yet to draft from
    h = model.forward_cached(out[:, s:n - 1], cache, 0)[1]
    if speculative:
        st["q"].copy_(probs_of(model.mtp_cached(h, out[:, s + 1:n], cache, 0)[0][:, -1], *cfg[:4]))
    return True


# ---- generation ----------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0, eot=None, generator=None,
             *, speculative=False, vocab_size=None, on_tokens=None, sync_every=16, cuda_graph=False,
             compile=False):
    """Continue every row of idx (B, T) by max_new_tokens tokens. -> (tokens (B, T + n), {'accepted',
    'drafted'}: drafts kept and checked, per unfinished row); n < max_new_tokens only once every row
    has ended: with eot set, a row that wrote eot writes only eot. temperature 0 is greedy; top_k,
    top_p filter after it. vocab_size: draw only ids below it. generator: for reproducible sampling.
    speculative: the MTP module drafts; greedy gives the plain tokens exactly in fp32 (in bf16 the
    1- and 2-token steps round differently: a near-tie can break the other way), sampling the same
    law. The host reads the state every sync_every steps at most (the token count and rows left)
    and calls on_tokens(new tokens (B, k)). cuda_graph (CUDA): replay steps as CUDA graphs."""
    _check(temperature, top_k, top_p, max_new_tokens)
    if speculative and model.args.mtp_depth < 1:
        raise ValueError("speculative decoding needs an MTP module (this model has mtp_depth=0)")
    B, P = idx.shape
    if P == 0:
        raise ValueError("idx is empty: start from at least one token (e.g. the end-of-text token)")
    bs, dev, end = model.args.block_size, idx.device, P + max_new_tokens
    out = torch.cat([idx, idx.new_empty(B, max_new_tokens + 2)], dim=1)  # (+2: a step at end - 1, warm-ups)
    V = min(vocab_size or model.args.vocab_size, model.args.vocab_size)
    cfg = (temperature, top_k, top_p, V, eot)
    z = functools.partial(torch.zeros, device=dev, dtype=torch.long)
    # tokens so far, the pending token's position (warm-ups: out[P - 1] at 0), rows ended, the
    # draft's law q, noise for the draws (greedy: u = 0, e = 1), and the draft counts
    st = {"n": z(()) + P, "pos": z(()), "fin": z(B, dtype=torch.bool), "q": z(B, V, dtype=torch.float),
          "u": z(B, dtype=torch.float), "e": torch.ones(B, 3 if speculative else 1, V, device=dev),
          "accepted": z(()), "drafted": z(())}
    was_training = model.training
    model.eval()
    try:
        cache = model.make_cache(B, dtype=model.tok_emb.weight.dtype)
        # (before the prefill: warm-ups write junk into the first cache slots, rewritten before use)
        graph, Ts = cuda_graph and dev.type == "cuda", ((1, 2) if speculative and bs > 1 else (1,))
        steps = {T: _step_fn(model, cache, out, st, cfg, T, generator, graph, compile and T == Ts[-1])
                 for T in Ts}  # compiled: the usual step (speculative, a 1-token one is rare)
        n, s, ready = P, max(0, P - bs), False
        while n < end:
            if n - s > bs:  # no room for the next token's context: slide the window
                s, ready = n - max(1, bs // 2), False
            if not ready:
                ready = _prefill(model, cache, out, st, s, n, cfg, speculative)
            T = 2 if speculative and ready and n - s < bs else 1
            # as many steps as cannot pass the window or the end, even if each commits T tokens
            k = 1 if speculative and T == 1 else min(sync_every, (min(s + bs + 2 - T, end) - 1 - n) // T + 1)
            st["n"].fill_(n)
            st["pos"].fill_(n - 1 - s)
            for _ in range(k):
                steps[T]()
            n_new, left = torch.stack([st["n"], (~st["fin"]).sum()]).tolist()  # the one host sync
            if on_tokens is not None and n_new > n:
                on_tokens(out[:, n:min(n_new, end)])
            n = n_new
            if left == 0:
                break
    finally:
        model.train(was_training)
    accepted, drafted = torch.stack([st["accepted"], st["drafted"]]).tolist()
    return out[:, :min(n, end)], {"accepted": accepted, "drafted": drafted}


# ---- the command line ----------------------------------------------------------------------------

class TextStream:
    """An on_tokens callback for batch 1: writes the text as tokens arrive, up to the end-of-text
    token eot, decoding bytes incrementally (a character split over two tokens is written whole)."""

    def __init__(self, enc, eot=None, file=None):
        self.enc, self.eot, self.file, self.done = enc, eot, file or sys.stdout, False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, tokens):
        ids = [] if self.done else tokens[0].tolist()
        if self.eot in ids:
            ids, self.done = ids[:ids.index(self.eot)], True
        self.file.write(self.decoder.decode(self.enc.decode_bytes(ids)))
        self.file.flush()

    def close(self):
        self.file.write(self.decoder.decode(b"", final=True))


def load_model(path, device, dtype, compile, speculative):
    """-> (the checkpoint's model on device in dtype, compile, pick_device's line), or an error line."""
    try:
        device, dtype, compile, moe_impl, line = pick_device(device, dtype, compile)
    except ValueError as e:
        fail(e)
    try:
        model = load_checkpoint(path, map_location="cpu", moe_impl=moe_impl)[0]
    except CheckpointError as e:
        fail(e, 1)
    if speculative and model.args.mtp_depth < 1:
        fail(f"{path} has no MTP module (mtp_depth=0): speculative decoding needs one")
    for p in model.parameters():  # the buffers (RoPE tables, expert biases) stay fp32, as in training
        p.data = p.data.to(getattr(torch, dtype))
    return model.to(device).eval(), compile, line


def main():
    """The command line, on the knobs below (module globals): stories to stdout, notes to stderr."""
    try:
        _check(temperature, top_k, top_p, max_new_tokens)
    except ValueError as e:
        fail(e)
    if num_samples < 1:
        fail(f"num_samples must be >= 1, got {num_samples}")
    prompt = start
    if start.startswith("FILE:"):
        try:
            with open(start[len("FILE:"):], encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the prompt file '{start[5:]}': {getattr(e, 'strerror', None) or e}", 1)
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model, compiled, line = load_model(os.path.join(out_dir, "ckpt.pt"), device, dtype, compile, speculative)
    dev = model.tok_emb.weight.device
    try:
        enc, V = load_encoding(), model.args.vocab_size
    except PrepareError as e:
        fail(e, 1)
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})
    ids = [enc.eot_token] + ids if eot_prefix or not ids else ids
    if max(ids) >= V:
        fail(f"the prompt has token {max(ids)}, the model's vocabulary {V} (GPT-2 needs >= 50257)", 1)
    eot = enc.eot_token if stop_at_eot else None
    stream = TextStream(enc, eot) if num_samples == 1 else None  # one story streams as it is written
    if stream:
        print(prompt, end="", flush=True)
    t0 = time.perf_counter()
    y, st = generate(model, torch.tensor([ids] * num_samples, device=dev), max_new_tokens, temperature, top_k,
                     top_p, eot, torch.Generator(device=dev).manual_seed(seed), speculative=speculative,
                     vocab_size=min(V, enc.n_vocab), on_tokens=stream, cuda_graph=cuda_graph,
                     compile=compiled)
    secs = time.perf_counter() - t0  # (generate's last read waited for the device)
    rows = y[:, len(ids):].tolist()
    for row in rows:
        text = stream or TextStream(enc, eot)
        if not stream:
            print(prompt, end="")
            text(torch.tensor([row]))
        text.close()
        print("\n---------------", flush=True)
    if verbose:  # tokens written, up to and including each story's end-of-text
        made = sum(r.index(eot) + 1 if eot in r else len(r) for r in rows)
        a, d = st["accepted"], st["drafted"]
        note = f"; drafts accepted {a}/{d} = {a / max(d, 1):.1%}" if speculative else ""
        print(f"{made} tokens in {secs:.2f}s: {made / secs:.1f} tokens/s ({line}){note}",
              file=sys.stderr)


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
    dtype = "auto"                  # 'auto' (by the GPU: model.pick_device), float32, bfloat16, float16
    compile = False                 # torch.compile the decode step: ~20-40 s of compiling, then faster
    cuda_graph = True               # on CUDA, replay each decode step as a captured CUDA graph
    verbose = False                 # report tokens/s (and the draft acceptance rate) on stderr
    try:
        from configurator import configure
        configure(globals())
        main()
        sys.stdout.flush()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
