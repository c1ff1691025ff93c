"""Benchmarks that print ratios measured in one run: training MFU against this machine's own matmul peak,
and the KV cache's decode speed-up.

MFU (model FLOPs utilization, PaLM appendix B) = achieved model FLOP/s / peak FLOP/s. The peak is not a
datasheet number: it is the best throughput of a plain square matmul in the same dtype, measured in the same
process just before and after the model is timed, so a busy or throttled machine moves both alike.
"""
from __future__ import annotations

import statistics
import time

import torch

from .config import ModelConfig
from .device import Timer, device_name, matmul_peak, resolve_device, synchronize, tune_cpu_allocator
from .model import MiniLM
from .train import TrainConfig, make_optimizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The model `minimoe bench` times by default: 6 layers x 384 wide (10.7M parameters), a size whose step is
# dominated by matmuls on a CPU yet fits a benchmark into seconds.
BENCH_MODEL = ModelConfig(d_model=384, n_layers=6, n_heads=6, max_seq_len=256)


def bench_train(config: ModelConfig, batch_size: int = 16, seq_len: int = 256, precision: str = "fp32",
                steps: int = 6, warmup: int = 2, device="auto", seed: int = 0) -> dict:
    """Time full training steps (forward, backward, clip, AdamW) on random tokens; median step time -> MFU."""
    device = resolve_device(device)
    if device.type == "cpu":
        tune_cpu_allocator()
    torch.manual_seed(seed)
    model = MiniLM(config).to(device)
    opt = make_optimizer(model, TrainConfig(device=str(device)))
    x = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x, targets=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    peak_before = matmul_peak(DTYPES[precision], device)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        with Timer(device) as t:
            step()
        times.append(t.seconds)
    peak = max(peak_before, matmul_peak(DTYPES[precision], device))
    step_s = statistics.median(times)
    tokens = batch_size * seq_len
    achieved = model.flops_per_token(seq_len) * tokens / step_s
    return {"precision": precision, "params": model.num_parameters(), "tokens_per_step": tokens,
            "step_ms": step_s * 1e3, "step_ms_spread": (max(times) - min(times)) * 1e3,
            "tokens_per_s": tokens / step_s, "model_tflops": achieved / 1e12,
            "peak_tflops": peak / 1e12, "mfu": achieved / peak, "device": device_name(device)}


def bench_decode(model: MiniLM, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 128,
                 repeats: int = 3, seed: int = 0) -> dict:
    """Greedy generation with and without the KV cache; median of `repeats` runs each."""
    device = model.device
    if device.type == "cpu":
        tune_cpu_allocator()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (batch_size, prompt_len), generator=g).to(device)
    result = {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens}
    outputs = {}
    for use_cache in (True, False):
        model.generate(prompt[:, :8], 4, use_cache=use_cache)  # warm-up
        times = []
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            outputs[use_cache] = model.generate(prompt, new_tokens, use_cache=use_cache)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        key = "cached" if use_cache else "uncached"
        result[f"{key}_s"] = statistics.median(times)
        # only generated tokens count as decode throughput, never the prompt (the article's P2 counts both)
        result[f"{key}_tokens_per_s"] = batch_size * new_tokens / result[f"{key}_s"]
    result["speedup"] = result["uncached_s"] / result["cached_s"]
    result["same_tokens"] = bool(torch.equal(outputs[True], outputs[False]))
    return result


# ---- the cost model: the article's formula D1 and its table D2 (chapter 5) ------------------------------------

SECONDS_PER_HOUR = 3600

# The source article, section 5, table D2 (unsourced): (model, GPUs, tokens/s, dollars per million tokens).
ARTICLE_D2 = (
    ("DeepSeek", 8, 3420, 0.12),
    ("GPT-4", 16, 2850, 0.18),
    ("Claude", 12, 2380, 0.21),
    ("PaLM-2", 8, 3150, 0.15),
)


def _check_positive(**values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
            raise ValueError(f"{name} must be a positive number, got {v!r}")


def _check_utilization(utilization) -> None:
    _check_positive(utilization=utilization)
    if utilization > 1:
        raise ValueError(f"utilization is the fraction of paid time spent serving, in (0, 1]; got {utilization}")


def cost_per_million_tokens(price_per_hour: float, tokens_per_s: float, utilization: float = 1.0,
                            power_factor: float = 1.0) -> float:
    """The article's formula D1, in dollars per million generated tokens:

        cost = price_per_hour / (tokens_per_s * 3600 * utilization) * power_factor * 10^6

    price_per_hour: what the hardware costs per hour, busy or idle. tokens_per_s: its measured throughput while
    serving. utilization: the fraction of paid hours it serves at that rate (0.5 = idle half the time, so each
    token carries twice the price). power_factor: a multiplier for costs the price leaves out (electricity,
    cooling); 1 = none. The article gives neither utilization nor power factor for its table.
    """
    _check_positive(price_per_hour=price_per_hour, tokens_per_s=tokens_per_s, power_factor=power_factor)
    _check_utilization(utilization)
    return price_per_hour / (tokens_per_s * SECONDS_PER_HOUR * utilization) * power_factor * 1e6


def implied_price_per_hour(cost_per_million: float, tokens_per_s: float, utilization: float = 1.0,
                           power_factor: float = 1.0) -> float:
    """D1 solved for the hardware's hourly price: the price that a cost per million tokens implies."""
    _check_positive(cost_per_million=cost_per_million, tokens_per_s=tokens_per_s, power_factor=power_factor)
    _check_utilization(utilization)
    return cost_per_million * tokens_per_s * SECONDS_PER_HOUR * utilization / (power_factor * 1e6)


def energy_cost_per_hour(watts: float, price_per_kwh: float, pue: float = 1.0) -> float:
    """Dollars per hour of electricity for hardware drawing `watts`, with the data centre's overhead factor pue
    (power usage effectiveness, >= 1): a cost to add to the hourly price, rather than a factor on all of it."""
    _check_positive(watts=watts, price_per_kwh=price_per_kwh, pue=pue)
    if pue < 1:
        raise ValueError(f"pue (total facility power / IT power) is >= 1, got {pue}")
    return watts / 1000 * pue * price_per_kwh


def article_d2_rows(utilization: float = 1.0, power_factor: float = 1.0) -> list[dict]:
    """The article's table D2 recomputed from its own inputs: the hourly price each row implies.

    For each row: price_per_hour = implied_price_per_hour(cost, tokens/s, utilization, power_factor), that
    price per GPU, and the tokens per dollar. A lower utilization implies a *lower* price for the same cost
    (the idle hours must be paid from the same dollars).
    """
    rows = []
    for model, gpus, tps, cost in ARTICLE_D2:
        price = implied_price_per_hour(cost, tps, utilization, power_factor)
        rows.append({"model": model, "gpus": gpus, "tokens_per_s": tps, "cost_per_million": cost,
                     "implied_price_per_hour": price, "implied_price_per_gpu_hour": price / gpus,
                     "tokens_per_s_per_gpu": tps / gpus, "million_tokens_per_dollar": 1 / cost})
    return rows


def model_costs(models: dict, price_per_hour: float, batch_sizes=(1, 8), utilization: float = 1.0,
                power_factor: float = 1.0, prompt_len: int = 64, new_tokens: int = 64, repeats: int = 3) -> list[dict]:
    """Cost per million tokens of our own models from their measured decode throughput.

    models: {label: MiniLM} (each on the device to time it on). For each batch size, bench_infer.benchmark
    measures decode tokens/s (generated tokens only, median of `repeats`), and D1 turns it into dollars per
    million tokens at `price_per_hour` for the machine the model runs on.
    """
    from .bench_infer import benchmark  # bench_infer imports this module
    _check_positive(price_per_hour=price_per_hour)
    rows = []
    for label, model in models.items():
        for b in batch_sizes:
            r = benchmark(model, b, prompt_len, new_tokens, repeats=repeats)
            tps = r["decode_tokens_per_s"]
            rows.append({"model": label, "batch_size": b, "device": r["device"], "tokens_per_s": tps,
                         "tokens_per_s_min": r["decode_tokens_per_s_min"],
                         "tokens_per_s_max": r["decode_tokens_per_s_max"],
                         "cost_per_million": cost_per_million_tokens(price_per_hour, tps, utilization, power_factor),
                         "matches_generate": r["matches_generate"]})
    return rows


def cost_calculator(price_per_hour: float = 10.0, tokens_per_s: float = 3420.0, utilization: float = 1.0,
                    power_factor: float = 1.0):
    """An ipywidgets calculator for D1: sliders in, dollars per million tokens and tokens per dollar out."""
    import ipywidgets as w
    style = {"description_width": "150px"}
    price = w.BoundedFloatText(value=price_per_hour, min=0.001, max=1e6, step=0.5,
                               description="price ($ per hour)", style=style)
    tps = w.BoundedFloatText(value=tokens_per_s, min=0.001, max=1e9, step=10, description="throughput (tokens/s)",
                             style=style)
    util = w.FloatSlider(value=utilization, min=0.05, max=1.0, step=0.05, description="utilization", style=style)
    power = w.FloatSlider(value=power_factor, min=1.0, max=3.0, step=0.05, description="power factor", style=style)
    out = w.HTML()

    def update(_=None):
        try:
            c = cost_per_million_tokens(price.value, tps.value, util.value, power.value)
            out.value = (f"<b>${c:,.4f} per million tokens</b> ({1e6 / c:,.0f} tokens per dollar; "
                         f"{tps.value * SECONDS_PER_HOUR * util.value / 1e6:,.2f} million tokens per paid hour)")
        except ValueError as e:
            out.value = f"<span style='color:#b00'>{e}</span>"
    for widget in (price, tps, util, power):
        widget.observe(update, names="value")
    update()
    return w.VBox([price, tps, util, power, out])
