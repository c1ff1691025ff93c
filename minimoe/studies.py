"""Seed groups of zoo runs, summarised the way the book compares them.

A study names a recipe base (e.g. "mix-uniform"); its runs are that recipe trained with each of zoo.SEEDS.
Everything here reads the training histories the zoo cached, so a notebook that shows a comparison trains
nothing once the cache is warm.

    runs = seed_runs("moe-mixed")                    # ZooEntry per seed
    curve(runs[0], x="flops")                        # validation loss against training FLOPs
    final_losses("mix-t3", by_domain=True)           # {domain: [final loss per seed]}
"""
from __future__ import annotations

from . import zoo
from .report import mean_std
from .train import TrainConfig

X_AXES = {"tokens": "training tokens", "flops": "training FLOPs", "seconds": "training seconds (wall-clock)"}


def seed_runs(base: str, progress: bool = False) -> list["zoo.ZooEntry"]:
    """The zoo runs of `base` for every seed it is registered with, trained first where not cached."""
    zoo.recipe(base)  # an unknown name fails here, listing the known ones
    return [zoo.load(name, progress=progress) for name in zoo.seed_names(base) if name in zoo.RECIPES]


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


def training_table(bases: dict[str, str]) -> list[dict]:
    """The measured T4 table: one row per {recipe base: label}, over each base's seeds.

    Columns: total and active parameters, tokens trained, batch in tokens, schedule, tokens per second and MFU
    (mean and std over seeds). Every run records the matmul peak measured in its own process; a busy machine
    lowers that number, so the table divides every run's model FLOP/s by one peak, the highest any of its runs
    recorded, to compare the rows with one denominator.
    """
    runs = {base: seed_runs(base) for base in bases}
    peak = max(r.history["throughput"]["peak_flops"] for rs in runs.values() for r in rs)
    source = next(r.history["throughput"]["peak_source"] for rs in runs.values() for r in rs
                  if r.history["throughput"]["peak_flops"] == peak)
    rows = []
    for base, label in bases.items():
        rs = runs[base]
        model, h = rs[0].model, rs[0].history
        tc = TrainConfig.from_dict(h["train_config"])
        mfu = mean_std([r.history["throughput"]["model_flops_per_second"] / peak for r in rs])
        tps = mean_std([r.history["throughput"]["tokens_per_second"] for r in rs])
        rows.append({
            "model": label, "total": model.num_parameters(), "active": model.num_active_parameters(),
            "tokens": h["train"][-1]["tokens"], "batch_tokens": tc.tokens_per_step,
            "schedule": f"warm-up {tc.warmup_steps} + {tc.schedule}",
            "tokens_per_second": tps[0], "tokens_per_second_std": tps[1], "mfu": mfu[0], "mfu_std": mfu[1],
            "peak_flops": peak, "peak": source, "seeds": len(rs),
        })
    return rows


def suite_scores(name: str, n: int = 200, seed: int = 0, k: int = 4) -> dict:
    """minimoe.evals.evaluate_suite of the zoo model `name`, cached as JSON in zoo.results_dir(name) (a model's
    scores depend only on its weights and the suite's settings, so the book's second build reads them)."""
    import dataclasses
    import json

    from . import __version__
    from .evals import AxisResult, evaluate_suite
    from .evals.suite import SUITE_VERSION
    entry = zoo.load(name)
    path = zoo.results_dir(name) / f"evals-v{__version__}-suite{SUITE_VERSION}-n{n}-k{k}-s{seed}.json"
    if path.exists():
        return {axis: AxisResult(**{**d, "score_ci": tuple(d["score_ci"]), "value_ci": tuple(d["value_ci"])})
                for axis, d in json.loads(path.read_text()).items()}
    results = evaluate_suite(entry.model, n=n, seed=seed, k=k)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({axis: dataclasses.asdict(r) for axis, r in results.items()}))
    tmp.replace(path)
    return results
