"""Tensor parallelism, Megatron-style: every weight matrix of a layer split across the ranks of a group.

    tp_model = parallelize_model(model)          # inside each rank (see launch.run); same weights, split
    loss = tp_model(x, y).loss; loss.backward()  # same loss and (sharded) gradients as the single-process model

Megatron-LM (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
Parallelism", section 3) splits an MLP  Y = B(act(A X))  so that only one all-reduce is needed each way:

* A is split by its output rows ("column-parallel": each rank computes some of the hidden units, in full);
* B is split by its input columns ("row-parallel": each rank multiplies its hidden units by its slice of B,
  which gives a partial sum of the output); the partial sums are added with one all-reduce.

Two tiny operators carry all the communication:

* f (CopyToTensorParallel), at the entrance: identity forward (every rank already has the full input);
  all-reduce backward (each rank holds only its part of dL/dX, from its own hidden units);
* g (ReduceFromTensorParallel), at the exit: all-reduce forward (add the partial outputs); identity backward
  (the output, and so its gradient, is the same on every rank).

Attention splits the same way, by heads: q, k and v are column-parallel (each rank computes its own heads,
which never interact), the output projection is row-parallel. So a transformer block costs 2 all-reduces of
the activations [batch, seq, d_model] forward and 2 backward. Norms, embeddings and the output head are
replicated: their inputs and output gradients are identical on every rank, and so are their gradients.

`group` is the process group of the tensor-parallel ranks (None: the default group, i.e. all of them), so the
same layers work on one axis of a 2-D mesh. Nothing here depends on the device: launch.device() picks it.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..attention import CausalSelfAttention, KVCache, _causal_mask
from ..config import ModelConfig
from ..layers import SwiGLU
from ..model import Block, MiniLM
from . import comm, launch


def divide(value: int, tp: int, name: str) -> int:
    """value // tp, or ValueError naming the field when tp ranks cannot share it equally."""
    if value % tp:
        raise ValueError(f"{name}={value} is not divisible by the tensor-parallel size tp={tp}")
    return value // tp


def check_config(config: ModelConfig, tp: int) -> None:
    """Raise (before any process exists) if a model cannot be split over tp ranks by this module."""
    if config.attention != "mha":
        raise NotImplementedError("tensor parallelism here splits attention='mha' only (for MLA, split "
                                  "q_b_proj / kv_b_proj by heads and keep the shared latent replicated)")
    if config.n_experts:
        raise NotImplementedError("Mixture-of-Experts layers are split by expert parallelism (ep), not here")
    divide(config.n_heads, tp, "n_heads")
    divide(config.n_kv_heads, tp, "n_kv_heads")  # with GQA each rank must own whole key/value heads
    divide(config.d_ff, tp, "d_ff")


# ---- the two communication operators: f and g --------------------------------------------------------------


class CopyToTensorParallel(torch.autograd.Function):
    """f: identity forward, all-reduce of the gradient backward.

    Placed where a replicated tensor enters rank-local computation. Each rank uses X for its own slice of
    the work, so dL/dX on each rank is only that slice's contribution; the true gradient is their sum.
    """

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may still hold the incoming one
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: all-reduce forward, identity backward.

    Placed where rank-local partial sums leave: adding them gives the full output, the same on every rank,
    so each partial sum's gradient is simply the output's gradient.
    """

    @staticmethod
    def forward(ctx, x, group=None):
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromTensorParallel(torch.autograd.Function):
    """All-gather along the last dimension forward; backward keeps this rank's slice of the gradient.

    The gathered output is replicated, so its gradient is identical everywhere: no communication back.
    """

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.group = group
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format)
                 for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        tp, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(tp, dim=-1)[rank].contiguous(), None


# ---- the two linear layers ---------------------------------------------------------------------------------


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A [out_features, in_features] split by rows: this rank holds out_features / tp.

    The input is replicated and goes through f (so its gradient is all-reduced backward); the output stays
    sharded along its last dimension (gather_output=False, the usual case: a row-parallel layer follows), or
    is all-gathered into the full output (gather_output=True).

    stacked: when A is several matrices stacked by rows (SwiGLU's [gate; up], attention's [q; k; v]), their
    row counts; each is split on its own, so every rank gets a slice of each, e.g. [gate_r; up_r].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 group=None, stacked: tuple[int, ...] | None = None, device=None, dtype=None):
        super().__init__()
        self.group, self.gather_output = group, gather_output
        self.tp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.in_features, self.out_features = in_features, out_features
        self.stacked = tuple(stacked) if stacked else (out_features,)
        if sum(self.stacked) != out_features:
            raise ValueError(f"stacked={self.stacked} must add up to out_features={out_features}")
        if gather_output and len(self.stacked) > 1:
            raise ValueError("gather_output=True would interleave the stacked matrices; gather each yourself")
        names = ["out_features"] if len(self.stacked) == 1 else [f"stacked[{i}]" for i in range(len(self.stacked))]
        local = sum(divide(n, self.tp, name) for n, name in zip(self.stacked, names))
        bound = in_features ** -0.5  # nn.Linear's default init
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(local, device=device, dtype=dtype)) if bias else None

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full-size weight or bias (or of its gradient)."""
        return torch.cat([block.chunk(self.tp, dim=0)[self.rank] for block in full.split(self.stacked, dim=0)])

    @classmethod
    def from_linear(cls, linear, group=None, gather_output: bool = False, stacked=None):
        """The rank's slice of a single-process nn.Linear (or of a bare weight tensor)."""
        weight = linear.weight if isinstance(linear, nn.Linear) else linear
        bias = linear.bias if isinstance(linear, nn.Linear) else None
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, gather_output, group, stacked,
                    weight.device, weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(layer.shard(weight))
            if bias is not None:
                layer.bias.copy_(layer.shard(bias))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(CopyToTensorParallel.apply(x, self.group), self.weight, self.bias)
        return GatherFromTensorParallel.apply(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} / tp={self.tp}"


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A [out_features, in_features] split by columns: this rank holds in_features / tp.

    The input must already be sharded along its last dimension (the output of a column-parallel layer).
    Each rank's product is a partial sum of y; g all-reduces them. The bias is replicated and added once,
    after the reduce (added before it, it would be counted tp times).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None, device=None,
                 dtype=None):
        super().__init__()
        self.group = group
        self.tp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.in_features, self.out_features = in_features, out_features
        local = divide(in_features, self.tp, "in_features")
        bound = in_features ** -0.5  # the full fan-in, so the init does not depend on tp
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a full-size weight (or its gradient); the bias is replicated, returned whole."""
        return full if full.dim() == 1 else full.chunk(self.tp, dim=-1)[self.rank]

    @classmethod
    def from_linear(cls, linear, group=None):
        """The rank's slice of a single-process nn.Linear (or of a bare weight tensor)."""
        weight = linear.weight if isinstance(linear, nn.Linear) else linear
        bias = linear.bias if isinstance(linear, nn.Linear) else None
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, group, weight.device, weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(layer.shard(weight))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ReduceFromTensorParallel.apply(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} / tp={self.tp}, out_features={self.out_features}"


# ---- the model's layers, split --------------------------------------------------------------------------------


class TensorParallelSwiGLU(nn.Module):
    """down( silu(gate(x)) * up(x) ) with gate/up column-parallel and down row-parallel.

    silu(gate) * up is element-wise, so each rank computes it on its own d_ff / tp hidden units with no
    communication: one all-reduce forward (g, after down) and one backward (f, before gate_up).
    """

    def __init__(self, gate_up: ColumnParallelLinear, down: RowParallelLinear):
        super().__init__()
        self.gate_up, self.down = gate_up, down

    @classmethod
    def from_dense(cls, mlp: SwiGLU, group=None) -> "TensorParallelSwiGLU":
        d_ff = mlp.down.in_features
        divide(d_ff, dist.get_world_size(group), "d_ff")
        return cls(ColumnParallelLinear.from_linear(mlp.gate_up, group, stacked=(d_ff, d_ff)),
                   RowParallelLinear.from_linear(mlp.down, group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # this rank's [gate_r | up_r]
        return self.down(F.silu(gate) * up)


class TensorParallelAttention(nn.Module):
    """CausalSelfAttention split by heads: each rank holds n_heads / tp query heads (and n_kv_heads / tp
    key/value heads) and attends with them alone; heads never interact until the output projection.

    qkv is column-parallel (f: one all-reduce backward), out is row-parallel (g: one all-reduce forward).
    With grouped-query attention a rank must own whole key/value heads, hence n_kv_heads % tp == 0: query
    heads r*H/tp .. then use exactly the key/value heads r*Hk/tp .. that the single-process model pairs them with.
    With qk_norm, the per-head norms' weights are shared by all heads, so each rank sees only its heads' part
    of their gradient: f on the weight all-reduces it (2 more small all-reduces backward).
    """

    def __init__(self, attn: CausalSelfAttention, group=None):
        super().__init__()
        tp = dist.get_world_size(group)
        self.group, self.head_dim, self.dropout = group, attn.head_dim, attn.dropout
        self.n_heads = divide(attn.n_heads, tp, "n_heads")          # local heads
        self.n_kv_heads = divide(attn.n_kv_heads, tp, "n_kv_heads")
        q, kv = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
        self.qkv = ColumnParallelLinear.from_linear(attn.qkv, group, stacked=(q, kv, kv))
        self.out = RowParallelLinear.from_linear(attn.out, group)
        self.rotary = copy.deepcopy(attn.rotary)                    # cos/sin tables: replicated
        self.q_norm, self.k_norm = copy.deepcopy(attn.q_norm), copy.deepcopy(attn.k_norm)

    @classmethod
    def from_dense(cls, attn: CausalSelfAttention, group=None) -> "TensorParallelAttention":
        return cls(attn, group)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, device, dtype)  # local heads only

    def _norm(self, norm, x):
        weight = CopyToTensorParallel.apply(norm.weight, self.group)  # replicated weight, rank-local use
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), norm.eps).to(x.dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: [batch, seq, d_model] (replicated) -> [batch, seq, d_model] (replicated)."""
        B, T, _ = x.shape
        H, Hk = self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).view(B, T, H + 2 * Hk, self.head_dim).split([H, Hk, Hk], dim=2)
        if self.q_norm is not None:
            q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)
        past = cache.length if cache is not None else 0
        q, k = self.rotary(q, start=past).transpose(1, 2), self.rotary(k, start=past).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(T, past, x.device),
                                           is_causal=(past == 0 and T > 1),
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=Hk != H)
        return self.out(y.transpose(1, 2).reshape(B, T, H * self.head_dim))


def parallelize_block(block: Block, group=None) -> Block:
    """A copy of a dense Block with its attention and MLP tensor-parallel (its norms replicated)."""
    if not isinstance(block.attn, CausalSelfAttention) or not isinstance(block.mlp, SwiGLU):
        raise NotImplementedError("only blocks of CausalSelfAttention + SwiGLU are split here "
                                  f"(got {type(block.attn).__name__} + {type(block.mlp).__name__})")
    new = copy.deepcopy(block)  # the norms, and for a moment the full weights: simple rather than frugal
    new.attn = TensorParallelAttention.from_dense(block.attn, group)
    new.mlp = TensorParallelSwiGLU.from_dense(block.mlp, group)
    return new


def parallelize_model(model: MiniLM, group=None) -> MiniLM:
    """A tensor-parallel copy of a dense MiniLM: every block split, embeddings / final norm / head replicated.

    Each rank passes the same full model (e.g. built with the same seed) and keeps its own slices.
    """
    check_config(model.config, dist.get_world_size(group))
    tp_model = copy.deepcopy(model)
    tp_model.blocks = nn.ModuleList(parallelize_block(b, group) for b in model.blocks)
    return tp_model


# ---- checks: against the single-process model, and against PyTorch's own tensor parallelism -----------------


def expected_comm(config: ModelConfig, batch: int, seq: int, tp: int, element_size: int = 4) -> dict:
    """The textbook traffic of one forward + backward: per block 2 all-reduces of the activations forward
    (g after attention and after the MLP) and 2 backward (f before them), each 2 (tp - 1) / tp * S bytes on a
    ring; with qk_norm also 2 all-reduces of a head_dim-sized gradient backward. {op: bytes, "calls": n}."""
    act = batch * seq * config.d_model * element_size
    calls = [act] * 4 + ([config.head_dim * element_size] * 2 if config.qk_norm else [])
    calls = calls * config.n_layers
    return {"all_reduce": sum(comm.wire_cost("all_reduce", s, tp) for s in calls), "calls": len(calls)}


def verify(config_dict: dict, seed: int = 0, steps: int = 1, batch: int = 2, lr: float = 0.5) -> dict:
    """Inside each rank: single-process MiniLM vs its tensor-parallel copy over the default group.

    Same seed on every rank (so the same weights), one forward + backward on a fixed batch (collectives
    counted), then `steps` SGD steps on both and the loss of a fresh forward.
    """
    cfg = ModelConfig.from_dict(config_dict)
    dev, tp = launch.device(), dist.get_world_size()
    torch.manual_seed(seed)
    dense = MiniLM(cfg).to(dev)
    tp_model = parallelize_model(dense)
    tokens = torch.randint(cfg.vocab_size, (batch, cfg.max_seq_len + 1),
                           generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss_single = dense(x, y).loss
    loss_single.backward()
    with comm.count_collectives() as log:
        loss_tp = tp_model(x, y).loss
        loss_tp.backward()
    full = dict(dense.named_parameters())
    owners = dict(tp_model.named_modules())
    grad_diff = 0.0
    for name, p in tp_model.named_parameters():
        owner = owners[name.rpartition(".")[0]]
        want = full[name].grad
        if isinstance(owner, (ColumnParallelLinear, RowParallelLinear)):
            want = owner.shard(want)
        grad_diff = max(grad_diff, (p.grad - want).abs().max().item())
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in (dense, tp_model)]
    after = []
    for _ in range(steps):
        after = []
        for model, opt in zip((dense, tp_model), opts):
            opt.step()
            opt.zero_grad()
            loss = model(x, y).loss
            loss.backward()
            after.append(loss.item())
    expected = expected_comm(cfg, batch, cfg.max_seq_len, tp, dense.embed.weight.element_size())
    return {"loss_single": loss_single.item(), "loss_tp": loss_tp.item(), "max_grad_diff": grad_diff,
            "comm": log.by_op(), "expected_comm": {"all_reduce": expected["all_reduce"]},
            "all_reduce_calls": log.count("all_reduce"), "expected_all_reduce_calls": expected["calls"],
            "loss_after_single": after[0] if after else None, "loss_after_tp": after[1] if after else None}


class _SplitSwiGLU(nn.Module):
    """SwiGLU with gate and up as two layers, the layout PyTorch's ColwiseParallel can shard by name."""

    def __init__(self, mlp: SwiGLU):
        super().__init__()
        d_ff, d_model = mlp.down.in_features, mlp.down.out_features
        self.gate, self.up = nn.Linear(d_model, d_ff, bias=False), nn.Linear(d_model, d_ff, bias=False)
        self.down = copy.deepcopy(mlp.down)
        with torch.no_grad():
            self.gate.weight.copy_(mlp.gate_up.weight[:d_ff])
            self.up.weight.copy_(mlp.gate_up.weight[d_ff:])

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def torch_tp_crosscheck(d_model: int = 32, d_ff: int = 96, seed: int = 0, tokens: int = 8) -> dict:
    """Inside each rank: TensorParallelSwiGLU vs the same MLP split by torch.distributed.tensor.parallel
    (ColwiseParallel gate and up, RowwiseParallel down, on a 1-D DeviceMesh of the world).

    Returns the largest differences of the outputs, the input gradients and this rank's weight gradients, and
    the collectives each version calls (forward, backward): PyTorch's all-reduces the input gradient once per
    column-parallel layer, i.e. twice; the fused gate_up here does it once.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dev = launch.device()
    torch.manual_seed(seed)
    mlp = SwiGLU(d_model, d_ff).to(dev)
    x = torch.randn(tokens, d_model, device=dev)
    ours = TensorParallelSwiGLU.from_dense(mlp)
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    theirs = parallelize_module(_SplitSwiGLU(mlp), mesh,
                                {"gate": ColwiseParallel(), "up": ColwiseParallel(), "down": RowwiseParallel()})

    def run(model, counter, count):
        xi = x.clone().requires_grad_()
        with counter() as log:
            out = model(xi)
            forward = count(log)
            out.pow(2).sum().backward()
        return out.detach(), xi.grad, (forward, count(log) - forward)

    out_a, grad_a, calls_a = run(ours, comm.count_collectives, lambda log: log.count())
    out_b, grad_b, calls_b = run(theirs, CommDebugMode, lambda log: log.get_total_counts())
    local = [t.grad.to_local() for t in (theirs.gate.weight, theirs.up.weight, theirs.down.weight)]
    return {"out_diff": (out_a - out_b).abs().max().item(), "input_grad_diff": (grad_a - grad_b).abs().max().item(),
            "weight_grad_diff": max((ours.gate_up.weight.grad - torch.cat(local[:2])).abs().max().item(),
                                    (ours.down.weight.grad - local[2]).abs().max().item()),
            "collectives_ours": calls_a, "collectives_torch": calls_b}
