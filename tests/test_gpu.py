"""What only a CUDA GPU can check (skipped without one; `python -m pytest tests/` on a GPU machine runs it):
the grouped-GEMM experts against the padded ones under bf16 autocast, and train.py's step compiled as
one graph (fullgraph) that never makes the host wait (no sync in forward, backward, clipping, optimizer), on
each expert path and in fp16 with the grad scaler too; Liger's fused cross-entropy against plain (compiled,
in fp16); train.py compiled with gradient accumulation; speculative greedy = plain greedy in fp32."""
from dataclasses import replace

import pytest
import torch
from conftest import rel

from model import DeepSeekV3, ModelArgs, MoE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ARGS = replace(ModelArgs(), n_layer=2, mtp_depth=1)  # two of the 16x4 flagship's layers (one dense, one MoE)


def test_grouped_experts_match_the_padded_ones_in_bf16():
    torch.manual_seed(0)
    moe = MoE(replace(ARGS, moe_impl="grouped")).cuda()
    ref = MoE(replace(ARGS, moe_impl="padded")).cuda()
    ref.load_state_dict(moe.state_dict())
    x = torch.randn(8, 256, ARGS.n_embd, device="cuda")
    got = []
    for m in (moe, ref):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(xx)[0]
        y.float().square().mean().backward()
        got.append({"y": y.float(), "dx": xx.grad, **{n: p.grad for n, p in m.named_parameters()}})
    errors = {k: rel(got[0][k], got[1][k]) for k in got[1] if got[1][k] is not None}
    assert errors.keys() >= {"y", "dx", "w1"} and max(errors.values()) < 2e-2, errors  # bf16's rounding


@pytest.mark.parametrize("impl,dtype", [("grouped", torch.bfloat16), ("padded", torch.bfloat16),
                                        ("padded", torch.float16)])
def test_the_compiled_step_is_one_graph_and_never_syncs(impl, dtype):
    """train.py's step on each expert path (fp16: with its grad scaler)."""
    torch.manual_seed(0)
    model = DeepSeekV3(replace(ARGS, moe_impl=impl)).cuda()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # a graph break is an error
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    idx = torch.randint(0, ARGS.vocab_size, (4, 128), device="cuda")
    for i in range(3):  # the third step, compiled and warm, with every host sync an error
        torch.cuda.set_sync_debug_mode("error" if i == 2 else 0)
        try:
            with torch.autocast("cuda", dtype=dtype):
                loss = compiled(idx, idx)[1]
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            model.optimizer_step(opt, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            scaler.update()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


def liger_pair():
    """-> (a 2-layer model, its copy with Liger's cross-entropy)."""
    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    ref, lig = DeepSeekV3(ARGS).cuda(), DeepSeekV3(ARGS).cuda()
    lig.load_state_dict(ref.state_dict())
    lig.use_liger()
    return ref, lig


def test_liger_matches_plain_cross_entropy_with_ignored_targets_under_compile():
    """liger-kernel's fused linear cross-entropy once returned a wrong loss under torch.compile when some
    targets are ignored (its PR #1338): the compiled model with half its targets -1 (SFT's prompt tokens),
    Liger against plain cross-entropy, loss and every gradient."""
    ref, lig = liger_pair()
    idx = torch.randint(0, ARGS.vocab_size, (4, 128), device="cuda")
    tgt = idx.roll(-1, 1).masked_fill(torch.rand(4, 128, device="cuda") < 0.5, -1)
    got = []
    for m in (ref, lig):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.compile(m, dynamic=False)(idx, tgt)[1]
        loss.backward()
        got.append((loss.detach().float(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    assert rel(got[1][0], got[0][0]) < 1e-2, (got[1][0], got[0][0])
    errors = {n: rel(g, got[0][1][n]) for n, g in got[1][1].items()}
    assert errors.keys() == got[0][1].keys() and max(errors.values()) < 5e-2, errors


def test_liger_keeps_the_fp16_gradient_under_the_grad_scaler():
    """Liger makes the gradient in its forward, in fp16 under fp16 autocast, before the scaler's scale: as
    a mean (x 1/tokens) most of it flushed to zero. Hidden states sharing a direction, as a trained model's
    do, put ~30% of the head's gradient there; 8,192 tokens (seed A's step: 16,384)."""
    ref, lig = liger_pair()
    h0 = torch.randn(16, 512, ARGS.n_embd, device="cuda") + torch.randn(ARGS.n_embd, device="cuda")
    tgt = torch.randint(0, ARGS.vocab_size, (16, 512), device="cuda")
    got = []
    for m in (ref, lig):
        h = h0.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = m.lm_loss(h, tgt)[1]
        (loss * 2.0**16).backward()  # the scaler's first scale
        got.append((loss.detach().float(), h.grad, m.head.weight.grad))
    errors = [rel(a, b) for a, b in zip(got[1], got[0])]
    assert max(errors) < 1e-2, errors  # (loss, hidden states' gradient, head's gradient)


def test_train_py_accumulates_gradients_when_compiled(tmp_path):
    """train.py on CUDA, compiled, with 2 micro-steps per step: the eager run's losses. Replayed as CUDA
    graphs, a micro-step's backward overwrote the .grad the one before left (train.py stopped, an error)."""
    from test_train import make_data, run_train, step_losses
    make_data(tmp_path / "data")
    common = ["--device=cuda", "--max_iters=4", "--eval_interval=1000", "--gradient_accumulation_steps=2"]
    for mode in ("True", "False"):
        run_train(tmp_path, *common, f"--compile={mode}", f"--out_dir={tmp_path / mode}", timeout=300)
    compiled, eager = step_losses(tmp_path / "True"), step_losses(tmp_path / "False")
    assert sorted(compiled) == sorted(eager) == [0, 1, 2, 3]
    assert all(abs(compiled[i] - eager[i]) < 0.02 * eager[i] for i in eager), (compiled, eager)


def test_speculative_greedy_is_plain_greedy_in_fp32_with_cuda_graphs(monkeypatch):
    """sample.py's decoder on CUDA (graph-replayed steps, no TF32): speculative greedy writes plain greedy's
    tokens exactly, across a window slide (bench.py reports how many agree in bf16)."""
    from sample import generate
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = DeepSeekV3(replace(ARGS, block_size=64)).cuda().eval()
    x = torch.randint(0, 50257, (1, 16), device="cuda")
    plain = generate(model, x, 80, temperature=0, cuda_graph=True)[0]
    spec, st = generate(model, x, 80, temperature=0, speculative=True, cuda_graph=True)
    assert st["drafted"] > 0 and torch.equal(spec, plain)
