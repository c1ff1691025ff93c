"""Figures the notebooks share. Each function draws on a matplotlib Axes and returns it."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np


def _ax(ax):
    return ax if ax is not None else plt.subplots(figsize=(7, 4))[1]


def plot_training(history: dict, ax=None, label: str = "", smooth: int = 20):
    """Training loss (moving average over `smooth` steps) and validation loss, in bits per byte, against tokens.

    Train loss is converted from nats per token with 1/ln 2; for byte-level tokens a token is a byte, up to
    the few special tokens, so both curves share the bits-per-byte axis.
    """
    ax = _ax(ax)
    tokens = np.array([r["tokens"] for r in history["train"]], dtype=float)
    loss = np.array([r["loss"] for r in history["train"]]) / math.log(2)
    if len(loss) >= smooth:
        kernel = np.ones(smooth) / smooth
        loss, tokens_s = np.convolve(loss, kernel, mode="valid"), tokens[smooth - 1:]
    else:
        tokens_s = tokens
    ax.plot(tokens_s / 1e6, loss, label=f"{label} train (moving avg. {smooth} steps)".strip())
    per_step = tokens[0] if len(tokens) else 0
    ev = history["eval"]
    ax.plot([e["step"] * per_step / 1e6 for e in ev], [e["val_bpb"] for e in ev], "o-",
            label=f"{label} validation".strip())
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (bits per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_decode(rows: list[dict], ax=None):
    """Tokens per second with and without the KV cache, one group of bars per batch size."""
    ax = _ax(ax)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["cached_tokens_per_s"] for r in rows], 0.4, label="KV cache")
    ax.bar(x + 0.2, [r["uncached_tokens_per_s"] for r in rows], 0.4, label="no cache (recompute all)")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['speedup']:.1f}x", (i - 0.2, r["cached_tokens_per_s"]), ha="center", va="bottom")
    ax.set_xticks(x, [f"batch {r['batch_size']}" for r in rows])
    ax.set_ylabel("generated tokens per second")
    ax.set_yscale("log")
    ax.legend()
    return ax


def plot_seed_bands(ax, groups: dict, xlabel: str, ylabel: str, logy: bool = False):
    """One line per group: the mean over seeds, with a band from the lowest to the highest seed.

    groups: {label: [(xs, ys) for each seed]}, every seed with the same number of points. Where the seeds' xs
    differ (wall-clock time does), the line is drawn at their mean.
    """
    for label, runs in groups.items():
        if len({len(x) for x, _ in runs}) != 1:
            raise ValueError(f"every seed of {label!r} needs the same number of points")
        xs = np.array([np.asarray(x, dtype=float) for x, _ in runs]).mean(0)
        ys = np.array([np.asarray(y, dtype=float) for _, y in runs])
        line, = ax.plot(xs, ys.mean(0), label=f"{label} (mean of {len(runs)} seeds)")
        ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
