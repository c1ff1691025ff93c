"""Seed-group summaries of zoo runs (minimoe.studies) on three tiny recipes trained for the test."""
from __future__ import annotations

import pytest

import minimoe.data
from minimoe import studies, zoo

TINY_MODEL = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
TINY_TRAIN = dict(steps=4, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1, eval_every=2, eval_batches=2)


@pytest.fixture
def study(tmp_path, monkeypatch, tiny_data):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path))
    monkeypatch.setattr(minimoe.data, "builtin_splits", lambda *a, **k: tiny_data)
    names = zoo.seed_names("test-study")
    for seed, name in zip(zoo.SEEDS, names):
        zoo.register(zoo.Recipe(name, "", dict(TINY_MODEL), {**TINY_TRAIN, "seed": seed}))
    yield "test-study"
    for name in names:
        zoo.RECIPES.pop(name, None)


def test_curves_and_finals(study, tiny_data):
    runs = studies.seed_runs(study)
    assert len(runs) == len(zoo.SEEDS) == 3
    xs, ys = studies.curve(runs[0], "tokens")
    assert xs == [2 * 4 * 32, 4 * 4 * 32] and ys == [e["val_loss"] for e in runs[0].history["eval"]]
    fx, _ = studies.curve(runs[0], "flops")
    assert fx == [x * runs[0].model.flops_per_token(32) for x in xs]
    sx, _ = studies.curve(runs[0], "seconds")
    assert 0 < sx[0] < sx[1]
    with pytest.raises(ValueError, match="x must be"):
        studies.curve(runs[0], "hours")
    finals = studies.final_losses(study)
    assert finals == [r.history["eval"][-1]["val_loss"] for r in runs]
    assert len(set(finals)) == 3                                      # three seeds, three different runs
    by_domain = studies.final_losses(study, by_domain=True)
    assert set(by_domain) == set(tiny_data[1].domains) and all(len(v) == 3 for v in by_domain.values())


def test_training_table_uses_one_peak(study, monkeypatch):
    runs = studies.seed_runs(study)
    runs[1].history["throughput"]["peak_flops"] *= 2          # as if seed 1 had measured on an idle machine
    monkeypatch.setattr(studies, "seed_runs", lambda base: runs)
    peaks = [r.history["throughput"]["peak_flops"] for r in runs]
    assert len(set(peaks)) == 2
    (row,) = studies.training_table({study: "tiny"})
    assert row["model"] == "tiny" and row["seeds"] == 3 and row["peak_flops"] == max(peaks)
    assert row["total"] == row["active"] == runs[0].model.num_parameters()
    assert row["tokens"] == 4 * 4 * 32 and row["batch_tokens"] == 4 * 32
    assert row["schedule"] == "warm-up 1 + cosine"
    mfus = [r.history["throughput"]["model_flops_per_second"] / max(peaks) for r in runs]
    assert min(mfus) <= row["mfu"] <= max(mfus) and 0 < row["mfu"] < 1


def test_suite_scores_are_cached_beside_the_checkpoint(study, monkeypatch):
    from minimoe import evals
    calls = []

    def fake_suite(model, n, seed, k):
        calls.append(n)
        return {a: evals.AxisResult(a, 1.0, (0.5, 1.5), "accuracy", 0.3, (0.2, 0.4), n, 1 / k, "test") for a in
                evals.AXES}

    monkeypatch.setattr(evals, "evaluate_suite", fake_suite)
    first = studies.suite_scores(study, n=7)
    again = studies.suite_scores(study, n=7)
    assert calls == [7]                                   # the second call read the JSON
    assert again == first and set(first) == set(evals.AXES)
    assert list((zoo.path(study)).glob("evals-*-n7-k4-s0.json"))
    studies.suite_scores(study, n=8)
    assert calls == [7, 8]                                # other settings are another file
