"""Seed groups of zoo runs, summarised the way the book compares them.

A study names a recipe base (e.g. "mix-uniform"); its runs are that recipe trained with each of zoo.SEEDS.
Everything here reads the training histories the zoo cached, so a notebook that shows a comparison trains
nothing once the cache is warm.

    runs = seed_runs("dense-matched")                # ZooEntry per seed
    curve(runs[0], x="flops")                        # validation loss against training FLOPs
    final_losses("mix-t3", by_domain=True)           # {domain: [final loss per seed]}
"""
from __future__ import annotations

from . import zoo
from .report import mean_std
from .train import TrainConfig

X_AXES = {"tokens": "training tokens", "flops": "training FLOPs", "seconds": "training seconds (wall-clock)"}


def seed_runs(base: str, progress: bool = False) -> list["zoo.ZooEntry"]:
    """The zoo runs of `base` for every seed, trained first where not cached."""
    return [zoo.load(name, progress=progress) for name in zoo.seed_names(base)]


def curve(run: "zoo.ZooEntry", x: str = "tokens", y: str = "val_loss") -> tuple[list[float], list[float]]:
    """(xs, ys) at each validation point of a run; x is "tokens", "flops" (MiniLM.flops_per_token: forward and
    backward, active weights only) or "seconds" (training time, evaluation excluded)."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {list(X_AXES)}, got {x!r}")
    h = run.history
    train_rows = {r["step"]: r for r in h["train"]}
    seq_len = h["train_config"]["seq_len"]
    xs = []
    for e in h["eval"]:
        row = train_rows[e["step"]]
        if x == "tokens":
            xs.append(float(row["tokens"]))
        elif x == "flops":
            xs.append(float(row["tokens"]) * run.model.flops_per_token(seq_len))
        else:
            xs.append(float(row["seconds"]))
    return xs, [float(e[y]) for e in h["eval"]]


def final_losses(base: str, by_domain: bool = False, key: str = "val_loss"):
    """Final validation loss of each seed of `base`: a list, or {domain: list} with by_domain=True."""
    finals = [run.history["eval"][-1] for run in seed_runs(base)]
    if not by_domain:
        return [e[key] for e in finals]
    domains = finals[0]["val_loss_by_domain"]
    return {d: [e["val_loss_by_domain"][d] for e in finals] for d in domains}


def training_row(base: str, label: str | None = None) -> dict:
    """One row of the measured T4 table for `base` over its seeds: sizes, tokens, batch, schedule and MFU."""
    runs = seed_runs(base)
    model, h = runs[0].model, runs[0].history
    tc = h["train_config"]
    mfu = mean_std([r.history["throughput"]["mfu"] for r in runs])
    tps = mean_std([r.history["throughput"]["tokens_per_second"] for r in runs])
    return {
        "model": label or base,
        "total": model.num_parameters(),
        "active": model.num_active_parameters(),
        "tokens": h["train"][-1]["tokens"],
        "batch_tokens": TrainConfig.from_dict(tc).tokens_per_step,
        "schedule": f"warm-up {tc['warmup_steps']} + {tc['schedule']}",
        "mfu": mfu[0], "mfu_std": mfu[1],
        "tokens_per_second": tps[0],
        "peak": h["throughput"]["peak_source"],
        "seeds": len(runs),
    }
