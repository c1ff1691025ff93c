"""The source article's `DynamicMoE` listing (claim A2), made to run with as few changes as possible.

The article (section 1.2) prints a "dynamic MoE" layer: gate -> softmax -> top-k -> capacity mask ->
aggregate. As printed it cannot run. `ArticleDynamicMoE` is that listing with only the changes needed to
run it, each one recorded in `FIXES` and marked `# FIX` in the code; everything else is kept, including
what makes it a poor mixture of experts:

- every expert runs on every token, so its cost grows with the number of experts, not with k;
- its capacity, int(capacity_factor * d_model / num_experts), depends on the model width and not on the
  number of tokens, so a large batch drops almost every assignment and a narrow model drops all of them;
- it aggregates with the 0/1 capacity mask, never with the routing weights, so the gate gets no gradient
  and can never learn to route.

Chapter 1 (book/01-architecture/02-dynamic-moe.ipynb) measures each of these against `minimoe.moe.MoE`.
The helpers below count what the listing computes (expert rows, FLOPs) and compare its capacity with the
token-based capacity of GShard (Lepikhin et al., 2020) and Switch (Fedus et al., 2021).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch  # FIX: the listing uses torch, nn and F without importing them
import torch.nn as nn
import torch.nn.functional as F

from .layers import SwiGLU
from .moe import MoE


class Fix(NamedTuple):
    """One change the listing needs before it runs (or before it computes anything but zeros)."""

    problem: str  # what the printed code does
    effect: str   # what happens when it is run as printed
    change: str   # what ArticleDynamicMoE does instead


FIXES: tuple[Fix, ...] = (
    Fix("`torch`, `nn` and `F` are used but never imported",
        "NameError at the first line", "import them"),
    Fix("`d_model` is read in `__init__` but defined nowhere",
        "NameError when the layer is built", "a constructor argument `d_model`"),
    Fix("`Expert()` is a class the article never defines",
        "NameError when the layer is built",
        "a SwiGLU feed-forward block `SwiGLU(d_model, d_ff)`, with a new argument `d_ff` (default 4 d_model)"),
    Fix("`self.k` is read in `forward` and `_create_mask` but never set",
        "AttributeError in `forward`", "a constructor argument `k` (default 2)"),
    Fix("`expert_outputs[exp_idx]` indexes a Python list with a tensor of N expert ids",
        "TypeError: only one-element tensors can index a list",
        "stack the outputs to [E, N, d_model] and take expert exp_idx[n]'s row n for each token n"),
    Fix("`_create_mask` leaves the capacity logic as a comment and returns zeros",
        "the layer runs but always outputs 0",
        "the most literal reading: each expert keeps the first `capacity` assignments in token order"),
)


class ArticleDynamicMoE(nn.Module):
    """The article's `DynamicMoE`, runnable; x: [N, d_model] -> [N, d_model].

    Kept as printed: the gate is a biased nn.Linear; routing weights are softmax(gate(x)); each token picks
    its top-k experts; capacity = int(capacity_factor * d_model / num_experts); every expert runs on every
    token; a token's output is the plain sum of its kept experts' outputs (mask 1 or 0, no routing weight).

    Changed (see `FIXES`): d_model, k and d_ff are arguments; `Expert` is `SwiGLU(d_model, d_ff)`; the list
    of expert outputs is stacked so a tensor can index it; `_create_mask` is implemented.
    Added for inspection only: `last_routing_weights`, `last_selected`, `last_mask` record the last forward.
    """

    def __init__(self, d_model: int, num_experts: int = 64, capacity_factor: float = 1.2, k: int = 2,
                 d_ff: int | None = None):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff  # FIX: the listing gives no expert size at all
        for name, value in (("d_model", d_model), ("num_experts", num_experts), ("k", k), ("d_ff", d_ff)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if k > num_experts:
            raise ValueError(f"k={k} cannot exceed num_experts={num_experts}")
        if not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0):
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
        self.k = k  # FIX: never set in the listing
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.experts = nn.ModuleList([SwiGLU(d_model, d_ff) for _ in range(num_experts)])  # FIX: Expert()
        self.gate = nn.Linear(d_model, num_experts)
        # as printed: from the model width, not from the number of tokens (see token_capacity)
        self.capacity = int(capacity_factor * (d_model / num_experts))
        self.last_routing_weights = self.last_selected = self.last_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, d_model] (the listing's indexing assumes one row per token) -> [N, d_model]."""
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x must be [N, d_model={self.d_model}], got {tuple(x.shape)}")
        logits = self.gate(x)
        routing_weights = F.softmax(logits, dim=-1)

        top_k = torch.topk(routing_weights, self.k)
        selected_experts = top_k.indices                                    # [N, k]

        mask = self._create_mask(selected_experts)                          # [N, k], 1 = kept

        # every expert on every token: E full passes, whatever k is
        expert_outputs = torch.stack([expert(x) for expert in self.experts])  # FIX: stack -> [E, N, d]

        output = torch.zeros_like(x)
        tokens = torch.arange(x.shape[0], device=x.device)
        for i in range(self.k):
            exp_idx = selected_experts[:, i]
            # FIX: [exp_idx, tokens] picks expert exp_idx[n]'s output for token n (was a list[tensor]).
            # The routing weight is not used: as printed, only the 0/1 mask multiplies the output.
            output += expert_outputs[exp_idx, tokens] * mask[:, i].unsqueeze(-1)

        self.last_routing_weights, self.last_selected, self.last_mask = routing_weights, selected_experts, mask
        return output

    def _create_mask(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: [N, k] chosen experts -> [N, k] float mask. FIX: the listing leaves this unimplemented.

        The most literal reading of "capacity control": walking the assignments in token order (token 0's
        k choices, then token 1's, ...), each expert accepts the first `self.capacity` and rejects the rest.
        """
        return capacity_mask(indices, self.num_experts, self.capacity).to(torch.float32)


# ---- what the listing costs and drops ----------------------------------------------------------

def capacity_mask(indices: torch.Tensor, n_experts: int, capacity: int | None) -> torch.Tensor:
    """indices: [N, k] -> [N, k] bool: True where the assignment is among its expert's first `capacity`.

    Assignments are taken in flat token order (token 0's k choices, then token 1's, ...): the literal reading
    of the listing that `ArticleDynamicMoE._create_mask` uses. It is not the rule of `minimoe.moe.dispatch`,
    which follows GShard and serves every token's first choice before any second choice; with k > 1 a token's
    second choice can take a place here that dispatch gives to a later token's first choice. How many
    assignments each expert keeps, min(load, capacity), is the same under both rules, so drop fractions agree.
    capacity=None keeps everything.
    """
    if capacity is None:
        return torch.ones_like(indices, dtype=torch.bool)
    flat = indices.reshape(-1)
    onehot = F.one_hot(flat, n_experts)                                 # [N*k, E]
    rank = (onehot.cumsum(0) - 1).gather(1, flat[:, None])[:, 0]        # earlier assignments to that expert
    return (rank < capacity).view_as(indices)


def article_capacity(d_model: int, num_experts: int, capacity_factor: float) -> int:
    """The listing's capacity: int(capacity_factor * d_model / num_experts), whatever the batch size."""
    return int(capacity_factor * (d_model / num_experts))


def token_capacity(n_tokens: int, num_experts: int, capacity_factor: float, k: int) -> int:
    """GShard / Switch capacity: ceil(capacity_factor * n_tokens * k / num_experts) assignments per expert.

    The mean load times a safety factor (Lepikhin et al., 2020; Fedus et al., 2021, section 2.2, where k=1);
    the same formula as `minimoe.moe.MoE.capacity`.
    """
    return math.ceil(capacity_factor * n_tokens * k / num_experts)


def swiglu_flops_per_row(d_model: int, d_ff: int) -> int:
    """FLOPs for one token through one SwiGLU expert: three d_model x d_ff matmuls, 2 FLOPs per multiply-add."""
    return 6 * d_model * d_ff


def expert_flops(n_tokens: int, d_model: int, d_ff: int, n_experts: int, k: int) -> dict[str, int]:
    """Forward FLOPs of the expert part of one layer (the gate, 2 N d E, is the same for both and left out).

    "article": every expert on every token, N * E rows; "sparse": each token through its k experts, N * k
    rows (dropless; dropping only lowers it).
    """
    per_row = swiglu_flops_per_row(d_model, d_ff)
    return {"article": n_tokens * n_experts * per_row, "sparse": n_tokens * k * per_row}


def count_expert_rows(layer: nn.Module, x: torch.Tensor) -> int:
    """Run one forward of `layer` on x and count the token rows its routed experts computed.

    layer: an ArticleDynamicMoE (x: [N, d_model]) or a minimoe.moe.MoE (x: [batch, seq, d_model]); the
    count comes from forward hooks on the experts, so it is what ran, not what a formula predicts.
    Shared experts of a MoE are not counted.
    """
    rows = [0]

    def hook(module, inputs, output):
        rows[0] += inputs[0].shape[0]

    if isinstance(layer, ArticleDynamicMoE):
        modules = list(layer.experts)
    elif isinstance(layer, MoE):
        modules = [layer.experts]  # GroupedExperts: one call on the N*k kept rows, grouped by expert
    else:
        raise TypeError(f"expected ArticleDynamicMoE or minimoe.moe.MoE, got {type(layer).__name__}")
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            layer(x)
    finally:
        for h in handles:
            h.remove()
    return rows[0]
