"""Expert parallelism against the single-process MoE: two launches (2 and 4 processes) hold every check.
The 4-process one trains dp 2 x ep 2 for three steps with its groups taken from the plan's device mesh."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from minimoe.config import ModelConfig
from minimoe.moe import build_moe
from minimoe.parallel import expert, launch
from minimoe.parallel.comm import count_collectives
from minimoe.parallel.plan import ParallelPlan

TINY = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=16, n_experts=4, top_k=2, moe_d_ff=16,
            n_shared_experts=1, router="softmax", first_dense_layers=0)
DEEPSEEK = dict(TINY, n_experts=8, router="deepseek", n_group=4, topk_group=2, routed_scaling_factor=2.0,
                bias_update_speed=1e-2, z_loss_coef=1e-3, seq_aux_loss_coef=1e-2)


def _all_to_all_check() -> dict:
    """Rank 0 holds 3 rows and sends [1, 2] of them to ranks [0, 1]; rank 1 holds 4 and sends [3, 1]."""
    rank = dist.get_rank()
    n, splits_in = ((3, [1, 2]), (4, [3, 1]))[rank]
    splits_out = ([1, 3], [2, 1])[rank]
    x = (100.0 * rank + torch.arange(n, dtype=torch.float32))[:, None].repeat(1, 2).requires_grad_()
    with count_collectives() as log:
        out = expert.AllToAll.apply(x, splits_out, splits_in, None)
        scale = (rank + 1) * torch.arange(1, out.shape[0] + 1, dtype=torch.float32)  # output row i of rank r
        (out * scale[:, None]).sum().backward()
    return {"out": out.detach()[:, 0].tolist(), "grad": x.grad[:, 0].tolist(), "bytes": log.by_op()}


def _same_input_check(config: dict) -> dict:
    """Every rank feeds the SAME tokens: the expert-parallel layer must return MoE's output and statistics."""
    cfg = ModelConfig.from_dict(config)
    torch.manual_seed(0)
    moe = build_moe(cfg)
    ep = expert.ExpertParallelMoE.from_moe(moe)
    x = torch.randn(2, 8, cfg.d_model, generator=torch.Generator().manual_seed(1))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = moe(x1), ep(x2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    lo, n = ep.first_expert, ep.n_local
    # both ranks fed the same tokens, so each expert's gradient is the sum of two identical contributions
    return {
        "y_err": float((y1 - y2).detach().abs().max()), "x_grad_err": float((x1.grad - x2.grad).abs().max()),
        "expert_grad_err": float((2 * moe.experts.w_down.grad[lo:lo + n] - ep.experts.w_down.grad).abs().max()),
        "stats_equal": moe.stats() == ep.stats(),
        "counts_equal": bool(torch.equal(moe.last_tokens_per_expert, ep.last_tokens_per_expert)),
        "is_moe": isinstance(ep, type(moe)), "n_local": n, "first_expert": lo,
    }


def _refusal(f) -> str | None:
    try:
        f()
    except ValueError as e:
        return str(e)
    return None


def _two_ranks() -> dict:
    bad = _refusal(lambda: expert.ExpertParallelMoE.from_moe(build_moe(ModelConfig.from_dict(dict(TINY, n_experts=3)))))
    tp_mesh = ParallelPlan(tp=2).mesh()
    return {
        "tp_refused": _refusal(lambda: expert.parallelize_moe(build_moe(ModelConfig.from_dict(TINY)), tp_mesh)),
        "a2a": _all_to_all_check(),
        "same_input": {name: _same_input_check(c) for name, c in (
            ("softmax", TINY), ("capacity", dict(TINY, capacity_factor=0.75)), ("deepseek", DEEPSEEK))},
        "indivisible": bad,
        "verify": expert.verify(ModelConfig(**TINY).to_dict()),
    }


@pytest.fixture(scope="module")
def two():
    return launch.run(_two_ranks, 2)


@pytest.fixture(scope="module")
def four():
    return launch.run(expert.verify_2d, 4, ModelConfig(**DEEPSEEK).to_dict(), steps=3, timeout=300.0)


def test_all_to_all_uneven_forward_and_backward(two):
    r0, r1 = (r["a2a"] for r in two)
    assert r0["out"] == [0.0, 100.0, 101.0, 102.0] and r1["out"] == [1.0, 2.0, 103.0]
    # each input row's gradient is the scale of the output row it became: rank r's output row i has (r+1)(i+1)
    assert r0["grad"] == [1.0, 2.0, 4.0] and r1["grad"] == [2.0, 3.0, 4.0, 6.0]
    # a rank pays for the rows it sends elsewhere, forward (2 and 3 rows) and backward (the reverse: 3 and 2)
    assert r0["bytes"]["all_to_all_single"] == (2 + 3) * 2 * 4
    assert r1["bytes"]["all_to_all_single"] == (3 + 2) * 2 * 4


def test_same_input_matches_moe(two):
    for rank, r in enumerate(two):
        for name, c in r["same_input"].items():
            assert c["is_moe"] and c["first_expert"] == rank * c["n_local"], name
            assert c["y_err"] < 1e-5 and c["x_grad_err"] < 1e-5 and c["expert_grad_err"] < 1e-5, (name, c)
            assert c["stats_equal"] and c["counts_equal"], name


def test_indivisible_experts_raise(two):
    assert all("n_experts=3" in r["indivisible"] for r in two)
    with pytest.raises(ValueError, match="n_experts"):  # before any process group exists
        expert.plan_for(dict(TINY, n_experts=4), ep=3)
    assert all("tp=2" in r["tp_refused"] for r in two)  # this file composes ep with dp only


def _check_verify(results, world):
    for r in results:
        assert r["routing_equal"], r["rank"]
        assert r["loss_err"] < 1e-5 and r["next_loss_err"] < 1e-5, r
        assert r["next_loss"] != pytest.approx(r["loss"], abs=1e-4)  # the step did move the model
        assert r["grad_err_replicated"] < 1e-4 and r["grad_err_experts"] < 1e-4, r
        assert r["max_vio"] == pytest.approx(r["ref_max_vio"]) and r["bias_err"] < 1e-7, r
        assert r["a2a_bytes"] == r["expected_a2a_bytes"] > 0, r
        assert r["a2a_calls"] == 5 * 2  # per MoE layer: counts, rows out, rows back; two reversed in backward
    assert len({round(r["loss"], 6) for r in results}) == 1  # every rank reports the same global loss
    assert [r["rank"] for r in results] == list(range(world))


def test_verify_expert_parallel_two_ranks(two):
    _check_verify([r["verify"] for r in two], 2)


def test_verify_2d_dp_by_ep(four):
    _check_verify(four, 4)
    assert [(r["coords"]["dp"], r["coords"]["ep"]) for r in four] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["bias_moved"] == pytest.approx(1e-2) for r in four)  # DeepSeek's bias did move, by gamma


def test_dp_by_ep_trains_through_the_plan_mesh(four):
    for r in four:
        dp, ep = r["coords"]["dp"], r["coords"]["ep"]
        # the groups come from ParallelPlan(dp=2, ep=2).mesh(): tokens travel inside a dp row, expert gradients
        # are averaged down an ep column, every other gradient over all four replicas
        assert r["groups"] == {"ep": [2 * dp, 2 * dp + 1], "dp": [ep, 2 + ep], "dp_ep": [0, 1, 2, 3]}, r
        assert len(r["losses"]) == len(r["ref_losses"]) == 3 + 1   # before each step, and after the last
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"])) < 1e-5, r
        assert r["max_grad_err"] < 1e-4 and r["weight_err"] < 1e-5 and r["final_bias_err"] < 1e-7, r
        assert r["routing_equal_all_steps"], r
        assert r["losses"][-1] < r["losses"][0] - 0.1  # three steps on one batch: it did train
