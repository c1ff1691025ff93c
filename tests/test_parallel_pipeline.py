"""Pipeline parallelism (minimoe.parallel.pipeline): GPipe and 1F1B against the single-process model.

Two multi-process runs (2 and 3 ranks, gloo on the CPU) carry every distributed check; the bubble, the split
and the single-stage path are checked in this process.
"""
from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure

from minimoe.config import ModelConfig
from minimoe.model import MiniLM
from minimoe.parallel import launch
from minimoe.parallel.pipeline import (PipelineStage, bubble_fraction, gpipe, ideal_bubble, measure_bubble,
                                       one_f_one_b, plot_timeline, stage_layers, verify)

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)


def _runs(config: dict, runs: list, bubble: bool = False) -> list[dict]:
    """Several verify() runs in one launch (each launch costs a few seconds of process start-up), and
    optionally a bubble measurement."""
    out = [verify(config, n_micro=m, schedule=s) for s, m in runs]
    return out + [measure_bubble(config, micro_counts=(1, 3), micro_batch_size=1, repeats=1)] if bubble else out


def _check(result: dict):
    assert result["loss_err"] < 1e-5, result
    assert result["grad_err"] < 1e-4, result
    assert result["next_loss_err"] < 1e-5, result
    assert result["next_loss"] < result["loss"]                      # the SGD step did something
    assert result["p2p_bytes"] == result["predicted_p2p_bytes"], result


def test_two_stages_gpipe_and_1f1b_match_one_process():
    runs = [("gpipe", 4), ("1f1b", 4)]
    ranks = launch.run(_runs, 2, TINY, runs, bubble=True)  # tied embeddings (the default): all_reduce of the head
    bubbles = [per_rank.pop() for per_rank in ranks]
    for b in bubbles:
        assert b["ideal"] == {1: 0.5, 3: 0.25}
        assert all(0 <= v < 1 for v in b["bubble"].values()) and set(b["timelines"]) == {1, 3}
        assert len(b["timelines"][3]) == 2 and len(b["timelines"][3][1]) == 6   # 2 stages; 3 F + 3 B each
        assert b["bubble"][3] == pytest.approx(bubble_fraction(b["timelines"][3]))
    assert bubbles[0]["bubble"] == bubbles[1]["bubble"]                       # gathered: every rank agrees
    for r, per_rank in enumerate(ranks):
        gp, ofob = per_rank
        for res in per_rank:
            _check(res)
        assert gp["layers"] == [r] and ofob["layers"] == [r]
        assert gp["peak_activations"] == 4                            # GPipe holds all m micro-batches
        assert ofob["peak_activations"] == 2 - r                      # 1F1B: at most p - rank
        assert "all_reduce" in gp["comm_by_op"]                       # the tied embedding's gradient sum
        assert len(ofob["timeline"]) == 8 and {k for k, *_ in ofob["timeline"]} == {"F", "B"}
    for res in ranks[0]:
        assert res["loss"] == pytest.approx(ranks[1][0]["loss"], abs=1e-6)  # every rank reports the loss
    total = sum(per_rank[1]["p2p_bytes"] for per_rank in ranks)
    assert total == ranks[0][1]["predicted_total_p2p_bytes"] == 2 * 4 * 1 * (2 * 16 * 32 * 4)
    # 1F1B on stage 0 of 2: F0 F1 B0 F2 B1 F3 B2 B3
    assert [f"{k}{i}" for k, i, *_ in ranks[0][1]["timeline"]] == "F0 F1 B0 F2 B1 F3 B2 B3".split()


def test_three_stages_including_fewer_micro_batches_than_stages():
    config = dict(TINY, n_layers=3, tie_embeddings=False)
    runs = [("gpipe", 4), ("1f1b", 4), ("1f1b", 2)]
    ranks = launch.run(_runs, 3, config, runs)
    for r, (gp, ofob, short) in enumerate(ranks):
        for res in (gp, ofob, short):
            _check(res)
            assert "all_reduce" not in res["comm_by_op"]                  # untied: nothing but send/recv
        assert gp["layers"] == [r]
        assert gp["peak_activations"] == 4 and ofob["peak_activations"] == 3 - r
        assert short["peak_activations"] == min(3 - r, 2)                # warm-up capped at m
    assert sum(per_rank[1]["p2p_bytes"] for per_rank in ranks) == 2 * 4 * 2 * (2 * 16 * 32 * 4)
    # 1F1B on stage 0 of 3: two warm-up forwards, then one forward and one backward, then the rest
    assert [f"{k}{i}" for k, i, *_ in ranks[0][1]["timeline"]] == "F0 F1 F2 B0 F3 B1 B2 B3".split()


def test_single_stage_needs_no_processes():
    cfg = ModelConfig(**TINY)
    torch.manual_seed(0)
    model = MiniLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (4, 16))
    y = torch.randint(0, cfg.vocab_size, (4, 16))
    y[0, :5] = -100  # ignored targets: the loss is still the mean over the batch's counted tokens
    ref = model(x, y).loss
    ref.backward()
    for schedule in (gpipe, one_f_one_b):
        stage = PipelineStage.from_model(model, 0, 1)
        assert stage.embed.weight is stage.lm_head.weight                # still tied
        out = schedule(stage, list(x.chunk(4)), list(y.chunk(4)))
        assert out["loss"] == pytest.approx(float(ref.detach()), abs=1e-5)
        grads = dict(model.named_parameters())
        for name, p in stage.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-4, rtol=0)


def test_split_names_and_errors():
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    model = MiniLM(ModelConfig(**dict(TINY, n_layers=3, tie_embeddings=False)))
    names = [n for r in range(2) for n, _ in PipelineStage.from_model(model, r, 2).named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # a partition of the model
    with pytest.raises(ValueError, match="n_layers=2"):
        PipelineStage.from_model(MiniLM(ModelConfig(**TINY)), 0, 4)
    with pytest.raises(ValueError, match="rank"):
        PipelineStage.from_model(model, 2, 2)
    moe = MiniLM(ModelConfig(**dict(TINY, n_experts=4, top_k=2)))
    with pytest.raises(NotImplementedError, match="Mixture-of-Experts"):
        PipelineStage.from_model(moe, 0, 2)


def _ideal_gpipe_timeline(p: int, m: int, tf: float = 1.0, tb: float = 2.0) -> list[list]:
    """GPipe with every forward taking tf and every backward tb: stage r starts F_i at (r + i) tf, and the
    backwards run from the last stage down once the last forward is done."""
    end_f = (m + p - 1) * tf
    return [[("F", i, (r + i) * tf, (r + i + 1) * tf) for i in range(m)]
            + [("B", i, end_f + (p - 1 - r + i) * tb, end_f + (p - r + i) * tb) for i in range(m)]
            for r in range(p)]


def test_bubble_fraction_of_synthetic_timelines():
    # p = 2, m = 1, by hand: 4 busy units of 6 slots (2 stages x makespan 3)
    hand = [[("F", 0, 0.0, 1.0), ("B", 0, 2.0, 3.0)], [("F", 0, 1.0, 2.0), ("B", 0, 1.5, 2.0)]]
    assert bubble_fraction(hand) == pytest.approx(1 - 3.5 / 6)
    for p, m in [(2, 1), (2, 4), (4, 4), (4, 8), (3, 16)]:
        assert bubble_fraction(_ideal_gpipe_timeline(p, m)) == pytest.approx(ideal_bubble(p, m))
    shifted = [[(k, i, s + 100.0, e + 100.0) for k, i, s, e in tl] for tl in _ideal_gpipe_timeline(4, 4)]
    assert bubble_fraction(shifted) == pytest.approx(3 / 7)           # only differences of times matter


def test_ideal_bubble():
    assert ideal_bubble(1, 8) == 0.0
    assert ideal_bubble(2, 1) == 0.5
    assert ideal_bubble(4, 4) == pytest.approx(3 / 7)
    assert ideal_bubble(2, 8) == pytest.approx(1 / 9)
    with pytest.raises(ValueError):
        ideal_bubble(2, 0)


def test_plot_timeline():
    ax = Figure().subplots()
    assert plot_timeline(_ideal_gpipe_timeline(2, 3), ax=ax) is ax
    assert len(ax.patches) == 2 * 2 * 3
    assert "bubble" in ax.get_title()
