"""Measuring KV caches at decode time: FLOPs and cache bytes per step, decode-step and generation timers, the
memory bandwidth a step can hope for, and a switch to MLA's absorbed form for whole models
(chapter 1, "Latent attention: a smaller KV cache").

One decode step appends one token per sequence to a cache that already holds `past` positions and attends over
all S = past + 1 of them. What that costs depends on the attention kind:

    MHA / GQA:       reads 2 * n_kv_heads * head_dim numbers per position; ~2 * n_heads * head_dim * S mult-adds
    MLA, naive:      reads kv_lora_rank + qk_rope_head_dim numbers per position, then re-expands every cached
                     latent through W_ukv: S * kv_lora_rank * n_heads * (nope + v) mult-adds per step
    MLA, absorbed:   reads the same latent and attends on it directly (DeepSeek-V2, arXiv 2405.04434, sec. 2.1.2):
                     ~n_heads * (2 * kv_lora_rank + rope) * S mult-adds, no expansion
                     (`MultiHeadLatentAttention.forward_absorbed`)
"""
from __future__ import annotations

import contextlib
import statistics
from typing import Callable

import torch
import torch.nn as nn

from .attention import CausalSelfAttention, MultiHeadLatentAttention, kv_cache_bytes_per_token
from .config import ModelConfig
from .device import Timer, resolve_device
from .model import Cache


def decode_step_flops(cfg: ModelConfig, past: int, absorbed: bool = False) -> int:
    """FLOPs (2 per multiply-add) of one attention layer's decode step for one sequence, `past` cached positions.

    Counts every matmul of the layer: projections in and out, scores, the weighted sum and, for MLA, the
    per-step expansion of the cached latent (naive) or the absorption of W_uk / W_uv into query and output
    (absorbed). Element-wise work (softmax, rotary, norms) is left out. Equals what
    torch.utils.flop_counter.FlopCounterMode counts for `forward` / `forward_absorbed` (tests/test_kvcache.py).
    """
    if past < 0:
        raise ValueError(f"past must be >= 0, got {past}")
    d, H, S = cfg.d_model, cfg.n_heads, past + 1
    if cfg.attention != "mla":
        if absorbed:
            raise ValueError("absorbed=True applies to attention='mla' only")
        hd = cfg.head_dim
        projections = d * (H + 2 * cfg.n_kv_heads) * hd + H * hd * d
        return 2 * (projections + 2 * H * S * hd)
    r, nope, rope, v = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = d * H * (nope + rope) if cfg.q_lora_rank is None else cfg.q_lora_rank * (d + H * (nope + rope))
    projections = q + d * (r + rope) + H * v * d
    if absorbed:  # W_uk^T q_nope, scores on [c_kv | k_rope], weighted sum of c_kv, then W_uv
        return 2 * (projections + H * nope * r + H * S * (r + rope) + H * S * r + H * r * v)
    return 2 * (projections + S * r * H * (nope + v) + H * S * (nope + rope) + H * S * v)


def cache_bytes_read_per_step(cfg: ModelConfig, past: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one layer's cache that one decode step of one sequence must read: all S = past + 1 positions."""
    return (past + 1) * kv_cache_bytes_per_token(cfg, dtype) // cfg.n_layers


@contextlib.contextmanager
def absorbed_attention(model: nn.Module):
    """Inside the block every MLA layer of `model` computes `forward_absorbed`, so `model.generate` uses it.

    Yields the number of layers switched (0 for a model without MLA). Each layer's `forward` is restored on exit.
    """
    layers = [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)]
    for attn in layers:  # an instance attribute shadows the class's forward, and nn.Module.__call__ finds it
        attn.forward = attn.forward_absorbed
    try:
        yield len(layers)
    finally:
        for attn in layers:
            del attn.forward


def time_decode_step(attn: nn.Module, batch: int, past: int, step: Callable | None = None, repeats: int = 5,
                     device="cpu", seed: int = 0) -> dict:
    """Median time of one decode step of an attention layer: `batch` new tokens after `past` cached positions.

    The cache is filled with random numbers instead of a prefill (timing does not depend on the values, and a
    long prefill would cost far more than the steps) and rewound to `past` before every step, so each timed
    step sees the same context. step(x, cache) defaults to `attn.forward`; pass e.g. `attn.forward_absorbed`.
    Returns {"median_ms", "min_ms", "max_ms"} over `repeats` steps after one warm-up step.
    """
    device = resolve_device(device)
    if not isinstance(attn, (CausalSelfAttention, MultiHeadLatentAttention)):
        raise TypeError(f"time_decode_step needs a minimoe attention layer, got {type(attn).__name__}")
    if past + 1 > attn.rotary.cos.shape[0]:  # beyond its rotary table a layer would silently attend nothing
        raise ValueError(f"past + 1 = {past + 1} positions exceed the layer's max_seq_len={attn.rotary.cos.shape[0]}")
    step = step or attn.forward
    g = torch.Generator(device=device).manual_seed(seed)
    p = next(attn.parameters())
    cache = attn.new_cache(batch, past + 1, device, p.dtype)
    _fill_random(cache, g)
    x = torch.randn(batch, 1, attn.out.out_features, generator=g, device=device, dtype=p.dtype)  # d_model
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            cache.length = past
            with Timer(device) as t:
                step(x, cache)
            if i:  # the first step pays for allocation and kernel selection
                times.append(t.seconds * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def _fill_random(cache, generator: torch.Generator) -> None:
    """Fill every tensor of one layer's cache (KVCache or LatentKVCache) with standard normal numbers."""
    for buffer in vars(cache).values():
        if isinstance(buffer, torch.Tensor):
            buffer.normal_(generator=generator)


def time_model_step(model: nn.Module, batch: int, past: int, repeats: int = 5, seed: int = 0) -> dict:
    """Median time of one decode step of a whole MiniLM: `batch` new tokens after `past` cached positions.

    Like `time_decode_step`, but through every layer, the MLPs and the output head: the cache of every layer is
    filled with random numbers and rewound to `past` before each step. Returns {"median_ms", "min_ms",
    "max_ms"} over `repeats` steps after one warm-up step.
    """
    if past + 1 > model.config.max_seq_len:
        raise ValueError(f"past + 1 = {past + 1} positions exceed the model's max_seq_len={model.config.max_seq_len}")
    g = torch.Generator(device=model.device).manual_seed(seed)
    cache = Cache(model, batch, past + 1)
    for layer in cache.layers:
        _fill_random(layer, g)
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g, device=model.device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            for layer in cache.layers:
                layer.length = past
            with Timer(model.device) as t:
                model(tokens, cache=cache)
            if i:
                times.append(t.seconds * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def time_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int = 3) -> dict:
    """Median wall time of greedy `model.generate(prompt, new_tokens)` with the KV cache, over `repeats` runs.

    generate's first forward is the prompt's prefill and yields the first new token; each later token costs one
    decode step. So the prefill alone is timed too, as generate(prompt, 1), and a decode step is
    (median total - median prefill) / (new_tokens - 1). Only generated tokens count as throughput (the article's
    P2 counts the prompt too). Returns {"median_s", "prefill_s", "tokens_per_s", "decode_ms_per_step", "times_s"};
    a decode step produces one token for every sequence in the batch.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time a decode step, got {new_tokens}")
    model.generate(prompt[:, :8], 2)  # warm-up: first calls pay for allocation and kernel selection
    times, prefill = [], []
    for _ in range(repeats):
        for n, out in ((1, prefill), (new_tokens, times)):
            with Timer(model.device) as t:
                model.generate(prompt, n)
            out.append(t.seconds)
    median, prefill_s = statistics.median(times), statistics.median(prefill)
    return {"median_s": median, "prefill_s": prefill_s, "tokens_per_s": prompt.shape[0] * new_tokens / median,
            "decode_ms_per_step": 1e3 * max(median - prefill_s, 0.0) / (new_tokens - 1), "times_s": times}


def read_bandwidth(device="cpu", mbytes: int = 64, repeats: int = 5) -> float:
    """Bytes per second this device reads from memory: the best of `repeats` sums over a buffer of `mbytes` MiB.

    Big enough to spill out of CPU caches, so it is main-memory (or GPU HBM) bandwidth as one reduction sees it:
    what a decode step that streams its KV cache once can hope for, not the datasheet peak. The best run, like
    `device.matmul_peak`, so that a busy machine lowers it as little as possible.
    """
    device = resolve_device(device)
    buffer = torch.ones(mbytes * 2 ** 18, device=device)  # float32: 4 bytes each
    buffer.sum()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        with Timer(device) as t:
            buffer.sum()
        best = min(best, t.seconds)
    return buffer.numel() * buffer.element_size() / best
