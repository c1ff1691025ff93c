"""A router explorer: how DeepSeek-V3's bias-only balancing spreads skewed tokens over the experts.

`simulate_routing` sends batches of synthetic, deliberately clustered token embeddings through a
`minimoe.moe.MoE` with a `DeepSeekRouter` and, between batches, moves the router's per-expert bias with
`update_bias` (auxiliary-loss-free balancing, Wang et al., 2024, arXiv 2408.15664; DeepSeek-V3, arXiv
2412.19437, section 2.1.2). No weight is trained: whatever balance appears comes from the bias alone.
`plot_routing` draws one run; `router_explorer` wraps both in ipywidgets sliders (chapter 1,
book/01-architecture/02-dynamic-moe.ipynb). ipywidgets is imported only inside `router_explorer`.
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from .moe import DeepSeekRouter, MoE, max_violation


@dataclass
class RoutingResult:
    """One `simulate_routing` run. Loads count assignments (a token with k experts adds k) before dropping."""

    n_experts: int
    top_k: int
    capacity_factor: float | None   # None = dropless
    bias_update_speed: float        # gamma of update_bias
    n_tokens: int                   # tokens per batch (one batch per step)
    capacity: int | None            # assignments one expert may keep per batch; None = dropless
    loads: np.ndarray               # [steps, E] assignments per expert at each step
    max_vio: np.ndarray             # [steps] (max load - mean load) / mean load
    dropped: np.ndarray             # [steps] fraction of the N*k assignments beyond capacity
    assignment: np.ndarray          # [N, k] expert ids chosen at the last step
    kept: np.ndarray                # [N, k] False where the last step dropped the assignment
    cluster: np.ndarray             # [N] cluster each token of the last batch was drawn from
    bias: np.ndarray                # [E] router bias after the last update


def simulate_routing(n_experts: int, top_k: int, capacity_factor: float | None, bias_update_speed: float,
                     n_tokens: int = 1024, steps: int = 60, skew: float = 3.0, n_clusters: int = 4,
                     d_model: int = 32, seed: int = 0) -> RoutingResult:
    """Route `steps` fresh batches of n_tokens skewed tokens; update the bias by bias_update_speed after each.

    Tokens: x = skew * c + noise, with c one of n_clusters random centres and noise ~ N(0, I) in d_model
    dimensions. Tokens of one cluster look alike, so a random gate sends them to the same few experts;
    skew=0 gives isotropic tokens. Each step: forward, read the loads from `moe.last_tokens_per_expert`,
    then `router.update_bias(loads, bias_update_speed)` (0 = no balancing). The layer routes in training
    mode, the only mode in which an MoE applies its capacity (eval mode is dropless), so the drops shown are
    those training would see. Deterministic for a seed, and the global torch random state is left untouched.
    """
    if not (isinstance(bias_update_speed, (int, float)) and bias_update_speed >= 0):
        raise ValueError(f"bias_update_speed must be a number >= 0, got {bias_update_speed!r}")
    for name, value in (("n_tokens", n_tokens), ("steps", steps), ("n_clusters", n_clusters)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = DeepSeekRouter(d_model, n_experts, top_k)  # validates n_experts, top_k, d_model
        moe = MoE(d_model, 4, router, n_experts, capacity_factor=capacity_factor)  # experts' output unused
    moe.train()  # capacity applies in training mode only: route as training does, drops included
    centres = torch.randn(n_clusters, d_model, generator=gen)
    capacity = moe.capacity(n_tokens * top_k)

    loads, max_vio, dropped = [], [], []
    with torch.no_grad():
        for step in range(steps):
            cluster = torch.randint(0, n_clusters, (n_tokens,), generator=gen)
            x = skew * centres[cluster] + torch.randn(n_tokens, d_model, generator=gen)
            moe(x[None])  # [1, N, d]; only the routing is needed, not the output
            load = moe.last_tokens_per_expert.detach().cpu().to(torch.float64)
            loads.append(load.numpy())
            max_vio.append(max_violation(load))
            dropped.append(moe.stats()["dropped_fraction"])
            router.update_bias(load, bias_update_speed)
    # the last batch's assignment, with the bias it was routed with
    experts = moe.last_router_output.experts  # [N, k]
    kept_flat = torch.zeros(experts.numel(), dtype=torch.bool)
    kept_flat[moe.last_dispatch.order] = True

    return RoutingResult(
        n_experts=n_experts, top_k=top_k, capacity_factor=capacity_factor,
        bias_update_speed=float(bias_update_speed), n_tokens=n_tokens, capacity=capacity,
        loads=np.stack(loads), max_vio=np.array(max_vio), dropped=np.array(dropped),
        assignment=experts.numpy(), kept=kept_flat.view_as(experts).numpy(), cluster=cluster.numpy(),
        bias=router.bias.detach().cpu().numpy().copy(),
    )


def plot_routing(result: RoutingResult, fig=None):
    """Three panels for one run: cluster x expert heatmap, final loads, MaxVio and drops over steps."""
    r = result
    if fig is None:
        fig = plt.figure(figsize=(14, 3.9), layout="constrained")
    ax_map, ax_load, ax_vio = fig.subplots(1, 3, width_ratios=[1.2, 1.2, 1])
    E, k = r.n_experts, r.top_k
    n_clusters = int(r.cluster.max()) + 1

    # where each cluster's assignments go, as a share of that cluster's N_c * k assignments
    share = np.zeros((n_clusters, E))
    np.add.at(share, (np.repeat(r.cluster, k), r.assignment.reshape(-1)), 1.0)
    share /= np.maximum(share.sum(1, keepdims=True), 1)
    im = ax_map.imshow(share, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    fig.colorbar(im, ax=ax_map, label="share of the cluster's assignments")
    ax_map.set_yticks(range(n_clusters))
    ax_map.set_xlabel("expert")
    ax_map.set_ylabel("token cluster")
    ax_map.set_title("where each cluster's tokens go (last step)")

    load = r.loads[-1]
    kept = load if r.capacity is None else np.minimum(load, r.capacity)
    ax_load.bar(np.arange(E), kept, width=0.85, color="C0", label="computed")
    ax_load.bar(np.arange(E), load - kept, width=0.85, bottom=kept, color="C3", label="dropped")
    ax_load.axhline(r.n_tokens * k / E, color="k", ls=":", label="mean load  N k / E")
    if r.capacity is not None:
        ax_load.axhline(r.capacity, color="C3", ls="--", label=f"capacity = {r.capacity}")
    top = max(load.max(), r.capacity or 0, r.n_tokens * k / E)
    ax_load.set_ylim(0, 1.35 * top)  # headroom for the legend above the bars
    ax_load.set_xlabel("expert")
    ax_load.set_ylabel("assignments (tokens) in the last batch")
    ax_load.set_title("load per expert (last step)")
    ax_load.legend(fontsize="small", ncol=2, loc="upper left")

    steps = np.arange(1, len(r.max_vio) + 1)
    ax_vio.plot(steps, r.max_vio, label="MaxVio")
    ax_vio.plot(steps, r.dropped, label="dropped fraction")
    ax_vio.set_ylim(bottom=0)
    ax_vio.set_xlabel("step (batches routed)")
    ax_vio.set_ylabel("ratio (dimensionless)")
    ax_vio.set_title("imbalance over steps")
    ax_vio.grid(alpha=0.3)
    ax_vio.legend(fontsize="small")

    cap = "dropless" if r.capacity_factor is None else f"capacity factor {r.capacity_factor:g}"
    fig.suptitle(f"{E} experts, top-{k}, {cap}, bias update speed \u03b3 = {r.bias_update_speed:g}")
    return fig


def router_explorer(n_tokens: int = 1024, steps: int = 60, skew: float = 3.0, seed: int = 0):
    """An ipywidgets panel: sliders for experts, k, capacity factor and bias speed; redraws `plot_routing`.

    Live only inside a running Jupyter kernel; a static page shows the first drawing at most.
    """
    import ipywidgets as w  # only here: minimoe itself never needs ipywidgets
    from IPython.display import display

    style = {"description_width": "initial"}
    n_experts = w.IntSlider(16, min=2, max=64, description="experts E", continuous_update=False, style=style)
    top_k = w.IntSlider(2, min=1, max=8, description="top-k", continuous_update=False, style=style)
    capacity = w.FloatSlider(1.25, min=0.25, max=4.0, step=0.05, description="capacity factor",
                             continuous_update=False, style=style)
    dropless = w.Checkbox(False, description="dropless (no capacity)", style=style)
    speed = w.FloatLogSlider(1e-2, base=10, min=-4, max=-0.5, step=0.25, description="bias speed \u03b3",
                             readout_format=".1e", continuous_update=False, style=style)
    balancing = w.Checkbox(True, description="bias balancing on (off: \u03b3 = 0)", style=style)

    def limit_k(change=None):
        top_k.max = min(8, n_experts.value)  # ipywidgets clamps the value to the new max

    n_experts.observe(limit_k, names="value")
    dropless.observe(lambda change: setattr(capacity, "disabled", change["new"]), names="value")
    balancing.observe(lambda change: setattr(speed, "disabled", not change["new"]), names="value")

    def draw(n_experts, top_k, capacity, dropless, speed, balancing):
        result = simulate_routing(n_experts, min(top_k, n_experts), None if dropless else capacity,
                                  speed if balancing else 0.0, n_tokens=n_tokens, steps=steps, skew=skew,
                                  seed=seed)
        fig = plot_routing(result)
        display(fig)
        plt.close(fig)  # displayed once, not again by the inline backend

    out = w.interactive_output(draw, {"n_experts": n_experts, "top_k": top_k, "capacity": capacity,
                                      "dropless": dropless, "speed": speed, "balancing": balancing})
    controls = w.VBox([w.HBox([n_experts, top_k]), w.HBox([capacity, dropless]), w.HBox([speed, balancing])])
    return w.VBox([controls, out])
