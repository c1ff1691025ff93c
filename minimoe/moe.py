"""Mixture-of-Experts: a router, grouped experts and the dispatch that connects them (torchtitan's split).

A router maps each token to k experts and k combine weights; `GroupedExperts` runs every expert once on
the contiguous block of tokens it received; `MoE` sorts the tokens by expert, calls both and scatters the
weighted results back. Each part can be swapped without touching the others:

    SoftmaxTopKRouter   softmax over experts, top-k (Switch k=1, GShard / Mixtral k=2)
    DeepSeekRouter      sigmoid affinities, bias-only balancing, group-limited routing (DeepSeek-V3)
    HashRouter          a fixed token-id -> expert table (Roller et al., 2021, "Hash Layers")
    TaskRouter          each task owns a subset of experts ("path selection", Pathways / PaLM-2 style)

The learned routers (`FP32Router`) decide in fp32 whatever the model's dtype and autocast. The balancing
losses a training loop may add (Switch, per layer or pooled over all layers as transformers computes it,
router z-loss, DeepSeek-V3's sequence-wise loss) and `dense_reference`, the brute-force oracle the tests
compare `MoE` to, live here too.
The parts take their settings as constructor arguments; `build_moe(cfg)` builds a layer from a ModelConfig.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ROUTER_PRECISIONS
from .grouped_experts import grouped_mm_available, grouped_swiglu, grouped_swiglu_mm
from .layers import SwiGLU


class RouterOutput(NamedTuple):
    weights: torch.Tensor  # [N, k] combine weights (float)
    experts: torch.Tensor  # [N, k] chosen expert ids (long)
    scores: torch.Tensor   # [N, E] affinities for statistics and losses (softmax or sigmoid)
    logits: torch.Tensor   # [N, E] raw router logits for the z-loss; zeros for routers without logits


# ---- routers -------------------------------------------------------------------------------------

class FP32Router(nn.Module):
    """Base of the learned routers: which experts a token gets is decided in fp32, whatever the model's dtype.

    Top-k choices turn on near-ties, and bf16 keeps 8 significant bits: a bf16 gate weight or bf16 logits send
    some tokens to other experts than fp32 would, and a bf16 correction bias of magnitude ~1 cannot move by
    DeepSeek-V3's gamma = 1e-3 (less than half a bf16 ulp there, 2^-8), so its balancing silently stops. DeepSeek's
    inference code (DeepSeek-V3.2-Exp, `Gate`) and transformers' DeepSeek-V3 keep the gate weight and the bias in
    fp32 and compute F.linear(x.float(), W.float()); transformers keeps them fp32 through
    `_keep_in_fp32_modules_strict`, but only while loading a checkpoint (its model.to(bf16) casts them). Here:

      * the gate weight and the router's floating buffers (DeepSeek's bias) stay fp32 for good: `_apply`, behind
        .to / .half / .bfloat16 / .cuda, gives them the device of the cast but never a dtype narrower than fp32
        (casting up, as .double() does, is left alone), and a state dict of bf16 tensors is loaded into fp32
        (also with assign=True); their gradients are fp32, so an optimizer updates them in fp32;
      * precision="fp32" (default): logits = F.linear(x.float(), W) with autocast disabled, so bf16 training
        under autocast routes exactly like fp32 training; gradients reach x (through the cast) and W.
        precision="input": logits = F.linear(x, W.to(x.dtype)) with autocast left on, then made fp32: what
        transformers' Mixtral and Qwen3-MoE compute (their gate is in the model's dtype), so that a model
        converted from them routes exactly like its source (ModelConfig.router_precision).

    A gate replaced by a quantized layer (minimoe.quant with a "router" policy) is called as it is, in the
    precision it was built for, and only its output is made fp32.
    """

    def __init__(self, precision: str = "fp32"):
        super().__init__()
        if precision not in ROUTER_PRECISIONS:
            raise ValueError(f"precision must be one of {ROUTER_PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.register_load_state_dict_post_hook(_fp32_after_load)

    def _fp32_tensors(self) -> list[torch.Tensor]:
        """The tensors kept in fp32: the gate weight (unless a quantized layer replaced the gate) and the
        router's own floating-point buffers."""
        gate = self._modules.get("gate")
        kept = [gate.weight] if isinstance(gate, nn.Linear) else []
        return kept + [b for b in self._buffers.values() if b is not None and b.is_floating_point()]

    def _apply(self, fn, recurse=True):
        kept = self._fp32_tensors()
        kept += [t.grad for t in kept if t.grad is not None]

        def keep_fp32(t):
            out = fn(t)
            if out.is_floating_point() and out.dtype.itemsize < 4 and any(t is k for k in kept):
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_fp32, recurse)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, d_model] -> router logits [N, E] in fp32 (or wider, for a float64 model)."""
        gate = self.gate
        if not isinstance(gate, nn.Linear):  # quantized: the layer keeps its own precision
            return gate(x).float()
        if self.precision == "input":
            return F.linear(x, gate.weight.to(x.dtype)).float()
        dtype = torch.promote_types(torch.promote_types(x.dtype, gate.weight.dtype), torch.float32)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.to(dtype), gate.weight.to(dtype))
        return F.linear(x.to(dtype), gate.weight.to(dtype))


def _fp32_after_load(router: FP32Router, incompatible_keys) -> None:
    """load_state_dict(assign=True) puts the state dict's own tensors in place: make narrow ones fp32 again."""
    with torch.no_grad():
        for t in router._fp32_tensors():
            if t.dtype.itemsize < 4:
                t.data = t.data.float()


class SoftmaxTopKRouter(FP32Router):
    """p = softmax(W x) over the E experts; keep the top-k.  Switch Transformer (k=1), GShard / Mixtral (k=2).

    norm_topk_prob=True renormalises the k kept probabilities to sum to 1 (Mixtral). With k=1 that makes
    every weight 1 and the gate gets no gradient from the language-model loss, so Switch-style routing
    (Fedus et al., 2021) uses norm_topk_prob=False and multiplies by the raw probability.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, norm_topk_prob: bool = True,
                 precision: str = "fp32"):
        super().__init__(precision)
        _check_sizes(d_model=d_model, n_experts=n_experts, top_k=top_k)
        _check_top_k(top_k, n_experts)
        self.n_experts, self.top_k, self.norm_topk_prob = n_experts, top_k, norm_topk_prob
        self.gate = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, x, token_ids=None, task_ids=None) -> RouterOutput:
        """x: [N, d_model] -> RouterOutput (token_ids and task_ids are ignored)."""
        logits = self._logits(x)  # routing decisions in fp32: bf16 ties flip top-k choices (see FP32Router)
        scores = logits.softmax(dim=-1)
        weights, experts = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(weights, experts, scores, logits)


class DeepSeekRouter(FP32Router):
    """DeepSeek-V3's router (arXiv 2412.19437, section 2.1.2, eq. 12-16).

    s = sigmoid(W x) [N, E]. The chosen experts are the top-k of s + b, where b is a per-expert bias that
    only steers the choice; the combine weights use s alone:  g = s_chosen / sum(s_chosen) * scale.
    b is a buffer (no gradient): `update_bias` moves it between steps, the auxiliary-loss-free balancing
    of Wang et al. (arXiv 2408.15664). Group-limited routing: the E experts form n_group groups, a group
    scores the sum of its two best s + b, and only the experts of the best topk_group groups can be chosen
    (in DeepSeek-V3 a group is one node, so this bounds how many nodes a token's activations travel to).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, norm_topk_prob: bool = True, precision: str = "fp32"):
        super().__init__(precision)
        _check_sizes(d_model=d_model, n_experts=n_experts, top_k=top_k, n_group=n_group, topk_group=topk_group)
        _check_top_k(top_k, n_experts)
        if n_experts % n_group:
            raise ValueError(f"n_group={n_group} must divide n_experts={n_experts}")
        if topk_group > n_group:
            raise ValueError(f"topk_group={topk_group} cannot exceed n_group={n_group}")
        reachable = topk_group * (n_experts // n_group)
        if top_k > reachable:
            raise ValueError(f"top_k={top_k} exceeds the {reachable} experts reachable in topk_group={topk_group} "
                             f"groups of {n_experts // n_group}")
        if not (isinstance(routed_scaling_factor, (int, float)) and routed_scaling_factor > 0):
            raise ValueError(f"routed_scaling_factor must be a positive number, got {routed_scaling_factor!r}")
        self.n_experts, self.top_k = n_experts, top_k
        self.n_group, self.topk_group, self.routed_scaling_factor = n_group, topk_group, routed_scaling_factor
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        # a buffer, not a parameter: the optimizer must never touch it, but checkpoints must keep it. fp32 in a
        # bf16 model too (FP32Router): update_bias's steps of gamma = 1e-3 are below half a bf16 ulp of 1
        self.register_buffer("bias", torch.zeros(n_experts))

    def forward(self, x, token_ids=None, task_ids=None) -> RouterOutput:
        """x: [N, d_model] -> RouterOutput (token_ids and task_ids are ignored)."""
        logits = self._logits(x)
        scores = logits.sigmoid()
        biased = scores.detach() + self.bias  # choice only: no gradient flows through the selection
        if self.n_group > 1:
            grouped = biased.view(-1, self.n_group, self.n_experts // self.n_group)  # [N, G, E/G]
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
            keep = group_score.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(biased.shape)
            biased = biased.masked_fill(~expert_mask, float("-inf"))
        experts = biased.topk(self.top_k, dim=-1).indices
        chosen = scores.gather(1, experts)  # the bias is not in the weights
        if self.norm_topk_prob:  # DeepSeek-V3 normalises; DeepSeek-V2 (norm_topk_prob=False) does not
            chosen = chosen / chosen.sum(dim=-1, keepdim=True)
        weights = chosen * self.routed_scaling_factor
        return RouterOutput(weights, experts, scores, logits)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert, gamma: float) -> None:
        """b_i += gamma * sign(mean load - load_i)  (arXiv 2408.15664, Algorithm 1).

        Call once per optimizer step, outside autograd (torchtitan runs it as an optimizer pre-hook).
        An overloaded expert's bias drops by exactly gamma, an underloaded one's rises by gamma.
        """
        load = torch.as_tensor(tokens_per_expert, dtype=torch.float32, device=self.bias.device)
        if load.shape != self.bias.shape:
            raise ValueError(f"tokens_per_expert must have {self.n_experts} entries, got shape {tuple(load.shape)}")
        self.bias += gamma * torch.sign(load.mean() - load)


class HashRouter(nn.Module):
    """A fixed token-id -> k experts table (Roller et al., 2021, "Hash Layers For Large Sparse Models").

    Nothing is learned: a seeded permutation of the vocabulary, taken modulo E, spreads ids evenly over the
    experts; a token's j-th expert is the next one along a seeded permutation of the experts, so its k
    experts are distinct. Weights are all 1/k. Needs token_ids.
    """

    def __init__(self, n_experts: int, top_k: int, vocab_size: int, seed: int = 0):
        super().__init__()
        _check_sizes(n_experts=n_experts, top_k=top_k, vocab_size=vocab_size)
        _check_top_k(top_k, n_experts)
        self.n_experts, self.top_k, self.vocab_size = n_experts, top_k, vocab_size
        gen = torch.Generator().manual_seed(seed)
        token_perm = torch.randperm(vocab_size, generator=gen)
        expert_perm = torch.randperm(n_experts, generator=gen)
        slots = (token_perm[:, None] + torch.arange(top_k)) % n_experts  # [vocab, k], distinct per row
        # saved in checkpoints: the table must not change if torch's random generator ever does
        self.register_buffer("table", expert_perm[slots])

    def forward(self, x, token_ids=None, task_ids=None) -> RouterOutput:
        """x: [N, d_model] (only its length and device are used), token_ids: [N] -> RouterOutput."""
        token_ids = _check_ids("token_ids", token_ids, x.shape[0], "vocab_size", self.vocab_size, "HashRouter")
        experts = self.table[token_ids]
        weights = torch.full(experts.shape, 1.0 / self.top_k, device=x.device)
        scores = torch.zeros(x.shape[0], self.n_experts, device=x.device).scatter_(1, experts, weights)
        return RouterOutput(weights, experts, scores, torch.zeros_like(scores))


class TaskRouter(FP32Router):
    """Each task owns a fixed subset of experts; a learned softmax top-k gate chooses inside it.

    The "path selection" of Pathways / PaLM-2-style task-routed MoE: task t can only reach task_experts[t]
    (default: a contiguous block of n_experts // n_tasks experts per task); experts outside the subset get
    probability 0 and are never chosen. task_ids: [N], one task id per token.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, n_tasks: int,
                 task_experts: list[list[int]] | None = None, norm_topk_prob: bool = True, precision: str = "fp32"):
        super().__init__(precision)
        _check_sizes(d_model=d_model, n_experts=n_experts, top_k=top_k, n_tasks=n_tasks)
        _check_top_k(top_k, n_experts)
        if task_experts is None:
            block = n_experts // n_tasks
            if block < top_k:
                raise ValueError(f"n_tasks={n_tasks}: the default blocks of n_experts // n_tasks = {block} experts "
                                 f"are fewer than top_k={top_k}")
            task_experts = [list(range(t * block, (t + 1) * block)) for t in range(n_tasks)]
        if len(task_experts) != n_tasks:
            raise ValueError(f"task_experts must have one list per task ({n_tasks}), got {len(task_experts)}")
        mask = torch.zeros(n_tasks, n_experts, dtype=torch.bool)
        for t, subset in enumerate(task_experts):
            if any(not isinstance(e, int) or not 0 <= e < n_experts for e in subset):
                raise ValueError(f"task_experts[{t}] must hold expert ids in [0, {n_experts}), got {subset!r}")
            if len(set(subset)) < top_k:
                raise ValueError(f"task_experts[{t}] has {len(set(subset))} distinct experts, fewer than "
                                 f"top_k={top_k}")
            mask[t, subset] = True
        self.n_experts, self.top_k, self.n_tasks, self.norm_topk_prob = n_experts, top_k, n_tasks, norm_topk_prob
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.register_buffer("task_mask", mask, persistent=False)  # rebuilt from the constructor arguments

    def forward(self, x, token_ids=None, task_ids=None) -> RouterOutput:
        """x: [N, d_model], task_ids: [N] in [0, n_tasks) -> RouterOutput."""
        task_ids = _check_ids("task_ids", task_ids, x.shape[0], "n_tasks", self.n_tasks, "TaskRouter")
        logits = self._logits(x)
        masked = logits.masked_fill(~self.task_mask[task_ids], float("-inf"))
        scores = masked.softmax(dim=-1)
        # top-k of the masked logits, not of the probabilities: an underflowed in-subset probability
        # could otherwise tie at 0 with an out-of-subset expert
        experts = masked.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(weights, experts, scores, logits)


# ---- experts -------------------------------------------------------------------------------------

class GroupedExperts(nn.Module):
    """E SwiGLU experts with their weights stacked: w_gate_up [E, d_model, 2*d_ff], w_down [E, d_ff, d_model].

    Expert e computes  (silu(x @ Wg) * (x @ Wu)) @ Wd  with  [Wg | Wu] = w_gate_up[e]: the same function as
    `SwiGLU` with gate_up.weight = w_gate_up[e].T and down.weight = w_down[e].T.
    """

    def __init__(self, n_experts: int, d_model: int, d_ff: int):
        super().__init__()
        _check_sizes(n_experts=n_experts, d_model=d_model, d_ff=d_ff)
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_ff))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        # nn.Linear's default init, so a fresh GroupedExperts behaves like E fresh SwiGLU modules
        nn.init.uniform_(self.w_gate_up, -d_model ** -0.5, d_model ** -0.5)
        nn.init.uniform_(self.w_down, -d_ff ** -0.5, d_ff ** -0.5)

    def forward(self, x_sorted: torch.Tensor, counts, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x_sorted: [M, d_model], grouped by expert in expert order; counts: [E] (list or tensor) -> [M, d_model].

        weights: optional [M] combine weights (sorted like x_sorted); the result is then weights[:, None] *
        expert(x), computed by scaling the d_ff-wide hidden activations rather than the d_model-wide output,
        which for fine-grained experts (d_ff < d_model) moves less memory forward and backward.
        Runs `grouped_swiglu` (minimoe/grouped_experts.py), a hand-written autograd function that computes
        what `loop_forward` computes with far fewer kernels and temporaries; in bf16 on a Hopper GPU,
        `grouped_swiglu_mm` (one grouped matmul kernel per projection for all experts) instead.
        """
        if x_sorted.dtype == torch.bfloat16 or torch.is_autocast_enabled(x_sorted.device.type):
            if grouped_mm_available(x_sorted) and isinstance(counts, torch.Tensor):  # Hopper GPUs: no host sync
                return grouped_swiglu_mm(x_sorted, self.w_gate_up, self.w_down, counts, weights)
        return grouped_swiglu(x_sorted, self.w_gate_up, self.w_down, self._counts(x_sorted, counts), weights)

    def _counts(self, x_sorted: torch.Tensor, counts) -> list[int]:
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        if len(counts) != self.n_experts or sum(counts) != x_sorted.shape[0]:
            raise ValueError(f"counts must have {self.n_experts} entries summing to {x_sorted.shape[0]} tokens, "
                             f"got {counts}")
        return counts

    def loop_forward(self, x_sorted: torch.Tensor, counts, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The same function as `forward`, as a plain loop over the experts that autograd records op by op.

        The reference the fast path is tested against, and the readable statement of what an expert computes.
        """
        if weights is not None:
            out = self.loop_forward(x_sorted, counts)
            return out * weights[:, None].to(out.dtype)
        counts = self._counts(x_sorted, counts)
        # unbind, not self.w_gate_up[e] inside the loop: the backward of each index op allocates a full
        # [E, ...] zero gradient and adds into it, E times over (4-6x slower backward at E=64 on a CPU, and
        # it grows with E); unbind's backward stacks the E slices once.
        out = []
        for xe, w_gu, w_d in zip(x_sorted.split(counts), self.w_gate_up.unbind(0), self.w_down.unbind(0)):
            if xe.shape[0] == 0:
                out.append(xe)  # an expert that received no token: nothing to compute, keep the shape
                continue
            gate, up = (xe @ w_gu).chunk(2, dim=-1)
            out.append((F.silu(gate) * up) @ w_d)
        return torch.cat(out) if out else x_sorted


# ---- the layer -----------------------------------------------------------------------------------

class Dispatch(NamedTuple):
    order: torch.Tensor          # [M] kept assignments (index into the flattened N*k), sorted by expert
    counts: torch.Tensor         # [E] assignments each expert received, before dropping
    kept_counts: torch.Tensor    # [E] assignments each expert computes, after dropping


def dispatch(experts: torch.Tensor, n_experts: int, capacity: int | None) -> Dispatch:
    """Sort the N*k assignments by expert and drop those beyond `capacity` per expert (first choices first).

    experts: [N, k]. Assignment a is token a // k, slot a % k. Priority follows GShard (Lepikhin et al.,
    2020, Algorithm 1) and Switch: every token's first choice, in token order, then every token's second
    choice, and so on; so a token's second choice never takes the place of a later token's first choice.
    The stable sort runs over the assignments listed slot by slot, which puts each expert's block in exactly
    that priority order; its first `capacity` rows are kept.
    """
    N, k = experts.shape
    by_slot = experts.t().reshape(-1)                        # [k*N]: entry s*N + n is token n's choice s
    order = torch.argsort(by_slot, stable=True)
    counts = torch.bincount(by_slot, minlength=n_experts)
    kept_counts = counts
    if capacity is not None:
        start = counts.cumsum(0) - counts                    # first sorted position of each expert
        rank = torch.arange(order.numel(), device=order.device) - start[by_slot[order]]  # place inside it
        order, kept_counts = order[rank < capacity], counts.clamp(max=capacity)
    return Dispatch(order % max(N, 1) * k + order // max(N, 1), counts, kept_counts)  # s*N + n -> n*k + s


class MoE(nn.Module):
    """y = sum over a token's k routed experts of  weight * expert(x)  (+ shared experts(x)).

    Shared experts (DeepSeekMoE, arXiv 2401.06066) are one SwiGLU of width n_shared_experts * d_ff that
    every token passes through. capacity_factor=None is dropless; otherwise, in training mode, each expert
    computes at most ceil(capacity_factor * N * k / E) of a forward's assignments, first choices before second
    choices (see `dispatch`), and drops the rest (GShard / Switch), which then add nothing: the token still
    reaches the next layer through the residual connection outside this module. In eval mode the layer is
    dropless whatever the capacity factor, as Mixtral's and DeepSeek-V3's inference is: a token's output never
    depends on the other tokens of its batch, so evaluation does not depend on how it is batched and decoding
    with a KV cache (N = batch) computes what a full forward computes. Capacity is a training-time bound on
    the work per expert. capacity_n_experts (default n_experts) is the E of that formula: a model extracted
    from a task-routed one keeps its parent's E, so its experts drop exactly what they dropped in the parent.

    After a forward, `stats()` describes the routing (computed on demand, so training pays nothing for it),
    and in training mode the per-expert loads add up in `pending_load` until `finish_step` consumes them.
    """

    capacity_n_experts: int | None = None  # the E of the capacity formula; None = n_experts

    def __init__(self, d_model: int, d_ff: int, router: nn.Module, n_experts: int, n_shared_experts: int = 0,
                 capacity_factor: float | None = None, capacity_n_experts: int | None = None):
        super().__init__()
        _check_sizes(d_model=d_model, d_ff=d_ff, n_experts=n_experts)
        if not isinstance(n_shared_experts, int) or isinstance(n_shared_experts, bool) or n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be an integer >= 0, got {n_shared_experts!r}")
        if capacity_factor is not None and not (
                isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
                and capacity_factor > 0):
            raise ValueError(f"capacity_factor must be None (dropless) or > 0, got {capacity_factor!r}")
        if getattr(router, "n_experts", n_experts) != n_experts:
            raise ValueError(f"n_experts={n_experts} but the router routes to {router.n_experts} experts")
        if capacity_n_experts is not None:
            _check_sizes(capacity_n_experts=capacity_n_experts)
        self.n_experts, self.capacity_factor = n_experts, capacity_factor
        self.capacity_n_experts = capacity_n_experts
        self.router = router
        self.experts = GroupedExperts(n_experts, d_model, d_ff)
        self.shared = SwiGLU(d_model, n_shared_experts * d_ff) if n_shared_experts else None
        self.last_tokens_per_expert: torch.Tensor | None = None  # [E] assignments of the last forward
        self.last_router_output: RouterOutput | None = None      # for the balancing losses
        self.last_dispatch: Dispatch | None = None
        self.last_shape: tuple[int, int] | None = None           # (batch, seq) of the last forward
        self.pending_load: torch.Tensor | None = None            # [E] summed over training forwards

    def capacity(self, n_assignments: int) -> int | None:
        """Assignments one expert may compute, in training mode, for n_assignments = N * k; None = dropless.

        The formula only: `route` applies it in training mode and routes dropless in eval mode.
        """
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_assignments / (self.capacity_n_experts or self.n_experts))

    def forward(self, x, token_ids=None, task_ids=None) -> torch.Tensor:
        """x: [batch, seq, d_model]; token_ids: [batch, seq]; task_ids: [batch] or [batch, seq] -> y like x."""
        B, T, d = x.shape
        flat, r, plan, token, weights, xs = self.route(x, token_ids, task_ids)
        if self.experts.d_ff <= d:  # fine-grained experts: scale the narrower hidden activations, not the output
            out = self.experts(xs, plan.kept_counts, weights)    # [M, d]
        else:
            out = self.experts(xs, plan.kept_counts)
            out = out * weights[:, None].to(out.dtype)
        return self.combine(flat, token, out, r, plan, (B, T))

    def route(self, x, token_ids=None, task_ids=None):
        """Route x [batch, seq, d_model] and sort its (token, expert) assignments by expert.

        Returns flat [N, d] (x as rows), the router output, the dispatch plan, and for each kept assignment in
        expert order: the token it serves [M], its combine weight [M] and its input row xs [M, d].
        The capacity applies in training mode only; in eval mode every assignment is kept.
        """
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        r = self.router(flat, *_flat_ids(token_ids, task_ids, B, T))
        k = r.experts.shape[1]
        plan = dispatch(r.experts, self.n_experts, self.capacity(B * T * k) if self.training else None)
        token = plan.order // k                                   # [M] which token each kept assignment serves
        weights = r.weights.reshape(-1)[plan.order]               # [M] their combine weights
        # index_select, not flat[token]: its backward is one index_add_, not a serial accumulating index_put_
        return flat, r, plan, token, weights, flat.index_select(0, token)

    def combine(self, flat, token, out, r, plan, shape) -> torch.Tensor:
        """Add each token's k expert results onto the shared experts' output (or zeros), and record the
        routing statistics of this forward (its load counts towards the next bias update in training)."""
        y = self.shared(flat) if self.shared is not None else flat.new_zeros(flat.shape, dtype=out.dtype)
        y = y.to(out.dtype).index_add_(0, token, out)
        counts = plan.counts.detach()
        self.last_tokens_per_expert, self.last_router_output, self.last_dispatch = counts, r, plan
        self.last_shape = tuple(shape)
        if self.training:
            self.pending_load = counts if self.pending_load is None else self.pending_load + counts
        return y.view(*shape, flat.shape[1])

    def stats(self) -> dict:
        """Routing statistics of the last forward (see `routing_stats`)."""
        if self.last_router_output is None:
            raise RuntimeError("stats() needs a forward pass first")
        return routing_stats(self.last_router_output, self.last_dispatch)

    def balance_loss(self, aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                     seq_aux_loss_coef: float = 0.0) -> torch.Tensor:
        """The weighted balancing losses of the last forward (a differentiable scalar; 0 if all coefs are 0)."""
        r = self.last_router_output
        if r is None:
            raise RuntimeError("balance_loss() needs a forward pass first")
        loss = r.scores.new_zeros(())
        if aux_loss_coef:
            loss = loss + aux_loss_coef * switch_balance_loss(r.scores, r.experts, self.n_experts)
        if z_loss_coef:
            loss = loss + z_loss_coef * router_z_loss(r.logits)
        if seq_aux_loss_coef:
            loss = loss + seq_aux_loss_coef * sequence_balance_loss(r.scores, r.experts, self.n_experts,
                                                                    *self.last_shape)
        return loss

    @torch.no_grad()
    def finish_step(self, bias_update_speed: float = 0.0) -> torch.Tensor | None:
        """End of an optimizer step: return the load summed since the last call, and reset it.

        With a DeepSeekRouter and bias_update_speed > 0, first move the router's bias towards balance
        (auxiliary-loss-free balancing). Under torch.distributed the load is summed over all ranks first,
        so every rank applies the same update and the biases stay identical.
        """
        load, self.pending_load = self.pending_load, None
        if load is None:
            return None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            load = load.clone()
            torch.distributed.all_reduce(load)
        if bias_update_speed and isinstance(self.router, DeepSeekRouter):
            self.router.update_bias(load, bias_update_speed)
        return load


def max_violation(load) -> float:
    """MaxVio = (max load - mean load) / mean load (arXiv 2408.15664): 0 when perfectly balanced."""
    load = torch.as_tensor(load, dtype=torch.float64)
    mean = float(load.mean())
    return (float(load.max()) - mean) / mean if mean > 0 else 0.0


def build_router(cfg) -> nn.Module:
    """The router a ModelConfig names (cfg.router), sized from its MoE fields."""
    precision = cfg.router_precision
    if cfg.router == "softmax":
        return SoftmaxTopKRouter(cfg.d_model, cfg.n_experts, cfg.top_k, norm_topk_prob=cfg.norm_topk_prob,
                                 precision=precision)
    if cfg.router == "deepseek":
        return DeepSeekRouter(cfg.d_model, cfg.n_experts, cfg.top_k, n_group=cfg.n_group, topk_group=cfg.topk_group,
                              routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob,
                              precision=precision)
    if cfg.router == "hash":
        return HashRouter(cfg.n_experts, cfg.top_k, cfg.vocab_size, seed=cfg.hash_seed)
    if cfg.router == "task":
        return TaskRouter(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.n_tasks, norm_topk_prob=cfg.norm_topk_prob,
                          precision=precision)
    raise ValueError(f"unknown router {cfg.router!r}")


def build_moe(cfg) -> MoE:
    """The MoE layer of a ModelConfig with n_experts > 0.

    A config written by `MiniLM.extract_task` records its parent's expert count in extra["from_n_experts"];
    the capacity keeps dividing by it, so the extracted model drops what the parent drops.
    """
    return MoE(cfg.d_model, cfg.moe_d_ff, build_router(cfg), cfg.n_experts, cfg.n_shared_experts,
               cfg.capacity_factor, capacity_n_experts=cfg.extra.get("from_n_experts"))


def _flat_ids(token_ids, task_ids, B: int, T: int):
    """[batch, seq] token ids and [batch] or [batch, seq] task ids -> [N] each (None stays None)."""
    if token_ids is not None:
        token_ids = token_ids.reshape(-1)
    if task_ids is not None:
        task_ids = torch.as_tensor(task_ids)
        if task_ids.dim() == 1 and task_ids.numel() == B:
            task_ids = task_ids[:, None].expand(B, T)  # one task per sequence
        task_ids = task_ids.reshape(-1)
    return token_ids, task_ids


@torch.no_grad()
def routing_stats(r: RouterOutput, plan: Dispatch) -> dict:
    """Load and confidence of one routing decision, as plain python numbers.

    max_vio = (max load - mean load) / mean load (the "MaxVio" of arXiv 2408.15664): 0 when perfectly
    balanced. router_entropy: mean over tokens of the entropy of scores / sum(scores), in nats.
    """
    total = float(plan.counts.sum())
    p = r.scores.float() / r.scores.float().sum(-1, keepdim=True).clamp_min(1e-30)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return {
        "tokens_per_expert": plan.counts.tolist(),
        "max_vio": max_violation(plan.counts),
        "dropped_fraction": 1.0 - plan.order.numel() / total if total > 0 else 0.0,
        "router_entropy": float(entropy.mean()) if entropy.numel() else 0.0,
    }


# ---- balancing losses ----------------------------------------------------------------------------

def switch_balance_loss(scores: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E * sum_i f_i * P_i   (Switch Transformer, Fedus et al. 2021, eq. 4).

    f_i: fraction of the N*k assignments that went to expert i (no gradient); P_i: mean over tokens of
    scores[:, i] / sum(scores) (a no-op for softmax scores; sigmoid affinities are normalised per token as in
    DeepSeek-V3 eq. 19). Its minimum, 1, is reached by perfectly uniform routing.
    """
    f = torch.bincount(experts.reshape(-1), minlength=n_experts).float() / max(experts.numel(), 1)
    s = scores.float()
    return n_experts * (f * (s / s.sum(-1, keepdim=True)).mean(0)).sum()


def pooled_balance_loss(scores: list[torch.Tensor], experts: list[torch.Tensor], n_experts: int) -> torch.Tensor:
    """The Switch loss of all MoE layers at once: transformers' `load_balancing_loss_func` (Mixtral, Qwen3-MoE).

    scores / experts: one [N, E] / [N, k] tensor per MoE layer. With the N*L rows of the L layers pooled,
    f_i = (assignments to expert i) / (N L)  (summing to k, not 1) and  P_i = mean over the N*L rows of
    scores[:, i] / sum(scores);  the loss is  E * sum_i f_i P_i  (k for perfectly uniform routing).
    A product of pooled means, so it is neither the sum of the per-layer `switch_balance_loss`es (which a
    model with aux_loss_pooling="per_layer" adds up, about L / k times this) nor their mean; for one layer it
    is k times `switch_balance_loss`. transformers recomputes the top-k from softmax(logits): for a softmax
    router that is `experts`, its actual choice. It also weights rows by an attention mask when given one;
    minimoe has no padding mask, so every row counts.
    """
    if len(scores) != len(experts) or not scores:
        raise ValueError(f"scores and experts must hold one tensor per MoE layer (at least one), got "
                         f"{len(scores)} and {len(experts)}")
    rows = sum(s.shape[0] for s in scores)
    counts = sum(torch.bincount(e.reshape(-1), minlength=n_experts) for e in experts).float()
    probs = sum((s.float() / s.float().sum(-1, keepdim=True)).sum(0) for s in scores)
    return n_experts * ((counts / max(rows, 1)) * (probs / max(rows, 1))).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2   (ST-MoE, Zoph et al. 2022, eq. 5): keeps logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def sequence_balance_loss(scores: torch.Tensor, experts: torch.Tensor, n_experts: int, batch: int,
                          seq: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437, eq. 17-20), without alpha.

    Per sequence of T tokens:  sum_i f_i P_i  with  f_i = E / (k T) * #{t: i chosen for t}  and
    P_i = 1/T sum_t s'_{i,t},  s' = scores normalised to sum to 1 per token. Averaged over the batch;
    1 when every sequence spreads its tokens and its affinity evenly. scores: [batch*seq, E], experts:
    [batch*seq, k].
    """
    if scores.shape[0] != batch * seq or experts.shape[0] != batch * seq:
        raise ValueError(f"scores and experts must have batch*seq = {batch * seq} rows, got "
                         f"{scores.shape[0]} and {experts.shape[0]}")
    k = experts.shape[1]
    s = scores.float()
    p = (s / s.sum(-1, keepdim=True)).view(batch, seq, n_experts).mean(1)               # [B, E]
    hits = F.one_hot(experts.reshape(batch, seq * k), n_experts).sum(1).float()          # [B, E]
    f = hits * n_experts / (k * seq)
    return (f * p).sum(-1).mean()


# ---- the oracle ----------------------------------------------------------------------------------

def dense_reference(moe: MoE, x, token_ids=None, task_ids=None) -> torch.Tensor:
    """What `MoE.forward` must compute, by brute force: every expert on every token.

    Builds the [N, E] combine matrix from the router output (0 for unchosen experts and, in training mode,
    for assignments beyond capacity), then y = sum_e C[:, e] * expert_e(x), plus the shared experts. An
    assignment's place in its expert's queue is counted independently of `dispatch`, with one-hot sums:
    every assignment of an earlier slot, plus the same slot's assignments of earlier tokens (GShard's
    priority). O(N * E) work: for tests only.
    """
    B, T, d = x.shape
    N, E = B * T, moe.n_experts
    flat = x.reshape(N, d)
    r = moe.router(flat, *_flat_ids(token_ids, task_ids, B, T))
    k = r.experts.shape[1]
    weights = r.weights
    capacity = moe.capacity(N * k) if moe.training else None
    if capacity is not None:
        onehot = F.one_hot(r.experts, E)                                  # [N, k, E]
        per_slot = onehot.sum(0)                                          # [k, E] each slot's load
        ahead = (per_slot.cumsum(0) - per_slot) + (onehot.cumsum(0) - onehot)  # earlier slots + earlier tokens
        rank = ahead.gather(2, r.experts[..., None])[..., 0]              # [N, k] place in the expert's queue
        weights = weights * (rank < capacity)
    combine = weights.new_zeros(N, E).scatter_add(1, r.experts, weights)
    gate, up = torch.einsum("nd,edf->enf", flat, moe.experts.w_gate_up).chunk(2, dim=-1)
    every = torch.einsum("enf,efd->end", F.silu(gate) * up, moe.experts.w_down)  # [E, N, d]
    y = torch.einsum("ne,end->nd", combine.to(every.dtype), every)
    if moe.shared is not None:
        y = y + moe.shared(flat)
    return y.view(B, T, d)


# ---- validation ----------------------------------------------------------------------------------

def _check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_top_k(top_k: int, n_experts: int) -> None:
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} cannot exceed n_experts={n_experts}")


def _check_ids(name: str, ids, n_tokens: int, limit_name: str, limit: int, who: str) -> torch.Tensor:
    """ids (any shape holding one id per token) -> [N], or a ValueError naming `name`."""
    if ids is None:
        raise ValueError(f"{who} needs {name} (one id for each of the N tokens)")
    ids = ids.reshape(-1)
    if ids.numel() != n_tokens:
        raise ValueError(f"{name} has {ids.numel()} entries for {n_tokens} tokens")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        raise ValueError(f"{name} must lie in [0, {limit_name}={limit})")
    return ids
