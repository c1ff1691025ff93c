"""Scaling: validation loss against training compute, a power law per family, and how far it can be trusted.

Kaplan et al. (2020) and Hoffmann et al. (2022, "Chinchilla") found that a language model's loss falls as a power
of its training compute over many orders of magnitude. Here each family (dense, DeepSeekMoE) is trained at three
widths on the same tokens (``zoo.SCALING``), and for each family we fit

    L(C) = a * C ** -b            (least squares on log L against log C)

to the final validation bits per byte of every run. C counts the FLOPs of the *active* weights (forward and
backward), so an MoE and a dense model of equal active width have equal C. The uncertainty comes from the seeds:
each width has three runs, and ``bootstrap`` refits the law for every way of choosing one run per width (3**3 = 27
fits per family), which gives a spread for the exponent and for every prediction. Over a 9x range of compute a
power law with no loss floor fits almost anything; the notebook shows how fast that spread widens beyond the data.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from . import studies, zoo

LN2 = math.log(2)


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float  # the exponent: loss falls by a factor 2**-b for every doubling of compute

    def __call__(self, compute):
        return self.a * np.asarray(compute, dtype=float) ** -self.b


def fit_power_law(compute, loss) -> PowerLaw:
    """Least squares of log L = log a - b log C; needs two distinct compute values and positive numbers."""
    c, y = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    if c.shape != y.shape or c.ndim != 1 or len(set(c.tolist())) < 2:
        raise ValueError("need matching 1-D compute and loss with at least two distinct compute values")
    if (c <= 0).any() or (y <= 0).any():
        raise ValueError("compute and loss must be positive for a power law")
    slope, intercept = np.polyfit(np.log(c), np.log(y), 1)
    return PowerLaw(float(math.exp(intercept)), float(-slope))


def scaling_points(family: str) -> list[dict]:
    """One row per run of `family` in zoo.SCALING: width, run name, training FLOPs, final validation bpb."""
    if family not in zoo.SCALING:
        raise ValueError(f"family must be one of {list(zoo.SCALING)}, got {family!r}")
    rows = []
    for width, base in zoo.SCALING[family].items():
        for run in studies.seed_runs(base):
            flops, loss = studies.curve(run, x="flops")
            rows.append({"family": family, "width": width, "run": run.name, "flops": flops[-1],
                         "bpb": loss[-1] / LN2, "active": run.model.num_active_parameters(),
                         "total": run.model.num_parameters(), "curve": (flops, [v / LN2 for v in loss])})
    return rows


def bootstrap(points: list[dict]) -> list[PowerLaw]:
    """A fit for every choice of one run per width (all combinations, not a random sample)."""
    by_width: dict[int, list[dict]] = {}
    for p in points:
        by_width.setdefault(p["width"], []).append(p)
    if len(by_width) < 2:
        raise ValueError("need runs at two or more widths")
    return [fit_power_law([p["flops"] for p in choice], [p["bpb"] for p in choice])
            for choice in itertools.product(*by_width.values())]


def quantiles(values, q=(0.025, 0.5, 0.975)) -> tuple[float, ...]:
    return tuple(float(v) for v in np.quantile(np.asarray(values, dtype=float), q))


def prediction_band(fits: list[PowerLaw], compute, q=(0.025, 0.5, 0.975)) -> np.ndarray:
    """[len(q), len(compute)]: quantiles over the bootstrap fits of the predicted loss at each compute."""
    preds = np.stack([f(compute) for f in fits])
    return np.quantile(preds, q, axis=0)


def moe_advantage(dense: list[PowerLaw], moe: list[PowerLaw], compute, q=(0.025, 0.5, 0.975)) -> np.ndarray:
    """Quantiles over all (dense fit, MoE fit) pairs of 1 - L_moe(C) / L_dense(C): the share of the dense loss
    that the MoE saves at equal compute (negative: the MoE is worse)."""
    d = np.stack([f(compute) for f in dense])[:, None, :]
    m = np.stack([f(compute) for f in moe])[None, :, :]
    return np.quantile((1 - m / d).reshape(-1, np.size(compute)), q, axis=0)
