"""
Write stories with a trained DeepSeek-V3 (train.py's out_dir/ckpt.pt):

    python sample.py --start="Once upon a time"
    python sample.py --start=FILE:prompt.txt --num_samples=4 --temperature=0.7 --top_p=0.9
    python sample.py --speculative=True --verbose=True      # MTP drafts, the main model verifies

One way to decode (generate): the prompt is prefilled into MLA's compressed cache, then one
fixed-shape step (_step) runs again and again. It feeds the pending token, or with speculative=True
the pending token and the MTP module's draft of the next one; the main model's distribution p
decides, by the speculative-sampling rule (speculative_accept), whether the draft stays, and one or
two tokens are committed. Greedy (temperature 0) is the one-hot case of the same rule. The step keeps
its state on the device (the token count too) and never waits for the host, so a CUDA graph can
capture it (cuda_graph=True) and torch.compile can fuse it (compile=True); the host looks at the
state every few steps (one small read), to stream the text, stop at end-of-text and slide the window.

The window: the token at index m is predicted from tokens s..m-1 at positions 0..m-1-s; s starts at
max(0, prompt_len - block_size) and jumps to m - block_size // 2 once m - s > block_size (the model's
own semantics for a cropped context, like nanoGPT's crop, but in jumps so the cache stays usable).
"""

import codecs
import functools
import os
import sys
import time

import torch

from model import CheckpointError, load_checkpoint


# -----------------------------------------------------------------------------
# turning logits into tokens

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
    """The distribution (..., vocab_size) fp32 a token is drawn from: the ids below vocab_size (GPT-2's
    50257 of the 50304-wide padded head), then temperature, top-k, top-p. Temperature 0 (greedy):
    the one-hot of the argmax."""
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
    residual = (p - q).clamp_min(0)
    # (all zero only where p == q up to rounding, and then the draft is almost surely accepted)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    return accepted, torch.where(accepted, draft, draw(residual, e))


def _check(temperature, top_k, top_p, max_new_tokens):
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None (off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {top_p!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


# -----------------------------------------------------------------------------
# the decoding step

def _step(model, cache, tok, st, cfg):
    """One step's model work and draws, on fixed shapes and without a host sync (compile=True
    compiles this). tok (B, T): the pending token at position n - 1 - s and, T = 2, the draft after
    it. Updates the state st in place; returns the tokens to write at n.. (B, T) and how many of them
    count (0-dim: 1, or 2 when every unfinished row kept its draft; 0 once every row has ended).

    The draft's slot holds the main model's bonus token. The MTP then runs the pairs (main hidden,
    next token) at the same two positions, next tokens = the new ones: right whatever is kept,
    since the first new token is the draft when the draft is kept. Its logits at the first position
    draft the token after a 1-token commit, at the second the token after a 2-token one. A rejected
    draft leaves junk in both caches at the second position, which the next step writes first.
    Batches run in lockstep (one position for all rows): a row's bonus token is dropped when
    another row rejects, which keeps the law exact, since that depends only on other rows' draws."""
    temperature, top_k, top_p, vocab_size, eot = cfg
    pos, fin, e = st["n"] - 1 - st["s"], st["fin"], st["e"]
    logits, h = model.forward_cached(tok, cache, pos)
    p = probs_of(logits, *cfg[:4])
    if tok.shape[1] == 1:
        new, both = draw(p, e[:, :1]), None
        keep = torch.ones((), dtype=torch.long, device=tok.device)
    else:
        accepted, first = speculative_accept(p[:, 0], st["q"], tok[:, 1], st["u"], e[:, 0])
        new = torch.stack([first, draw(p[:, 1], e[:, 1])], dim=1)
        both = (accepted | fin).all()
        q = probs_of(model.mtp_cached(h, new, cache, pos)[0], *cfg[:4])
        st["q"].copy_(torch.where(both, q[:, 1], q[:, 0]))
        st["draft"].copy_(draw(st["q"], e[:, 2]))
        st["accepted"].add_((accepted & ~fin).sum())
        st["drafted"].add_((~fin).sum())
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
    # one compiled function per process: dynamo keeps a graph per shape (batch, 1 or 2 tokens)
    return torch.compile(_step, dynamic=False)


def _graphed(run):
    """run (a step on static tensors), captured as a CUDA graph: one launch instead of hundreds (at
    these model sizes an eager step is bound by the CPU launching kernels). It runs twice first, on
    a side stream (compiling, allocating, lazy init); the caller sets the state for those runs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return g.replay


def _prefill(model, cache, out, st, s, n, cfg, speculative, noise):
    """(Re)build the caches for the window out[:, s:n], whose last token is pending: the main
    model's entries for s..n-2 and, speculative, the MTP's for the pairs (main hidden of token j,
    token j+1), whose last logits give the draft. -> whether the next step can be speculative."""
    if n - 1 - s == 0:
        return not speculative  # no pair yet to draft from
    h = model.forward_cached(out[:, s:n - 1], cache, 0)[1]
    if speculative:
        noise()
        st["q"].copy_(probs_of(model.mtp_cached(h, out[:, s + 1:n], cache, 0)[0][:, -1], *cfg[:4]))
        st["draft"].copy_(draw(st["q"], st["e"][:, 2]))
    return True


# -----------------------------------------------------------------------------
# generation

@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0, eot=None, generator=None, *,
             speculative=False, vocab_size=None, on_tokens=None, sync_every=16, cuda_graph=False, compile=False):
    """Continue every row of idx (B, T) by max_new_tokens tokens. Returns (tokens (B, T + n), stats
    {'accepted', 'drafted'}: the drafts the main model kept, and those it checked, per unfinished row);
    n <= max_new_tokens, fewer only when every row has ended.

    temperature 0 is greedy; top_k/top_p filter after the temperature (filter_logits). With eot set,
    a row that produced eot goes on producing eot only, and generation stops once every row has.
    vocab_size: only ids below it are drawn. generator: a torch.Generator on idx's device, for
    reproducible sampling. speculative: the MTP module drafts (the model needs mtp_depth >= 1); greedy
    then gives generate()'s plain tokens exactly in fp32 (in bf16 the 1- and 2-token steps round
    differently, so a near-tie can break the other way), and sampling the same distribution.
    The host reads the state every sync_every steps at most (one small read: the token count and
    the rows left), and calls on_tokens(new tokens (B, k)) with what came since, for streaming.
    cuda_graph (CUDA only): replay each step as a captured CUDA graph; compile: torch.compile it."""
    _check(temperature, top_k, top_p, max_new_tokens)
    if speculative and model.args.mtp_depth < 1:
        raise ValueError("speculative decoding needs an MTP module (this model has mtp_depth=0)")
    B, P = idx.shape
    if P == 0:
        raise ValueError("idx is empty: start from at least one token (e.g. the end-of-text token)")
    bs, dev, end = model.args.block_size, idx.device, P + max_new_tokens
    out = torch.empty(B, end + 2, dtype=torch.long, device=dev)  # (+2: a 2-token step at end - 1, warm-ups)
    out[:, :P] = idx
    V = min(vocab_size or model.args.vocab_size, model.args.vocab_size)
    cfg = (temperature, top_k, top_p, V, eot)
    z = functools.partial(torch.zeros, device=dev, dtype=torch.long)
    # the state: token count n, window start s, rows ended, draft and its q, noise (greedy: u = 0, e = 1)
    st = {"n": z(()), "s": z(()), "fin": z(B, dtype=torch.bool), "draft": z(B), "q": z(B, V, dtype=torch.float),
          "u": z(B, dtype=torch.float), "e": torch.ones(B, 3 if speculative else 1, V, device=dev),
          "accepted": z(()), "drafted": z(())}

    def noise():  # fresh draws for a sampling step, outside the step so that a graph replays it
        if temperature > 0:
            st["u"].uniform_(generator=generator)
            st["e"].exponential_(generator=generator).clamp_min_(1e-20)

    was_training = model.training
    model.eval()
    try:
        cache = model.make_cache(B, dtype=model.tok_emb.weight.dtype)
        core = _compiled_step() if compile else _step

        def step_of(T):  # the bookkeeping around _step: read the pending token, write the new ones
            def run():
                tok = out.gather(1, (st["n"] - 1).expand(B, 1))
                tok = torch.cat([tok, st["draft"][:, None]], dim=1) if T == 2 else tok
                new, keep = core(model, cache, tok, st, cfg)
                out.scatter_(1, st["n"] + torch.arange(T, device=dev).expand(B, T), new)
                st["n"].add_(keep)
            if not (cuda_graph and dev.type == "cuda"):
                return run
            st["n"].fill_(P)  # warm-ups in bounds: pending token P - 1 at position 0, writes at P, P + 1
            st["s"].fill_(P - 1)
            return _graphed(run)

        # before the prefill: warm-ups write junk into the first cache slots, rewritten before use
        steps = {T: step_of(T) for T in ((1, 2) if speculative and bs >= 2 else (1,))}
        for k in ("fin", "accepted", "drafted"):
            st[k].zero_()
        n, s, ready = P, max(0, P - bs), False
        while n < end:
            if n - s > bs:  # no room for the next token's context: slide the window
                s, ready = n - max(1, bs // 2), False
            if not ready:
                ready = _prefill(model, cache, out, st, s, n, cfg, speculative, noise)
            T = 2 if speculative and ready and n - s < bs else 1
            # as many steps as cannot pass the window or the end, even if each commits T tokens
            k = 1 if speculative and T == 1 else min(sync_every, (min(s + bs + 2 - T, end) - 1 - n) // T + 1)
            st["n"].fill_(n)
            st["s"].fill_(s)
            for _ in range(k):
                noise()
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


# -----------------------------------------------------------------------------
# the command line

class TextStream:
    """An on_tokens callback for batch 1 that writes the decoded text as tokens arrive, up to the
    end-of-text token eot. Decodes bytes incrementally, so a character split over two tokens is
    written once it is whole."""

    def __init__(self, enc, eot=None, file=None):
        self.enc, self.eot, self.file = enc, eot, file or sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.done = False

    def __call__(self, tokens):
        text = []
        for t in tokens[0].tolist():
            if self.done or t == self.eot:
                self.done = True
                break
            text.append(self.decoder.decode(self.enc.decode_single_token_bytes(t)))
        self.file.write("".join(text))
        self.file.flush()

    def close(self):
        self.file.write(self.decoder.decode(b"", final=True))


def fail(msg, code=1):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def gpt2_encoding():
    """tiktoken's GPT-2 encoding, or one line on stderr saying why it could not be loaded."""
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network on first use, a broken cache, no tiktoken
        fail(f"cannot load tiktoken's GPT-2 encoding ({type(e).__name__}); it is downloaded on first use "
             "(needs the network once), or point TIKTOKEN_CACHE_DIR at a cache that has it")


def pick_device(device, dtype):
    """('auto' or a device, 'auto' or a dtype name) -> (device, dtype name), or one error line."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        d = None
    if not (d is not None and (d.type == "cpu" or d.type == "mps" and torch.backends.mps.is_available() or (
            d.type == "cuda" and torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count()))):
        fail(f"device='{device}' is not available here (use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps')", 2)
    if dtype == "auto":
        dtype = "bfloat16" if d.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"dtype='{dtype}' must be 'auto', 'float32', 'bfloat16' or 'float16'", 2)
    return device, dtype


def load_model(path, device, dtype, speculative):
    try:
        model = load_checkpoint(path, map_location="cpu")[0]
    except CheckpointError as e:
        fail(str(e))
    if speculative and model.args.mtp_depth < 1:
        fail(f"{path} has no MTP module (mtp_depth=0): speculative decoding needs one", 2)
    # weights in the sampling dtype; the buffers (RoPE tables, the expert-selection bias) stay fp32,
    # as they were in training under autocast
    for p in model.parameters():
        p.data = p.data.to(getattr(torch, dtype))
    if torch.device(device).type == "mps" and model.args.moe_impl == "auto":
        model.args.moe_impl = "loop"  # torch._grouped_mm may have no MPS kernel
    return model.to(device).eval()


def main():
    """The command line, on the knobs below (module globals); stories go to stdout, notes to stderr."""
    try:
        _check(temperature, top_k, top_p, max_new_tokens)
    except ValueError as e:
        fail(e, 2)
    if num_samples < 1:
        fail(f"num_samples must be >= 1, got {num_samples}", 2)
    prompt = start
    if start.startswith("FILE:"):
        try:
            with open(start[len("FILE:"):], encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the prompt file '{start[5:]}': {getattr(e, 'strerror', None) or e}")
    dev, dt = pick_device(device, dtype)
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = load_model(os.path.join(out_dir, "ckpt.pt"), dev, dt, speculative)
    enc = gpt2_encoding()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})
    ids = [enc.eot_token] + ids if eot_prefix or not ids else ids
    V = model.args.vocab_size
    if max(ids) >= V:
        fail(f"the prompt has token {max(ids)} but the model's vocabulary has {V} (a GPT-2 model needs >= 50257)")
    eot = enc.eot_token if stop_at_eot else None
    x = torch.tensor(ids, device=dev)[None].repeat(num_samples, 1)
    stream = TextStream(enc, eot) if num_samples == 1 else None  # one story streams as it is written
    if stream is not None:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    t0 = time.perf_counter()
    y, st = generate(model, x, max_new_tokens, temperature, top_k, top_p, eot, torch.Generator(device=dev).manual_seed(seed),
                     speculative=speculative, vocab_size=min(V, enc.n_vocab), on_tokens=stream,
                     cuda_graph=cuda_graph, compile=compile)
    secs = time.perf_counter() - t0  # (generate's last read waited for the device)
    rows = y[:, len(ids):].tolist()
    for row in rows:
        text = stream or TextStream(enc, eot)
        if stream is None:
            sys.stdout.write(prompt)
            text(torch.tensor([row]))
        text.close()
        print("\n---------------", flush=True)
    if verbose:  # tokens written, up to and including each story's end-of-text
        made = sum(r.index(eot) + 1 if eot in r else len(r) for r in rows)
        msg = f"{made} tokens in {secs:.2f}s: {made / secs:.1f} tokens/s ({dev}, {dt})"
        if speculative:
            msg += f"; drafts accepted {st['accepted']}/{st['drafted']} = {st['accepted'] / max(st['drafted'], 1):.1%}"
        print(msg, file=sys.stderr)


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
    compile = False                 # torch.compile the decode step: about a minute of compiling first,
                                    # then faster steps; pays off for long or many generations
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
    except BrokenPipeError:  # the reader left (| head): no traceback, none from the flush at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
