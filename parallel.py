"""Expert parallelism (train.py's `ep`, under torchrun): DeepSeek's way to scale MoE. Each of ep ranks holds
n_routed_experts / ep of every MoE layer's routed experts; each token row travels to the rank holding its
expert and back (all_to_all); everything else stays whole on every rank, under DDP as usual. The ranks form
a (dp, ep) mesh: ep consecutive ranks hold one copy of the experts between them (one node's NVLink carries
the all-to-all), the dp copies of each share sit ep ranks apart. Also here, as EP's shards need them: the
one gradient norm all ranks clip by, and checkpoints as whole (unsharded) under FSDP and EP alike."""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.checkpoint.state_dict as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


def config_error(ddp, world_size, fsdp, ep, n_routed_experts, dtype):
    """-> the line saying why fsdp or ep cannot run as asked, or None (a dense model has no experts: ep=1)."""
    e = f"ep={ep}"
    for bad, why in [
            (fsdp and not ddp, "fsdp=True shards the model over processes: launch with torchrun "
                               "(e.g. --nproc_per_node=2)"),
            (fsdp and dtype == "float16", "fsdp=True with dtype='float16': its grad scaler would need the "
                                          "shards' overflows; use bfloat16"),
            (ep < 1 or (n_routed_experts or 1) % ep, f"{e} must divide n_routed_experts={n_routed_experts}"),
            (ep > 1 and fsdp, f"{e} with fsdp=True is not supported: shard the experts with one or the "
                              "other"),
            # the grad scaler unscales before the experts' grads are reduced: ranks may disagree on overflows
            (ep > 1 and dtype == "float16", f"{e} with dtype='float16' is not supported: use bfloat16"),
            (ep > 1 and world_size % ep, f"{e} must divide the number of torchrun processes ({world_size})")]:
        if bad:
            return why
    return None


def shard_experts(model, ep, device_type):
    """Slices every MoE layer's routed experts (the 3-D w1, w3, w2, on dim 0) to this rank's share and gives
    the layer its EP group. -> the (dp, ep) mesh that the functions below take; None (no EP) at ep=1."""
    if ep == 1:
        return None
    mesh = init_device_mesh(device_type, (dist.get_world_size() // ep, ep), mesh_dim_names=("dp", "ep"))
    for m in model.moe_layers():
        m.ep_group = mesh["ep"].get_group()
        shares = [w.detach().chunk(ep)[mesh["ep"].get_local_rank()].clone() for w in (m.w1, m.w3, m.w2)]
        m.w1, m.w3, m.w2 = map(torch.nn.Parameter, shares)
    return mesh


def experts_elsewhere(moe, xs, ws, counts, group):
    """MoE.run_experts' rows xs (gate weights ws), sorted by expert so by rank (counts: rows per expert), to
    the ranks of group holding their experts, through them, and back."""
    send = counts.long().view(group.size(), -1)  # rows for (each EP rank, each of its experts)
    recv = funcol.all_to_all_single(send, None, None, group)  # rows from each rank for each expert here
    rows_out, rows_in = send.sum(1).tolist(), recv.sum(1).tolist()  # (the host must know the sizes)
    xs, ws = (funcol.all_to_all_single_autograd(t, rows_in, rows_out, group) for t in (xs, ws))
    # they arrive by sending rank, then by expert: run_experts regroups them, as one-expert tokens
    mine = (torch.arange(recv.numel(), device=xs.device) % send.shape[1]).repeat_interleave(recv.view(-1))
    ys = moe.run_experts(xs, ws, mine[:, None], recv.sum(0))
    return funcol.all_to_all_single_autograd(ys, rows_out, rows_in, group)


def ddp_ignores(model, mesh):
    """The parameters DDP must leave alone: the experts' shares (the only 3-D ones); clip_grad_norm_ reduces
    their gradients."""
    return [n for n, p in model.named_parameters() if mesh is not None and p.dim() == 3]


def clip_grad_norm_(model, max_norm, mesh):
    """torch's clip_grad_norm_, by the same norm on every rank; -> the norm (FSDP's DTensor made whole).
    With EP, each expert's gradient is first summed over the dp ranks holding it and divided by the world
    size: its tokens came from every rank (all_to_all), so that is one process's gradient. The experts'
    part of the norm adds up every EP rank's share."""
    grads = [p.grad for p in model.parameters() if p.grad is not None and (mesh is None or p.dim() < 3)]
    if mesh is not None:
        experts = [p.grad for p in model.parameters() if p.grad is not None and p.dim() == 3]
        for g in experts:
            dist.all_reduce(g.div_(mesh.size()), group=mesh["dp"].get_group())
        shares = [DTensor.from_local(g, mesh["ep"], [Shard(0)]) for g in experts]
        grads.append(get_total_norm(shares).full_tensor())
    norm = get_total_norm(grads)
    clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def load_optimizer_state(model, optimizer, state, mesh):
    """A checkpoint's optimizer state (whole, keyed by parameter name) into a sharded or unsharded optimizer:
    FSDP takes its shards itself; with EP this rank keeps its share of the experts' moments."""
    if mesh is not None:
        ep, i = mesh["ep"].size(), mesh["ep"].get_local_rank()
        for s in state["state"].values():
            s.update({k: v.chunk(ep)[i] for k, v in s.items() if v.dim() == 3})
    dcp.set_optimizer_state_dict(model, optimizer, state, options=dcp.StateDictOptions(full_state_dict=True))
    for group in optimizer.param_groups:  # an older checkpoint's unfused AdamW loses: the step needs fused
        group["fused"], group["foreach"] = True, None  # AdamW's found_inf to skip a non-finite step


def full_state_dicts(model, optimizer, mesh):
    """-> {"model": ..., "optimizer": ...}: their state dicts, whole, on the CPU (every rank calls it: FSDP
    and EP gather their shards): the same checkpoint at any world size, fsdp or ep; any of them resumes it."""
    opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=mesh is None)  # (EP: on every rank)
    model_sd = dcp.get_model_state_dict(model, options=opts)
    optim_sd = dcp.get_optimizer_state_dict(model, optimizer, options=opts)
    if mesh is not None:  # every EP rank's experts
        for sd in (model_sd, *optim_sd["state"].values()):
            sd.update({k: (DTensor.from_local(v, mesh["ep"], [Shard(0)]).full_tensor() if v.dim() == 3 else v)
                       .to("cpu", copy=True) for k, v in sd.items()})
    return {"model": model_sd, "optimizer": optim_sd}
