"""The cost model of chapter 5 (minimoe.bench): the article's formula D1, its table D2 recomputed, our models'
cost from measured throughput, and the ipywidgets calculator."""
from __future__ import annotations

import pytest
import torch

from minimoe import MiniLM, ModelConfig
from minimoe.bench import (ARTICLE_D2, article_d2_rows, cost_calculator, cost_per_million_tokens,
                           energy_cost_per_hour, implied_price_per_hour, model_costs)


def test_formula_by_hand():
    # $3.60 an hour at 1,000 tokens/s: 3.6 million tokens an hour, so $1 per million
    assert cost_per_million_tokens(3.6, 1000) == pytest.approx(1.0)
    assert cost_per_million_tokens(3.6, 1000, utilization=0.5) == pytest.approx(2.0)   # idle hours are paid too
    assert cost_per_million_tokens(3.6, 1000, power_factor=1.3) == pytest.approx(1.3)
    assert cost_per_million_tokens(7.2, 1000) == pytest.approx(2 * cost_per_million_tokens(3.6, 1000))


@pytest.mark.parametrize("util,pf", [(1.0, 1.0), (0.6, 1.0), (0.8, 1.4)])
def test_implied_price_inverts_the_formula(util, pf):
    for _, _, tps, cost in ARTICLE_D2:
        price = implied_price_per_hour(cost, tps, util, pf)
        assert cost_per_million_tokens(price, tps, util, pf) == pytest.approx(cost)


def test_article_d2_implied_prices():
    rows = {r["model"]: r for r in article_d2_rows()}
    # the outline's arithmetic: 0.12 x 3420 x 3600 / 1e6 = $1.48 per hour for eight A100s
    assert rows["DeepSeek"]["implied_price_per_hour"] == pytest.approx(0.12 * 3420 * 3600 / 1e6)
    assert round(rows["DeepSeek"]["implied_price_per_hour"], 2) == 1.48
    assert rows["DeepSeek"]["implied_price_per_gpu_hour"] == pytest.approx(1.47744 / 8)
    assert rows["GPT-4"]["gpus"] == 16 and rows["GPT-4"]["implied_price_per_gpu_hour"] < 0.12
    # a lower utilization implies a lower hourly price for the same cost per token
    half = {r["model"]: r for r in article_d2_rows(utilization=0.5)}
    assert half["Claude"]["implied_price_per_hour"] == pytest.approx(rows["Claude"]["implied_price_per_hour"] / 2)


def test_energy_cost():
    assert energy_cost_per_hour(400, 0.10) == pytest.approx(0.04)
    assert energy_cost_per_hour(400, 0.10, pue=1.5) == pytest.approx(0.06)
    with pytest.raises(ValueError, match="pue"):
        energy_cost_per_hour(400, 0.10, pue=0.9)


@pytest.mark.parametrize("kwargs,message", [
    (dict(price_per_hour=0, tokens_per_s=1), "price_per_hour must be a positive number"),
    (dict(price_per_hour=1, tokens_per_s=-5), "tokens_per_s must be a positive number"),
    (dict(price_per_hour=1, tokens_per_s=1, utilization=1.5), r"utilization .* in \(0, 1\]"),
    (dict(price_per_hour=1, tokens_per_s=1, utilization=0), "utilization must be a positive number"),
    (dict(price_per_hour=1, tokens_per_s=float("nan")), "tokens_per_s must be a positive number"),
    (dict(price_per_hour=1, tokens_per_s=1, power_factor=True), "power_factor must be a positive number"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cost_per_million_tokens(**kwargs)


def test_model_costs_from_measured_throughput():
    torch.manual_seed(0)
    model = MiniLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64)).eval()
    rows = model_costs({"tiny": model}, price_per_hour=0.5, batch_sizes=(1, 2), prompt_len=8, new_tokens=4,
                       repeats=1)
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["matches_generate"] and r["tokens_per_s"] > 0
        assert r["cost_per_million"] == pytest.approx(cost_per_million_tokens(0.5, r["tokens_per_s"]))
    with pytest.raises(ValueError, match="price_per_hour"):
        model_costs({"tiny": model}, price_per_hour=-1)


def test_calculator_updates():
    box = cost_calculator(price_per_hour=3.6, tokens_per_s=1000)
    price, tps, util, power, out = box.children
    assert "$1.0000 per million tokens" in out.value
    util.value = 0.5
    assert "$2.0000 per million tokens" in out.value
    tps.value = 2000
    assert "$1.0000 per million tokens" in out.value
