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
