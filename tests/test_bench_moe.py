"""`minimoe bench moe` at tiny sizes: the JSON schema, the transformers cross-check and the goal lines.

Nothing here asserts a time: the sizes are far too small for the numbers to mean anything.
"""
from __future__ import annotations

import json

import pytest
import torch
from test_cli import run  # main(argv) -> (exit status, stdout, stderr)

from minimoe import bench_moe
from minimoe.bench_moe import CONFIGS, build_minimoe, build_transformers, check_match, evaluate_goals

TINY = ["--tokens", "64", "--repeats", "1", "--device", "cpu"]
KEYS = {"config", "impl", "pass", "dtype", "ms", "ratio_vs_dense"}


def test_json_rows(capsys, monkeypatch):
    checked = []
    real_check = bench_moe.check_match
    monkeypatch.setattr(bench_moe, "check_match", lambda a, b, x: checked.append(real_check(a, b, x)))
    code, out, err = run(["bench", "moe", *TINY, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert list(doc) == ["rows"]
    rows = doc["rows"]
    assert all(set(r) == KEYS for r in rows)
    impls = ("minimoe", "transformers", "dense")  # the schema; transformers-grouped only on request
    expected = {(c, i, p, d) for c in CONFIGS for i in impls for p in ("fwd", "fwd+bwd") for d in ("fp32", "bf16")}
    assert {(r["config"], r["impl"], r["pass"], r["dtype"]) for r in rows} == expected
    for r in rows:
        assert r["ms"] > 0
        dense = next(d for d in rows if d["impl"] == "dense" and
                     (d["config"], d["pass"], d["dtype"]) == (r["config"], r["pass"], r["dtype"]))
        assert r["ratio_vs_dense"] == pytest.approx(r["ms"] / dense["ms"])
    # the transformers block of both configs was compared with minimoe before timing, and matched
    assert len(checked) == 2 and all(err <= bench_moe.MATCH_TOLERANCE for err in checked)


def test_table_and_goal_lines(capsys):
    code, out, err = run(["bench", "moe", *TINY, "--config", "e8-top2", "--dtype", "fp32", "--impl", "transformers"],
                         capsys)
    assert code == 0, err
    assert "| config | pass | dtype | impl | ms | vs dense |" in out
    assert "| e8-top2 | fwd+bwd | fp32 | minimoe |" in out
    assert "transformers-grouped" not in out
    goal_lines = [line for line in out.splitlines() if line.startswith("goal: ")]
    # measured here: e8 fp32 against dense, and "never slower than transformers"
    assert len(goal_lines) == 2
    assert all(line.endswith(")") and (": met (" in line or ": NOT met (" in line) for line in goal_lines)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_transformers_blocks_compute_the_same_function(name, impl):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    moe = build_minimoe(cfg)
    block = build_transformers(cfg, moe, impl)
    x = torch.randn(2, 16, cfg.d_model)
    assert check_match(moe, block, x) < 1e-5
    with torch.no_grad():
        block.experts.down_proj[0].mul_(1.5)  # a wrong weight must not pass unnoticed
    with pytest.raises(ValueError, match="does not compute"):
        check_match(moe, block, x)


def test_an_implementation_that_cannot_run_is_left_out():
    class Fails(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("grouped_mm: expected bf16\nmore detail")

    modules = {"minimoe": torch.nn.Linear(4, 4), "transformers-grouped": Fails(), "dense": torch.nn.Linear(4, 4)}
    x, grad = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    with pytest.warns(UserWarning, match="transformers-grouped left out .*expected bf16$"):
        ms = bench_moe._time_round_robin(modules, x, grad, "fwd+bwd", 2, 1, torch.device("cpu"))
    assert set(ms) == {"minimoe", "dense"} and all(t > 0 for t in ms.values())


def test_goals():
    def rows(ratio, mine_ms, theirs_ms):
        out = []
        for p in ("fwd", "fwd+bwd"):
            out += [{"config": "e64-top6-shared2", "impl": "minimoe", "pass": p, "dtype": "fp32", "ms": mine_ms,
                     "ratio_vs_dense": ratio},
                    {"config": "e64-top6-shared2", "impl": "transformers", "pass": p, "dtype": "fp32",
                     "ms": theirs_ms, "ratio_vs_dense": ratio * theirs_ms / mine_ms}]
        return out

    good = {g["goal"]: g for g in evaluate_goals(rows(1.3, 10.0, 18.0))}
    assert len(good) == 3 and all(g["met"] and g["goal_of_issue"] for g in good.values())
    bad = {g["goal"]: g for g in evaluate_goals(rows(1.4, 10.0, 15.0))}
    assert [g["met"] for g in bad.values()] == [False, False, True]
    assert evaluate_goals([]) == []


@pytest.mark.parametrize("argv, message", [
    (["--config", "e3-top9"], "e3-top9"),
    (["--dtype", "fp8"], "fp8"),
    (["--tokens", "0"], "'0'"),
    (["--impl", "dense"], "dense"),
])
def test_bad_arguments(argv, message, capsys):
    code, out, err = run(["bench", "moe", *argv], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_library_refuses_unknown_names():
    with pytest.raises(ValueError, match="e3"):
        bench_moe.bench_moe(configs=["e3"], tokens=8, repeats=1)
    with pytest.raises(ValueError, match="pass"):
        bench_moe.bench_moe(passes="fwd", tokens=8, repeats=1)


def test_help(capsys):
    code, out, _ = run(["bench", "moe", "--help"], capsys)
    assert code == 0 and out.startswith("usage: minimoe bench moe")
    for flag in ("--json", "--tokens", "--repeats", "--dtype", "--config", "--device", "--quick"):
        assert flag in out
