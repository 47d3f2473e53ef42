"""
Benchmark train.py's training step on synthetic tokens, nanoGPT-bench style (a train.py config file gives
the model and batch_size). Prints ms/step, tokens/s, MFU (against the H100's 989 TFLOP/s bf16 peak and a
matmul peak measured here), peak memory, and on CUDA the step's GPU time by part. With sample=True it
measures generation too. The GPU's correctness checks are tests/test_gpu.py.
    python bench.py                                   # the 16x4 flagship and its dense twin
    python bench.py config/tinystories_debug.py --device=cpu --steps=3   # CPU smoke test
"""

import json
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import fields, replace

import torch

from model import DeepSeekV3, ModelArgs, pick_device
from parallel import clip_grad_norm_

# -----------------------------------------------------------------------------
batch_size = 64
seed = 1337
device = "auto"
dtype = "auto"             # as train.py: by the GPU (model.pick_device)
compile = None             # as train.py: None = on CUDA GPUs that Triton runs on
steps = 30                 # timed steps (after warmup)
warmup = 8
twin = True                # also bench the dense twin (same active FFN width, no routing)
breakdown = True           # CUDA: the step's GPU time by part, from a profile of 3 steps
use_liger = False          # also bench with Liger's fused linear cross-entropy, if installed
out_json = ""              # write all numbers here too
profile_file = ""          # CUDA: write the profile's table of the 16x4 step's kernels here
train = True               # benchmark the training step
sample = False             # benchmark generation (prefill, cached decode, speculative decoding)
ckpt = ""                  # sample: a trained checkpoint (acceptance rates need one); else random weights
data_dir = ""              # sample: the prompt is the first 16 tokens of data_dir/val.bin (else random)
gen_tokens = 256           # sample: new tokens per generation
decode_modes = "eager,graph,compiled_graph"  # sample: the ways to run a decode step (graphs: CUDA only)
peak_flops = 989e12        # H100 SXM bf16 dense
globals().update({f.name: f.default for f in fields(ModelArgs)})
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402

configure(globals(), only_known=True)  # (a train.py config's other knobs are train.py's)
for path in filter(None, (out_json, profile_file)):  # checked before the benchmark runs, not after it
    try:
        existed = os.path.exists(path)
        open(path, "a").close()  # changes nothing in a file that is there
        if not existed:
            os.remove(path)
    except OSError as e:
        raise SystemExit(f"error: cannot write {path} ({e.strerror})")
try:
    device, dtype, compile, moe_impl, device_line = pick_device(device, dtype, compile, moe_impl)
    base = ModelArgs(**{f.name: globals()[f.name] for f in fields(ModelArgs)})
except ValueError as e:
    raise SystemExit(f"error: {e}")
device_type = device.split(":")[0]
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()
B, T = batch_size, base.block_size
results = {"device": device_line, "torch": torch.__version__, "batch_size": B, "block_size": T}


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, n=steps, w=warmup):
    """Median ms of fn() over n runs after w warm-ups, each timed from an idle device to an idle device."""
    for _ in range(w):
        fn()
    ts = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ts)


def make_step(args, liger=False):
    """train.py's step (tests/test_bench.py checks it): autocast forward and (fp16: scaled) backward through
    the compiled model, clipping, model.optimizer_step (AdamW and the bias update, skipped if not finite)."""
    torch.manual_seed(seed)
    model = DeepSeekV3(args).to(device)
    if liger:
        model.use_liger()
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95))
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    fwd = torch.compile(model, dynamic=False, mode="reduce-overhead" if device_type == "cuda" else None) \
        if compile else model
    g = torch.Generator(device="cpu").manual_seed(seed)
    x, y = (torch.randint(0, args.vocab_size, (B, T), generator=g).to(device) for _ in range(2))

    def step():
        with ctx:
            _, loss = fwd(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        model.optimizer_step(opt, clip_grad_norm_(model, 1.0, None))  # (train.py's clip, one process)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return model, step, x, y


def bench_step(name, args, liger=False):
    model, step = make_step(args, liger)[:2]
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = timeit(step)
    tok_s, fpt = B * T / (ms / 1000), model.estimate_flops_per_token(T)
    r = {"ms": ms, "tok_s": tok_s, "flops_per_token": fpt, "mfu": model.estimate_mfu(tok_s, peak_flops, T),
         "params": model.get_num_params(),
         "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device_type == "cuda" else None}
    if results.get("matmul_peak"):
        r["mfu_vs_matmul"] = model.estimate_mfu(tok_s, results["matmul_peak"], T)
    results[name] = r
    print(f"{name}: {ms:.1f} ms/step, {tok_s:,.0f} tok/s, MFU {r['mfu'] * 100:.1f}%"
          + (f", peak mem {r['peak_mem_gb']:.1f} GB" if r["peak_mem_gb"] else ""), flush=True)
    if device_type != "cuda" or liger or not (breakdown or profile_file and name == "moe"):
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(3):
            step()
        sync()
    if profile_file and name == "moe":
        with open(profile_file, "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=60,
                                              max_name_column_width=90))
    if breakdown:
        parts = results[f"{name}_breakdown"] = part_timings(prof)
        parts["GPU idle (between kernels)"] = max(0.0, ms - sum(parts.values()))
        print(f"  the {ms:.1f} ms step by part (kernel times from a profile):")
        for k, v in parts.items():
            print(f"    {k:<66s} {v:7.2f} ms  {100 * v / ms:5.1f}%")


def matmul_peak(n=8192):
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / (timeit(lambda: a @ b, n=20, w=5) / 1000)


# the parts of a step, by what their kernels' names contain (lower case): the first part that matches wins
PARTS = [("attention core (SDPA: cuDNN, flash)", ("sdpa", "flash", "fmha", "cudnn")),
         ("routed experts (grouped_mm: CUTLASS)", ("enable_3x_kernel_for_sm9x", "groupproblemshape")),
         ("cross-entropy (fused Triton)", ("log_softmax",)),
         ("elementwise: norms, RoPE, SiLU, dispatch/combine, casts (Triton)", ("triton",)),
         ("GEMMs: head, projections, dense and shared MLPs (cuBLAS)", ("nvjet", "gemm", "cutlass", "xmma")),
         ("router: top-k and sort", ("topk", "sort")),
         ("optimizer and clipping (multi-tensor)", ("adam", "multi_tensor")),
         ("copies and fills", ("memcpy", "memset", "fill", "copy"))]


def part_timings(prof):
    """Where the GPU time of 3 profiled steps goes, per step, by kernel name: kernels replayed from a CUDA
    graph have no launching op to attribute them by. -> {part: ms}, largest first."""
    parts = {}
    for e in prof.events():
        annotation = getattr(e, "is_user_annotation", False) or e.name.startswith("## ")  # spans kernels
        if e.device_type.name != "CUDA" or annotation:  # (e.g. '## Call CompiledFxGraph ... ##')
            continue
        name = e.name.lower()
        k = next((part for part, keys in PARTS if any(key in name for key in keys)), "other kernels")
        parts[k] = parts.get(k, 0.0) + e.time_range.elapsed_us() / 3000.0  # us over 3 steps -> ms per step
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def sample_setup():
    """The generation bench's decode modes, model (in dtype, eval) and prompt (1, 16)."""
    import numpy as np
    from model import load_checkpoint
    if gen_tokens < 8:
        raise SystemExit(f"error: gen_tokens={gen_tokens}: steady decode speed needs at least 8 new tokens")
    every = {"eager": dict(cuda_graph=False), "graph": dict(cuda_graph=True),
             "compiled_graph": dict(cuda_graph=True, compile=True)}
    if set(decode_modes.split(",")) - set(every):
        raise SystemExit(f"error: decode_modes={decode_modes!r}: pick from {', '.join(every)}")
    modes = {k: every[k] for k in decode_modes.split(",") if k == "eager" or device_type == "cuda"}
    if not modes:
        raise SystemExit(f"error: decode_modes={decode_modes!r}: the graph modes need CUDA; add eager")
    model = load_checkpoint(ckpt, moe_impl=moe_impl)[0] if ckpt else DeepSeekV3(base)
    wdt = getattr(torch, dtype)
    for p in model.parameters():  # as sample.py does: the buffers (RoPE tables, expert biases) stay fp32
        p.data = p.data.to(wdt)
    model.to(device).eval()
    try:  # a real prompt: the first 16 tokens of the validation text
        prompt = torch.from_numpy(np.fromfile(f"{data_dir}/val.bin", dtype=np.uint16)[:16].astype(np.int64))
    except OSError:
        prompt = torch.randint(0, 50257, (16,))
    return modes, model, wdt, prompt[None].to(device)


def bench_sample():
    """Greedy generation per decode mode: prefill tokens/s, steady decode tokens/s at batch 1 and 16, and
    speculative decoding's speed-up, acceptance and tokens shared with plain (fp32: tests/test_gpu.py).
    Steady: a gen_tokens run less an n0-token one, so set-up, prefill and capture cancel."""
    from sample import generate
    modes, model, wdt, prompt = sample_setup()
    P = prompt.shape[1]
    r = {"ckpt": ckpt or "random weights", "gen_tokens": gen_tokens, "dtype": str(wdt)}
    r["cache_bytes_per_token"], r["per_head_cache_bytes_per_token"] = model.cache_bytes_per_token()

    def wall(B, n, **kw):
        sync()
        t0 = time.perf_counter()
        y, st = generate(model, prompt.repeat(B, 1), n, temperature=0, **kw)
        sync()
        return time.perf_counter() - t0, y, st

    a, n0 = model.args, gen_tokens // 8
    with torch.no_grad():  # prefill: half a block, once warm
        x = torch.randint(0, 50257, (1, a.block_size // 2), device=device)
        ms = timeit(lambda: model.forward_cached(x, model.make_cache(1, dtype=wdt), 0), n=1, w=1)
    r["prefill_tok_s"] = x.shape[1] / (ms / 1000)
    for name, kw in modes.items():
        for B, spec in [(1, False), (16, False)] + [(1, True)] * (a.mtp_depth > 0):
            k = f"{'spec' if spec else 'decode'}_b{B}_{name}"
            r[f"{k}_first_call_s"] = wall(B, n0, speculative=spec, **kw)[0]  # compiles, where it does
            t0 = wall(B, n0, speculative=spec, **kw)[0]
            t1, y, st = wall(B, gen_tokens, speculative=spec, **kw)
            r[f"{k}_tok_s"] = B * (gen_tokens - n0) / (t1 - t0)
            print(f"  {k}: {r[k + '_tok_s']:,.0f} tok/s (first call {r[k + '_first_call_s']:.1f} s)",
                  flush=True)
            if spec:
                r[f"{k}_speedup"] = r[f"{k}_tok_s"] / r[f"decode_b1_{name}_tok_s"]
                r[f"{k}_acceptance"] = st["accepted"] / max(1, st["drafted"])
                same = (y[0, P:] != plain[0, P:]).long().cumsum(0) == 0
                r[f"{k}_tokens_same_as_plain"] = int(same.sum())
            elif B == 1:
                plain = y
    results["sample"] = r
    print("\n| generation (" + r["ckpt"] + f", {gen_tokens} new tokens, greedy) | value |\n|---|---|")
    for k, v in r.items():
        print(f"| {k} | {v:,.2f} |" if isinstance(v, float) else f"| {k} | {v} |")


if __name__ == "__main__":
    print(device_line)
    if device_type == "cuda":
        results["matmul_peak"] = matmul_peak()
        print(f"torch {torch.__version__}, bf16 matmul peak {results['matmul_peak'] / 1e12:.0f} TFLOP/s",
              flush=True)
    if sample:
        bench_sample()
    if train:
        bench_step("moe", base)
        if use_liger:
            try:
                bench_step("moe_liger", base, liger=True)
            except Exception as e:  # (not installed, or its kernels fail here): report, and go on
                print(f"liger: FAILED {type(e).__name__}: {str(e).strip()[:300]}")
        if twin and base.n_routed_experts > 0:
            width = (base.n_shared_experts + base.n_activated_experts) * base.moe_inter_dim
            bench_step("dense_twin", replace(base, n_routed_experts=0, n_shared_experts=0, inter_dim=width,
                                             n_dense_layers=base.n_layer))
            ratio = results["moe"]["tok_s"] / results["dense_twin"]["tok_s"]
            print(f"moe / dense twin throughput: {ratio:.3f}")
        print("\n| model | ms/step | tokens/s | MFU (989T) | MFU (measured matmul peak) | peak mem |")
        print("|---|---|---|---|---|---|")
        for k in filter(results.__contains__, ("moe", "moe_liger", "dense_twin")):
            r = results[k]
            mm = f"{r['mfu_vs_matmul'] * 100:.1f}%" if r.get("mfu_vs_matmul") else "n/a"
            mem = f"{r['peak_mem_gb']:.1f} GB" if r["peak_mem_gb"] else "n/a"
            print(f"| {k} | {r['ms']:.1f} | {r['tok_s']:,.0f} | {r['mfu'] * 100:.1f}% | {mm} | {mem} |")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1)
