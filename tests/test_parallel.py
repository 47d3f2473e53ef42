"""parallel.py on the CPU: a MoE layer under expert parallelism (2 gloo processes, ep=2, each with half the
tokens) gives one process's outputs, expert gradients and clip norm. (train.py's whole EP runs, their
checkpoints and their bad inputs: tests/test_train.py.)"""
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.utils import get_total_norm

import parallel
from model import ModelArgs, MoE


def ep_rank(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same layer and tokens on both ranks
    a = ModelArgs(n_embd=16, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=8, n_shared_experts=0,
                  moe_impl="padded")
    moe = MoE(a)
    with torch.no_grad():  # weights that make gradients far above assert_close's absolute tolerance
        for p in moe.parameters():
            p.normal_(0, 0.5)
    moe.gate.weight.requires_grad_(False)  # (only the experts' gradients: the rest would be DDP's)
    x = torch.randn(2, 24, a.n_embd)
    want = moe(x)[0]  # one process, all the tokens
    want.pow(2).mean().backward()
    grads = [p.grad.chunk(2)[rank] for p in (moe.w1, moe.w3, moe.w2)]  # (this rank's share)
    norm = get_total_norm([moe.w1.grad, moe.w3.grad, moe.w2.grad])
    moe.zero_grad(set_to_none=True)
    holder = torch.nn.Module()
    holder.moe_layers = lambda: [moe]
    mesh = parallel.shard_experts(holder, 2, "cpu")
    y = moe(x[rank:rank + 1])[0]  # this rank's tokens, through both ranks' experts
    y.pow(2).mean().backward()
    got = parallel.clip_grad_norm_(moe, math.inf, mesh)
    torch.testing.assert_close(y, want[rank:rank + 1])
    torch.testing.assert_close(got, norm)
    for p, g in zip((moe.w1, moe.w3, moe.w2), grads):
        torch.testing.assert_close(p.grad, g)
    dist.destroy_process_group()


def test_experts_on_two_ranks_match_one_process():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ep_rank, args=(port,), nprocs=2)
