"""`minimoe bench moe`: one Mixture-of-Experts layer against a dense SwiGLU of the same active FLOPs, and
against the MoE blocks of Hugging Face transformers computing the same function with the same weights.

Every time is the median of `repeats` runs after warm-up, and every ratio divides two times measured in the
same process, round-robin (one run of each implementation in turn), so a busy machine slows them alike:

    ratio_vs_dense = ms(implementation) / ms(dense SwiGLU)      same config, pass and dtype

The dense baseline does the routed experts' active work in one matmul pair: SwiGLU(d, k * d_ff + shared
width). "fwd" is an inference forward (no autograd graph); "fwd+bwd" is a forward and a backward from a fixed
random output gradient, with gradients for the input and all weights. "bf16" runs weights and activations in
bfloat16 (module.to(bfloat16)), the way a model loaded in bf16 runs.

The transformers blocks (`MixtralSparseMoeBlock`, `DeepseekV3MoE`) get the minimoe layer's weights, and their
outputs are checked against minimoe's in fp32 before anything is timed, so both sides compute the same thing.
transformers 5 dispatches its experts to one of several implementations:

    transformers          the block as built from its config alone: the per-expert Python loop ("eager")
    transformers-grouped  "grouped_mm", what a transformers model (PreTrainedModel) picks by default
"""
from __future__ import annotations

import copy
import statistics
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .device import Timer, resolve_device, tune_cpu_allocator
from .layers import SwiGLU
from .moe import DeepSeekRouter, MoE, SoftmaxTopKRouter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("minimoe", "transformers", "transformers-grouped", "dense")
DEFAULT_IMPLS = ("transformers",)  # besides minimoe and dense; "transformers-grouped" on request (--impl)
_EXPERTS_IMPLEMENTATION = {"transformers": "eager", "transformers-grouped": "grouped_mm"}
# the largest |difference| allowed between minimoe's and transformers' fp32 outputs, relative to max |output|
MATCH_TOLERANCE = 1e-4


@dataclass(frozen=True)
class MoEBenchConfig:
    """One MoE layer shape. router: "softmax" (Mixtral-style top-k) or "deepseek" (sigmoid, DeepSeek-V3)."""
    name: str
    n_experts: int
    top_k: int
    d_ff: int
    n_shared_experts: int = 0
    router: str = "softmax"
    d_model: int = 512
    routed_scaling_factor: float = 1.0

    @property
    def dense_d_ff(self) -> int:
        """Width of the dense SwiGLU doing the same active FLOPs: k routed experts plus the shared ones."""
        return (self.top_k + self.n_shared_experts) * self.d_ff


CONFIGS = {
    # Mixtral-style: 8 experts, softmax top-2
    "e8-top2": MoEBenchConfig("e8-top2", n_experts=8, top_k=2, d_ff=1024),
    # DeepSeek-style fine-grained experts: 64 narrow experts, top-6, 2 shared experts, sigmoid router
    "e64-top6-shared2": MoEBenchConfig("e64-top6-shared2", n_experts=64, top_k=6, d_ff=128, n_shared_experts=2,
                                       router="deepseek", routed_scaling_factor=2.5),
}


@dataclass(frozen=True)
class Goal:
    """A target the benchmark checks, on minimoe's rows of `config` (None: every config) and pass and dtype
    (None: every one measured). against="dense": ratio_vs_dense <= bound; against a transformers impl:
    ms(that impl) / ms(minimoe) >= bound. of_issue=False marks a comparison printed for context only."""
    config: str | None
    against: str
    bound: float
    pass_: str | None = None
    dtype: str | None = None
    of_issue: bool = True


GOALS = (
    Goal("e8-top2", "dense", 1.0, "fwd+bwd", "fp32"),
    Goal("e8-top2", "dense", 1.15, "fwd+bwd", "bf16"),
    Goal("e64-top6-shared2", "dense", 1.35, "fwd+bwd", "fp32"),
    Goal("e64-top6-shared2", "dense", 2.0, "fwd+bwd", "bf16"),
    Goal("e64-top6-shared2", "transformers", 1.7),
    Goal(None, "transformers", 1.0),
    Goal("e64-top6-shared2", "transformers-grouped", 1.7, of_issue=False),
    Goal(None, "transformers-grouped", 1.0, of_issue=False),
)


def build_minimoe(cfg: MoEBenchConfig) -> MoE:
    """The minimoe MoE layer of a config, freshly initialised (seed the generator first for fixed weights)."""
    if cfg.router == "softmax":
        router = SoftmaxTopKRouter(cfg.d_model, cfg.n_experts, cfg.top_k)
    elif cfg.router == "deepseek":
        router = DeepSeekRouter(cfg.d_model, cfg.n_experts, cfg.top_k,
                                routed_scaling_factor=cfg.routed_scaling_factor)
    else:
        raise ValueError(f"unknown router {cfg.router!r}")
    return MoE(cfg.d_model, cfg.d_ff, router, cfg.n_experts, n_shared_experts=cfg.n_shared_experts)


def build_transformers(cfg: MoEBenchConfig, moe: MoE, experts_implementation: str = "eager") -> nn.Module:
    """The transformers block computing what `moe` computes, holding copies of its weights.

    transformers 5 stores the experts stacked and transposed against minimoe: gate_up_proj [E, 2f, d] with
    the gate rows first, down_proj [E, d, f].
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError("the transformers comparison needs the interop extra (pip install 'minimoe[interop]'); "
                         "or time minimoe alone with --impl minimoe") from None
    if cfg.router == "softmax":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        hf_cfg = MixtralConfig(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_local_experts=cfg.n_experts,
                               num_experts_per_tok=cfg.top_k, experts_implementation=experts_implementation)
        block = MixtralSparseMoeBlock(hf_cfg)
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
        hf_cfg = DeepseekV3Config(hidden_size=cfg.d_model, n_routed_experts=cfg.n_experts,
                                  num_experts_per_tok=cfg.top_k, n_shared_experts=cfg.n_shared_experts,
                                  moe_intermediate_size=cfg.d_ff, n_group=1, topk_group=1, norm_topk_prob=True,
                                  routed_scaling_factor=cfg.routed_scaling_factor,
                                  experts_implementation=experts_implementation)
        block = DeepseekV3MoE(hf_cfg)
    block = block.to(moe.experts.w_gate_up.device)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.gate.weight)
        if cfg.router == "deepseek":
            block.gate.e_score_correction_bias.copy_(moe.router.bias)
        block.experts.gate_up_proj.copy_(moe.experts.w_gate_up.transpose(1, 2))
        block.experts.down_proj.copy_(moe.experts.w_down.transpose(1, 2))
        if cfg.n_shared_experts:
            width = cfg.n_shared_experts * cfg.d_ff
            block.shared_experts.gate_proj.weight.copy_(moe.shared.gate_up.weight[:width])
            block.shared_experts.up_proj.weight.copy_(moe.shared.gate_up.weight[width:])
            block.shared_experts.down_proj.weight.copy_(moe.shared.down.weight)
    return block


def check_match(minimoe_layer: nn.Module, other: nn.Module, x: torch.Tensor,
                tolerance: float = MATCH_TOLERANCE) -> float:
    """max |y_minimoe - y_other| / max |y_minimoe| on x; raises ValueError when above tolerance."""
    with torch.no_grad():
        ref, out = _output(minimoe_layer(x)), _output(other(x))
    err = float((ref.float() - out.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))
    if not err <= tolerance:
        raise ValueError(f"{type(other).__name__} does not compute what minimoe's MoE computes: relative error "
                         f"{err:.2e} > {tolerance:.0e}")
    return err


def bench_moe(configs=tuple(CONFIGS), dtypes=("fp32", "bf16"), passes=PASSES, tokens: int = 4096,
              repeats: int = 5, warmup: int = 2, device="auto", impls=("minimoe", *DEFAULT_IMPLS, "dense"),
              seed: int = 0) -> list[dict]:
    """Median milliseconds of each implementation on each config, dtype and pass, with the ratio to dense.

    Returns rows {"config", "impl", "pass", "dtype", "ms", "ratio_vs_dense"}; "dense" is always measured, as
    every ratio needs it. Raises ValueError for unknown names, and when a transformers block's output does not
    match minimoe's. An implementation that cannot run a dtype on this device (transformers' grouped_mm wants
    bf16 on CUDA) is left out of that dtype's rows with a warning.
    """
    _check_choice("config", configs, CONFIGS)
    _check_choice("dtype", dtypes, DTYPES)
    _check_choice("pass", passes, PASSES)
    _check_choice("impl", impls, IMPLS)
    if tokens <= 0 or repeats <= 0 or warmup < 0:
        raise ValueError(f"need tokens > 0, repeats > 0 and warmup >= 0, got {tokens}, {repeats}, {warmup}")
    impls = [i for i in IMPLS if i in impls or i == "dense"]
    device = resolve_device(device)
    if device.type == "cpu":
        tune_cpu_allocator()
    rows = []
    for name in configs:
        cfg = CONFIGS[name]
        torch.manual_seed(seed)
        modules = {"minimoe": build_minimoe(cfg).to(device)}
        for impl in impls:
            if impl in _EXPERTS_IMPLEMENTATION:
                modules[impl] = build_transformers(cfg, modules["minimoe"], _EXPERTS_IMPLEMENTATION[impl])
        modules["dense"] = SwiGLU(cfg.d_model, cfg.dense_d_ff).to(device)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        x = torch.randn(1, tokens, cfg.d_model, device=device, generator=gen)
        grad = torch.randn(1, tokens, cfg.d_model, device=device, generator=gen)
        for impl in impls:
            if impl in _EXPERTS_IMPLEMENTATION:
                check_match(modules["minimoe"], modules[impl], x)
        for dtype in dtypes:
            # copies, so the fp32 weights stay fp32 whatever the order of dtypes
            typed = {impl: copy.deepcopy(modules[impl]).to(DTYPES[dtype]) for impl in impls}
            xd, gd = x.to(DTYPES[dtype]), grad.to(DTYPES[dtype])
            for pass_ in passes:
                ms = _time_round_robin(typed, xd, gd, pass_, repeats, warmup, device)
                rows += [{"config": name, "impl": impl, "pass": pass_, "dtype": dtype, "ms": t,
                          "ratio_vs_dense": t / ms["dense"]} for impl, t in ms.items()]
    return rows


def evaluate_goals(rows: list[dict], goals=GOALS) -> list[dict]:
    """{"goal", "met", "measured", "goal_of_issue"} for every goal whose rows were measured (a partial run skips
    the others). Against transformers, the worst speed-up over the selected rows counts."""
    out = []
    for g in goals:
        mine = [r for r in rows if r["impl"] == "minimoe" and g.config in (None, r["config"])
                and g.pass_ in (None, r["pass"]) and g.dtype in (None, r["dtype"])]
        where = " ".join(w for w in (g.config or "every config", g.pass_, g.dtype) if w)
        if g.against == "dense":
            if not mine:
                continue
            worst = max(mine, key=lambda r: r["ratio_vs_dense"])
            out.append({"goal": f"{where}: minimoe <= {g.bound:.2f}x dense", "goal_of_issue": g.of_issue,
                        "met": worst["ratio_vs_dense"] <= g.bound, "measured": f"{worst['ratio_vs_dense']:.2f}x"})
            continue
        speedups = []
        for r in mine:
            theirs = [t for t in rows if t["impl"] == g.against and
                      (t["config"], t["pass"], t["dtype"]) == (r["config"], r["pass"], r["dtype"])]
            speedups += [(t["ms"] / r["ms"], r) for t in theirs]
        if not speedups:
            continue
        worst, r = min(speedups, key=lambda s: s[0])
        at = f"{r['config']} {r['pass']} {r['dtype']}"
        out.append({"goal": f"{where}: minimoe >= {g.bound:.1f}x as fast as {g.against}", "goal_of_issue": g.of_issue,
                    "met": worst >= g.bound, "measured": f"{worst:.2f}x at worst, {at}"})
    return out


# ---- timing --------------------------------------------------------------------------------------

def _time_round_robin(modules: dict, x: torch.Tensor, grad: torch.Tensor, pass_: str, repeats: int, warmup: int,
                      device: torch.device) -> dict:
    """Median ms of each module; each round runs every module once, so slow phases hit all of them.

    A module other than "dense" whose first run raises a RuntimeError is left out (with a warning).
    """
    inputs = {impl: x.detach().clone().requires_grad_(pass_ == "fwd+bwd") for impl in modules}

    def run(impl):
        m, xi = modules[impl], inputs[impl]
        if pass_ == "fwd":
            with torch.no_grad():
                m(xi)
        else:
            _output(m(xi)).backward(grad)

    runnable = {}
    for impl, m in modules.items():
        try:
            run(impl)
            runnable[impl] = m
        except RuntimeError as e:
            if impl == "dense":
                raise
            warnings.warn(f"{impl} left out of {pass_} {x.dtype} on {device}: {str(e).splitlines()[0]}")
    times = {impl: [] for impl in runnable}
    for i in range(warmup + repeats):
        for impl, m in runnable.items():
            for p in (inputs[impl], *m.parameters()):
                p.grad = None  # a fresh gradient every run: no accumulation into the previous one
            with Timer(device) as t:
                run(impl)
            if i >= warmup:
                times[impl].append(t.seconds * 1e3)
    return {impl: statistics.median(ts) for impl, ts in times.items()}


def _output(result) -> torch.Tensor:
    """A layer's output tensor, whether it returns y or (y, extras)."""
    return result[0] if isinstance(result, tuple) else result


def _check_choice(what: str, chosen, allowed) -> None:
    if isinstance(chosen, str) or not chosen:
        raise ValueError(f"{what} must be a non-empty list of names from {', '.join(allowed)}, got {chosen!r}")
    for c in chosen:
        if c not in allowed:
            raise ValueError(f"unknown {what} {c!r}; choose from {', '.join(allowed)}")
