"""Scenario measurements: retrieval items put the fact where asked, the grid reports truncation, latency
percentiles are ordered, and best_fit only names a model that wins beyond the uncertainty."""
import pytest
import torch

from minimoe import MiniLM, ModelConfig
from minimoe.evals import scenarios
from minimoe.evals.scenarios import Measure, best_fit


def _turns(prompt):
    return [line for line in prompt.split("\n") if line.startswith("User: ")]


@pytest.mark.parametrize("depth, index", [(0.0, 0), (0.5, 2), (1.0, 4)])
def test_fact_sits_at_the_requested_depth(depth, index):
    for item in scenarios.retrieval_items(20, fillers=4, depth=depth, seed=1):
        turns = _turns(item.prompt)
        assert len(turns) == 6  # 4 fillers + the fact + the question
        assert item.answer.strip() in turns[index]
        assert sum(item.answer.strip() in t for t in turns[:-1]) >= 1
        assert len(set(item.candidates)) == 4 and item.prompt.endswith(("live in", "colour is", "name is"))


def test_items_are_deterministic_and_validated():
    a = scenarios.retrieval_items(10, 2, 0.5, seed=3)
    assert a == scenarios.retrieval_items(10, 2, 0.5, seed=3) != scenarios.retrieval_items(10, 2, 0.5, seed=4)
    for bad in [dict(n=0), dict(fillers=-1), dict(depth=1.5), dict(k=1)]:
        with pytest.raises(ValueError):
            scenarios.retrieval_items(**{"n": 5, "fillers": 1, "depth": 0.0, **bad})


def _model(ctx):
    torch.manual_seed(0)
    return MiniLM(ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=ctx)).eval()


def test_grid_counts_prompts_past_the_context():
    rows = scenarios.retrieval_grid(_model(128), fillers=(0, 3), depths=(0.0, 1.0), n=20)
    assert [(r["fillers"], r["depth"]) for r in rows] == [(0, 0.0), (3, 0.0), (3, 1.0)]
    short, long_ = rows[0], rows[1]
    assert short["truncated"] == 0 and short["context_bytes"] < 128
    assert long_["truncated"] == 20 and long_["context_bytes"] > 128
    assert all(0 <= r["accuracy"] <= 1 and r["ci"][0] <= r["accuracy"] <= r["ci"][1] for r in rows)


def test_reply_latency_percentiles():
    r = scenarios.reply_latency(_model(128), n_replies=5, reply_tokens=4)
    both = scenarios.reply_latencies({"a": _model(128), "b": _model(64)}, n_replies=3, reply_tokens=4)
    assert set(both) == {"a", "b"} and both["b"]["prompt_bytes"] <= 60 < both["a"]["prompt_bytes"]
    assert r["n"] == 5 and 0 < r["p50_ms"] <= r["p95_ms"] and r["prompt_bytes"] <= 124
    with pytest.raises(ValueError):
        scenarios.reply_latency(_model(128), n_replies=0)


def test_best_fit_needs_a_clear_win():
    assert best_fit({"a": Measure(0.9, 0.85, 0.95), "b": Measure(0.5, 0.4, 0.6)}) == "a"
    assert best_fit({"a": Measure(0.9, 0.55, 0.95), "b": Measure(0.5, 0.4, 0.6)}) == "tie"
    fast, slow = Measure(30, 28, 32, higher_is_better=False), Measure(60, 55, 65, higher_is_better=False)
    assert best_fit({"dense": fast, "MoE": slow}) == "dense"
    assert best_fit({"only": fast}) == "only"
    with pytest.raises(ValueError):
        best_fit({})
