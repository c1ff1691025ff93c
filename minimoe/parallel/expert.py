"""Expert parallelism: the routed experts are split across ranks, and the tokens travel to their experts.

A Mixture-of-Experts layer has many experts but each token uses only k of them. Replicating every expert on
every GPU wastes memory on weights that a GPU's tokens mostly do not use, so GShard (Lepikhin et al., 2020)
gives each of `ep` ranks E / ep of the experts and moves the *activations* instead: after routing, each rank
sends every token row to the rank that owns the chosen expert, the experts run on what arrived, and the
results go back the same way. Both exchanges are one `all_to_all` each: rank r sends a (different-sized)
chunk to every rank s and receives one from each. Switch Transformer (Fedus et al., 2021) and DeepSpeed-MoE
(Rajbhandari et al., 2022) use the same pattern. The chunks are uneven (routing decides their sizes), so each
layer first exchanges its per-expert counts (a tiny all_to_all of E integers), then the rows:

    route locally -> sort assignments by expert (= by owning rank, experts are contiguous blocks)
    all_to_all counts  -> every rank learns how many rows it will receive for each of its experts
    all_to_all rows    -> [rows from rank 0 | rows from rank 1 | ...], each block sorted by local expert
    regroup by local expert, run the grouped experts, undo the regrouping
    all_to_all rows back (the same splits, swapped) -> multiply by the combine weights, add to y

The backward of an all_to_all is the all_to_all with the splits swapped (`AllToAll`): the gradient of a row
goes back to the rank the row came from. So each assignment whose expert lives on another rank moves one
d_model row forward and one back in the forward pass, and the same two rows of gradient in the backward.

Everything that is not a routed expert (attention, embeddings, the router, the shared experts) stays
replicated: the ep ranks are data-parallel for those weights, each with its own tokens.

The process groups come from the plan's device mesh (`ParallelPlan.mesh`; plan.py says how ep composes with
dp): mesh["ep"] carries the all_to_all; mesh["dp"] (the ranks that hold the same experts) and dp x ep
flattened (`plan.dp_ep_mesh`, every replica of the other weights) carry the gradient all-reduces. A dp 2 x ep 2
plan on ranks 0..3:

    ep groups {0, 1}, {2, 3}: tokens travel inside a row    dp groups {0, 2}, {1, 3}: same experts
    dp_ep group {0, 1, 2, 3}: the router, attention, embeddings and shared experts

Gradients and the 1/W scaling. With W = dp * ep ranks each holding 1/W of the global batch (equal token
counts), the global mean loss is L = (1/W) sum_r loss_r. Each rank backpropagates loss_r / W; then
* a replicated weight's gradient is summed over all W ranks (dp_ep): sum_r (1/W) d loss_r = dL;
* an expert's gradient already sums, through the reverse all_to_all, the (1/W)-scaled contributions of every
  token of its ep group; summing it over the dp group (the ranks owning the same experts in the other ep
  groups) adds the remaining tokens: again dL. `sync_gradients` does both.

This file composes ep with dp only (tensor and pipeline parallelism have their own files); a mesh with tp or
pp > 1 is refused, as MoE.finish_step sums the load over the default group, i.e. every rank.

Balancing and statistics. `ExpertParallelMoE` is an `MoE` (it keeps MoE's bookkeeping and is found by
`MiniLM.moe_modules()`): last_router_output, last_dispatch, last_tokens_per_expert and stats() describe the
rank's own tokens (counts over all E experts); `balance_loss` computes on the rank's tokens. The router z-loss
and DeepSeek-V3's sequence-wise loss are means over tokens / sequences, so their rank average equals the
global value; the Switch loss E * sum_i f_i P_i is a product of batch means and is not: under EP it is the
per-rank (micro-batch) Switch loss, as in most implementations. `pending_load` adds up the rank's loads and
`MoE.finish_step` all-reduces it over the default group before moving DeepSeek's bias, so every rank applies
the same bias update computed from the global load. A capacity_factor applies per rank (GShard's "group"):
each rank drops, before sending, what exceeds the capacity of its own N * k assignments, which is what MoE
does on that rank's tokens, not what it does on the global batch. The combine weights are applied on the
token's own rank after the results return (MoE scales the hidden activations of narrow experts instead:
equal up to rounding).
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn

from ..moe import DeepSeekRouter, GroupedExperts, MoE, max_violation
from .plan import DIMS, ParallelPlan, dp_ep_mesh


def _is_mesh(x) -> bool:
    from torch.distributed.device_mesh import DeviceMesh
    return isinstance(x, DeviceMesh)


def _check_mesh(mesh) -> None:
    """ValueError unless `mesh` is a plan's mesh (ParallelPlan.mesh) with tp = pp = 1."""
    names = mesh.mesh_dim_names or ()
    if not set(DIMS) <= set(names):
        raise ValueError(f"expected the mesh of a ParallelPlan (dimensions {DIMS}), got dimensions {names}")
    extra = {d: mesh[d].size() for d in ("tp", "pp") if mesh[d].size() > 1}
    if extra:
        raise ValueError("expert parallelism here composes with data parallelism only; the mesh has "
                         + ", ".join(f"{d}={n}" for d, n in extra.items()))


def ep_group(mesh=None):
    """The process group that exchanges tokens: mesh["ep"]'s for a plan's mesh, a given group as it is, or None
    (the default group: every rank is an expert-parallel rank)."""
    if mesh is None or not _is_mesh(mesh):
        return mesh
    _check_mesh(mesh)
    return mesh["ep"].get_group()


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits, differentiable: the backward sends each gradient row home.

    x [sum(input_splits), ...]: the first input_splits[0] rows go to rank 0 of `group`, the next to rank 1, ...
    Returns [sum(output_splits), ...]: output_splits[s] rows received from rank s, in rank order.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None):
        ctx.splits, ctx.group = (list(output_splits), list(input_splits)), group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), list(output_splits), list(input_splits), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_splits, input_splits = ctx.splits
        dx = grad.new_empty((sum(input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(dx, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return dx, None, None, None


class ExpertParallelMoE(MoE):
    """An MoE whose routed experts are sharded over the ranks of `group` (see the module docstring): a plan's
    mesh (its "ep" dimension), a process group, or None (every rank).

    Holds the replicated router and shared experts and only its own contiguous block of experts
    [first_expert, first_expert + n_local) as a GroupedExperts; computes what MoE computes on the same input.
    """

    def __init__(self, router: nn.Module, experts: GroupedExperts, shared: nn.Module | None, n_experts: int,
                 capacity_factor: float | None, group=None):
        # not MoE.__init__: that would allocate all E experts, the memory expert parallelism exists to save
        nn.Module.__init__(self)
        self.group = group = ep_group(group)
        self.ep, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        if n_experts % self.ep:
            raise ValueError(f"n_experts={n_experts} is not divisible by the expert-parallel size ep={self.ep}")
        self.n_experts, self.capacity_factor = n_experts, capacity_factor
        self.n_local = n_experts // self.ep
        self.first_expert = self.ep_rank * self.n_local
        if experts.n_experts != self.n_local:
            raise ValueError(f"this rank should hold {self.n_local} experts, got {experts.n_experts}")
        self.router, self.experts, self.shared = router, experts, shared
        self.last_tokens_per_expert = self.last_router_output = self.last_dispatch = None
        self.last_shape = self.pending_load = None

    @classmethod
    def from_moe(cls, moe: MoE, group=None) -> "ExpertParallelMoE":
        """This rank's share of `moe`: copies of its router and shared experts, and its block of experts."""
        group = ep_group(group)
        ep = dist.get_world_size(group)
        if moe.n_experts % ep:
            raise ValueError(f"n_experts={moe.n_experts} is not divisible by the expert-parallel size ep={ep}")
        n_local = moe.n_experts // ep
        lo = dist.get_rank(group) * n_local
        full = moe.experts
        experts = GroupedExperts(n_local, full.d_model, full.d_ff).to(full.w_gate_up.device, full.w_gate_up.dtype)
        with torch.no_grad():
            experts.w_gate_up.copy_(full.w_gate_up[lo:lo + n_local])
            experts.w_down.copy_(full.w_down[lo:lo + n_local])
        out = cls(copy.deepcopy(moe.router), experts, copy.deepcopy(moe.shared), moe.n_experts,
                  moe.capacity_factor, group)
        out.capacity_n_experts = moe.capacity_n_experts  # an extracted task model keeps its parent's capacity
        return out.train(moe.training)

    def forward(self, x, token_ids=None, task_ids=None) -> torch.Tensor:
        """x: [batch, seq, d_model] (this rank's tokens) -> y like x. Every rank of the group must call it."""
        B, T, d = x.shape
        # sorted by global expert id = grouped by owning rank, since rank s owns a contiguous block of experts
        flat, r, plan, token, weights, xs = self.route(x, token_ids, task_ids)

        # 1. counts: send_counts[e] rows go to expert e; recv[s, j] rows will come from rank s for local expert j
        send_counts = plan.kept_counts.contiguous()
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts, group=self.group)
        recv = recv.view(self.ep, self.n_local)
        input_splits = send_counts.view(self.ep, self.n_local).sum(1).tolist()
        output_splits = recv.sum(1).tolist()

        # 2. rows out; they arrive grouped by source rank, each block sorted by local expert
        received = AllToAll.apply(xs, output_splits, input_splits, self.group)
        local_expert = torch.arange(self.n_local, device=recv.device).repeat(self.ep).repeat_interleave(recv.flatten())
        by_expert = torch.argsort(local_expert, stable=True)      # regroup: all of expert 0's rows, then 1, ...
        out = self.experts(received.index_select(0, by_expert), recv.sum(0))
        back_order = torch.empty_like(by_expert)
        back_order[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)
        out = out.index_select(0, back_order)                       # back to [from rank 0 | from rank 1 | ...]

        # 3. results home (splits swapped), aligned with xs; weight and add up as MoE does
        out = AllToAll.apply(out, input_splits, output_splits, self.group)
        out = out * weights[:, None].to(out.dtype)
        return self.combine(flat, token, out, r, plan, (B, T))


def parallelize_moe(model: nn.Module, mesh=None) -> nn.Module:
    """Replace every MoE module of `model` (e.g. a MiniLM) by its expert-parallel version over mesh["ep"]
    (`mesh`: a ParallelPlan's mesh; a process group or None, every rank, also work)."""
    group = ep_group(mesh)
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE)]
    for parent, name, child in targets:
        setattr(parent, name, ExpertParallelMoE.from_moe(child, group))
    return model


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the sharded (routed expert) parameters of an expert-parallel model."""
    return {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in m.experts.parameters()}


def sync_gradients(model: nn.Module, mesh=None) -> None:
    """After every rank backpropagated loss_r / W (W = dp * ep): sum replicated gradients over dp x ep
    (dp_ep_mesh) and expert gradients over mesh["dp"], the ranks that own the same experts. mesh=None: every
    rank is an expert-parallel rank (dp = 1), so replicated gradients are summed over all ranks, experts not at
    all."""
    replica_group, dp_group = None, None
    if mesh is not None:
        _check_mesh(mesh)
        replica_group = dp_ep_mesh(mesh).get_group()
        dp_group = mesh["dp"].get_group() if mesh["dp"].size() > 1 else None
    sharded = expert_parameters(model)
    for p in model.parameters():
        if p.grad is None:
            continue
        if id(p) not in sharded:
            dist.all_reduce(p.grad, group=replica_group)
        elif dp_group is not None:
            dist.all_reduce(p.grad, group=dp_group)


def plan_for(config_dict: dict, dp: int = 1, ep: int = 2) -> ParallelPlan:
    """The dp x ep plan for a model config, validated (ValueError naming n_experts if ep does not divide it).
    Needs no process group: call it before launching."""
    from ..config import ModelConfig
    cfg = ModelConfig.from_dict(dict(config_dict))
    return ParallelPlan(dp=dp, ep=ep).validate(dp * ep, n_experts=cfg.n_experts)


def verify(config_dict: dict, seed: int = 0, steps: int = 1) -> dict:
    """Run inside each rank (launch.run): expert parallelism over the whole world (ep = world size) against
    the single-process model on the full global batch. See `_verify` for what is compared."""
    return _verify(config_dict, seed, dp=1, steps=steps)


def verify_2d(config_dict: dict, seed: int = 0, steps: int = 1) -> dict:
    """Run inside each of 4 ranks: dp 2 x ep 2 (ep groups {0,1}, {2,3}; dp groups {0,2}, {1,3})."""
    return _verify(config_dict, seed, dp=2, steps=steps)


def _verify(config_dict: dict, seed: int, dp: int, steps: int = 1) -> dict:
    """Same-seed MiniLM on every rank and its expert-parallel copy over the plan's mesh; rank q feeds rows
    q*B..(q+1)*B of a fixed global batch. Trains both for `steps` SGD steps (momentum 0.9) on that batch and
    compares, with the single-process model on the full batch: the global loss before every step and after the
    last, the gradients (after `sync_gradients`) of every step, the routing, the load and bias after each
    finish_step, and the weights at the end. The first step's all_to_all bytes (forward + backward) are
    compared with those the single-process routing implies."""
    from ..config import ModelConfig
    from ..model import MiniLM
    from .comm import count_collectives
    from .launch import device

    world, rank = dist.get_world_size(), dist.get_rank()
    plan = plan_for(config_dict, dp=dp, ep=world // dp)
    cfg = ModelConfig.from_dict(dict(config_dict))
    dev = device()
    mesh = plan.mesh(dev.type, n_experts=cfg.n_experts)
    torch.manual_seed(seed)
    ref = MiniLM(cfg).to(dev)
    model = parallelize_moe(copy.deepcopy(ref), mesh)
    gen = torch.Generator().manual_seed(seed + 1)
    W, B, T = plan.data_parallel, 2, cfg.max_seq_len
    ids = torch.randint(0, cfg.vocab_size, (B * W, T + 1), generator=gen).to(dev)
    x_all, y_all = ids[:, :-1], ids[:, 1:]
    rows = slice(rank * B, (rank + 1) * B)
    sharded = expert_parameters(model)
    ref_params = dict(ref.named_parameters())
    ep_rank, n_local = mesh["ep"].get_local_rank(), cfg.n_experts // plan.ep
    lo = ep_rank * n_local
    gamma = cfg.bias_update_speed or 0.0

    def global_loss(m, x, y, sharded):
        out = m(x, y)
        loss = out.loss + out.aux_loss
        if not sharded:
            return loss, loss.detach().clone()
        total = loss.detach().clone()
        dist.all_reduce(total, group=dp_ep_mesh(mesh).get_group())
        return loss, total / W

    def max_err(get):  # max |ours - reference| over the parameters, comparing an expert with its slice
        err = {"replicated": 0.0, "experts": 0.0}
        for name, p in model.named_parameters():
            mine, want = get(p), get(ref_params[name])
            key = "experts" if id(p) in sharded else "replicated"
            want = want[lo:lo + n_local] if key == "experts" else want
            err[key] = max(err[key], float((mine - want).abs().max()))
        return err

    def bias_err():
        return max([float((a.router.bias - b.router.bias).abs().max()) for a, b in
                    zip(model.moe_modules(), ref.moe_modules()) if isinstance(a.router, DeepSeekRouter)] or [0.0])

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (ref, model)]
    losses, ref_losses, grad_errs, routing_all = [], [], [], True
    for step in range(steps):
        ref_loss, _ = global_loss(ref, x_all, y_all, False)
        ref_loss.backward()
        with count_collectives() as log:
            loss, mean_loss = global_loss(model, x_all[rows], y_all[rows], True)
            (loss / W).backward()
        sync_gradients(model, mesh)
        losses.append(float(mean_loss))
        ref_losses.append(float(ref_loss.detach()))
        grad_errs.append(max_err(lambda p: p.grad))

        routing_equal = True
        for ref_moe, moe in zip(ref.moe_modules(), model.moe_modules()):
            experts = ref_moe.last_router_output.experts.view(B * W, T, -1)
            routing_equal &= bool(torch.equal(moe.last_router_output.experts.view(B, T, -1), experts[rows]))
        routing_all &= routing_equal
        if step == 0:
            first = {"loss": float(mean_loss), "ref_loss": float(ref_loss.detach()),
                     "loss_err": abs(float(mean_loss - ref_loss.detach())),
                     "grad_err_replicated": grad_errs[0]["replicated"], "grad_err_experts": grad_errs[0]["experts"],
                     "routing_equal": routing_equal, "a2a_calls": log.count("all_to_all_single"),
                     "a2a_bytes": log.by_op().get("all_to_all_single", 0.0),
                     "expected_a2a_bytes": _expected_a2a_bytes(ref, plan, rank, B, T, model),
                     "by_op": log.by_op()}

        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        # finish_step: the EP model all-reduces its ranks' loads (the global load); the reference already holds it
        stats = model.finish_step()
        ref_loads = []
        for moe in ref.moe_modules():
            load, moe.pending_load = moe.pending_load, None
            ref_loads.append(load)
            if gamma and isinstance(moe.router, DeepSeekRouter):
                moe.router.update_bias(load, gamma)
        if step == 0:
            biases = [m.router.bias for m in model.moe_modules() if isinstance(m.router, DeepSeekRouter)]
            first.update(max_vio=stats.get("max_vio"), bias_err=bias_err(),
                         ref_max_vio=sum(max_violation(v) for v in ref_loads) / len(ref_loads),
                         bias_moved=max([float(b.abs().max()) for b in biases] or [0.0]))

    with torch.no_grad():
        ref_next, _ = global_loss(ref, x_all, y_all, False)
        _, next_loss = global_loss(model, x_all[rows], y_all[rows], True)
    losses.append(float(next_loss))
    ref_losses.append(float(ref_next))
    weight_err = max_err(lambda p: p.detach())

    def ranks(dim):
        return dist.get_process_group_ranks((dp_ep_mesh(mesh) if dim == "dp_ep" else mesh[dim]).get_group())

    return dict(first, **{
        "rank": rank, "coords": plan.coords(rank),
        "next_loss": losses[1], "ref_next_loss": ref_losses[1], "next_loss_err": abs(losses[1] - ref_losses[1]),
        "losses": losses, "ref_losses": ref_losses,
        "max_grad_err": max(max(e.values()) for e in grad_errs), "weight_err": max(weight_err.values()),
        "final_bias_err": bias_err(), "routing_equal_all_steps": routing_all,
        "groups": {dim: ranks(dim) for dim in ("ep", "dp", "dp_ep")},
    })


def _expected_a2a_bytes(ref, plan: ParallelPlan, rank: int, B: int, T: int, model) -> int:
    """The all_to_all bytes this rank sends in one forward + backward, from the single-process routing: per
    layer, forward rows out (its assignments to other ranks' experts) and back (other ranks' assignments to its
    experts), the same again as gradients, plus the counts exchange (the E - E/ep counts addressed to the
    other ranks)."""
    cfg = ref.config
    row_bytes = cfg.d_model * next(model.parameters()).element_size()
    ep_rank, n_local = plan.coords(rank)["ep"], cfg.n_experts // plan.ep
    group_rows = [q for q in range(plan.world_size) if plan.coords(q)["dp"] == plan.coords(rank)["dp"] and q != rank]
    expected = 0
    for ref_moe in ref.moe_modules():
        owner = ref_moe.last_router_output.experts.view(-1, T, ref_moe.last_router_output.experts.shape[-1])
        owner = owner // n_local
        incoming = sum(int((owner[q * B:(q + 1) * B] == ep_rank).sum()) for q in group_rows)
        outgoing = int((owner[rank * B:(rank + 1) * B] != ep_rank).sum())
        expected += 2 * (outgoing + incoming) * row_bytes + (cfg.n_experts - n_local) * 8
    return expected
