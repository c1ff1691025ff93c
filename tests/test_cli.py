"""The `minimoe` command, run in-process through minimoe.cli.main (plus one real `python -m minimoe.cli`)."""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minimoe.bench
import minimoe.data
from minimoe import zoo
from minimoe.checkpoint import load_checkpoint, verify_checkpoint
from minimoe.cli import main
from minimoe.sample import sample_text

REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr); argparse's SystemExit counts as an exit status."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def text_files(tmp_path, text_makers):
    """Two small text files: one ends up training, the other validation."""
    make_code, make_prose = text_makers
    a, b = tmp_path / "code.py", tmp_path / "notes.txt"
    a.write_text(make_code(seed=7, n_bytes=4000))
    b.write_text(make_prose(seed=8, n_bytes=2000))
    return a, b


TINY_ARGS = ["--d-model", 32, "--n-layers", 2, "--n-heads", 2, "--max-seq-len", 32, "--seq-len", 32,
             "--batch-size", 4, "--device", "cpu", "--quiet"]


# -----------------------------------------------------------------------------
# help


@pytest.mark.parametrize("argv", [
    [], ["train"], ["generate"], ["zoo"], ["zoo", "list"], ["zoo", "train"], ["zoo", "verify"], ["zoo", "path"],
    ["bench"], ["bench", "train"], ["bench", "decode"],
])
def test_help(argv, capsys):
    code, out, err = run([*argv, "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: " + " ".join(["minimoe", *argv]))
    assert err == ""


def test_help_lists_subcommands(capsys):
    _, out, _ = run(["--help"], capsys)
    for name in ("train", "generate", "zoo", "bench"):
        assert name in out
    _, out, _ = run(["zoo", "--help"], capsys)
    for name in ("list", "train", "verify", "path"):
        assert name in out


def test_module_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MINIMOE_CACHE": str(tmp_path)}
    ok = subprocess.run([sys.executable, "-m", "minimoe.cli", "--help"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("usage: minimoe")
    bad = subprocess.run([sys.executable, "-m", "minimoe.cli", "train"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "error" in bad.stderr and "--out" in bad.stderr


# -----------------------------------------------------------------------------
# bad arguments: exit status 2 and exactly one line on stderr


def _bad(tmp_path, text_files):
    out = tmp_path / "ck"
    a, b = text_files
    return {
        "no command": ([], "COMMAND"),
        "unknown command": (["frobnicate"], "frobnicate"),
        "train without --out": (["train"], "--out"),
        "steps 0": (["train", "--out", out, "--steps", "0"], "'0'"),
        "steps abc": (["train", "--out", out, "--steps", "abc"], "'abc'"),
        "negative batch": (["train", "--out", out, "--batch-size", "-4"], "'-4'"),
        "precision fp8": (["train", "--out", out, "--precision", "fp8"], "fp8"),
        "lr not a number": (["train", "--out", out, "--lr", "fast"], "fast"),
        "unknown option": (["train", "--out", out, "--dmodel", "32"], "--dmodel"),
        "bad model shape": (["train", "--out", out, "--n-heads", "3"], "divisible"),
        "negative lr": (["train", "--out", out, "--lr", "-1"], "lr"),
        "missing data": (["train", "--out", out, "--data", tmp_path / "nope.txt"], "nope.txt"),
        "one data file": (["train", "--out", out, "--data", a, *TINY_ARGS], "two files"),
        "resume nothing": (["train", "--out", out, "--resume", "--data", a, b, *TINY_ARGS], "resume"),
        "generate missing path": (["generate", tmp_path / "no-such-ckpt"], "no-such-ckpt"),
        "generate not a checkpoint": (["generate", tmp_path], "manifest"),
        "generate bad count": (["generate", tmp_path, "--max-new-tokens", "0"], "'0'"),
        "zoo without action": (["zoo"], "ACTION"),
        "zoo unknown action": (["zoo", "fetch"], "fetch"),
        "zoo path unknown": (["zoo", "path", "no-such-model"], "dense-tiny"),
        "zoo train unknown": (["zoo", "train", "no-such-model"], "no-such-model"),
        "zoo train nothing": (["zoo", "train"], "NAME"),
        "zoo train name and scale": (["zoo", "train", "dense-tiny", "--scale", "book"], "not both"),
        "zoo train unknown scale": (["zoo", "train", "--scale", "galaxy"], "galaxy"),
        "zoo verify cached recipe": (["zoo", "verify", "dense-tiny"], "not a shipped recipe"),
        "zoo verify unknown": (["zoo", "verify", "no-such-model"], "no-such-model"),
        "unknown schedule": (["train", "--out", out, "--schedule", "dynamic"], "dynamic"),
        "weights not pairs": (["train", "--out", out, "--domain-weights", "code"], "DOMAIN=WEIGHT"),
        "negative weight": (["train", "--out", out, "--domain-weights", "code=-1"], "domain_weights"),
        "unknown domain": (["train", "--out", out, "--data", a, b, *TINY_ARGS, "--domain-weights", "poetry=1"],
                           "poetry"),
        "weights and temperature": (["train", "--out", out, "--domain-weights", "code=1",
                                     "--mixture-temperature", "2"], "not allowed with"),
        "zero temperature": (["train", "--out", out, "--mixture-temperature", "0"], "mixture_temperature"),
        "batch under a sequence": (["train", "--out", out, "--seq-len", "32", "--batch-tokens", "16"],
                                   "batch_tokens"),
        "unknown corpus": (["train", "--out", out, "--corpus", "web"], "web"),
        "corpus and data": (["train", "--out", out, "--data", a, b, "--corpus", "mixed", *TINY_ARGS], "--corpus"),
        "eval unknown model": (["eval", "no-such-model"], "no-such-model"),
        "eval bad k": (["eval", "dense-tiny", "--k", "1"], "k must be"),
        "eval unknown axis": (["eval", "dense-tiny", "--axes", "poetry"], "poetry"),
        "infer unknown model": (["bench", "infer", "--model", "no-such-model"], "no-such-model"),
        "infer zero batch": (["bench", "infer", "--batch-sizes", "0"], "'0'"),
        "bench without what": (["bench"], "WHAT"),
        "bench bad precision": (["bench", "train", "--precision", "fp8"], "fp8"),
        "bench bad batch": (["bench", "decode", "--batch-sizes", "0"], "'0'"),
    }


BAD_CASES = list(_bad(Path("/x"), (Path("/a"), Path("/b"))))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_arguments(case, tmp_path, text_files, capsys):
    argv, hint = _bad(tmp_path, text_files)[case]
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err  # exactly one line
    assert "error" in err
    assert hint in err
    assert "Traceback" not in err
    assert not (tmp_path / "ck").exists()


# -----------------------------------------------------------------------------
# train + generate end to end


def test_train_then_generate(tmp_path, text_files, capsys):
    ck = tmp_path / "ckpt"
    a, b = text_files
    code, out, err = run(["train", "--out", ck, "--data", a, b, *TINY_ARGS, "--steps", 4, "--eval-every", 2],
                         capsys)
    assert code == 0, err
    assert (ck / "config.json").is_file() and (ck / "model.safetensors").is_file()
    verify_checkpoint(ck)
    assert "step 4: validation loss" in out and "bits/byte" in out
    assert out.rstrip().endswith(f"saved {ck}")
    model = load_checkpoint(ck)
    assert (model.config.d_model, model.config.n_layers, model.config.n_heads) == (32, 2, 2)

    gen = ["generate", ck, "--prompt", "def ", "--max-new-tokens", 10, "--seed", 0, "--device", "cpu"]
    code, first, err = run(gen, capsys)
    assert code == 0, err
    assert first.endswith("\n")
    code, second, _ = run(gen, capsys)
    assert code == 0
    assert first == second  # same seed, same text
    text = first[:-1]
    assert len(text) <= 10  # at most 10 new bytes, each decoding to at most one character
    assert text == sample_text(model, "def ", 10, temperature=0.8, seed=0)

    # --resume continues the same run: more steps need a new TrainConfig, so the same run finishes at once
    code, out, err = run(["train", "--out", ck, "--data", a, b, *TINY_ARGS, "--steps", 4, "--eval-every", 2,
                          "--resume"], capsys)
    assert code == 0, err


def test_train_reports_the_mixture_and_mfu(tmp_path, text_files, capsys):
    a, b = text_files
    code, out, err = run(["train", "--out", tmp_path / "ck", "--data", a, b, *TINY_ARGS, "--steps", 3,
                          "--eval-every", 3, "--domain-weights", "text=1", "--schedule", "exponential"], capsys)
    assert code == 0, err
    assert f"tokens seen per domain: text {3 * 4 * 32:,} (100%)" in out
    assert "MFU" in out and "measured" in out
    state = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    assert state["train_config"]["schedule"] == "exponential"


def test_generate_greedy_is_seed_independent(tmp_path, text_files, capsys):
    ck = tmp_path / "ckpt"
    a, b = text_files
    assert run(["train", "--out", ck, "--data", a, b, *TINY_ARGS, "--steps", 2], capsys)[0] == 0
    outs = {run(["generate", ck, "--prompt", "x", "--max-new-tokens", 8, "--temperature", 0, "--seed", s,
                 "--device", "cpu"], capsys)[1] for s in (0, 1, 2)}
    assert len(outs) == 1


# -----------------------------------------------------------------------------
# zoo


def test_zoo_list_and_path(cache, capsys):
    code, out, err = run(["zoo", "list"], capsys)
    assert code == 0, err
    line = next(row for row in out.splitlines() if row.startswith("dense-tiny"))
    assert "not cached" in line
    code, out, _ = run(["zoo", "path", "dense-tiny"], capsys)
    assert code == 0
    assert Path(out.strip()) == cache / "zoo" / f"dense-tiny-{zoo.recipe('dense-tiny').key()}"
    assert not (cache / "zoo" / f"dense-tiny-{zoo.recipe('dense-tiny').key()}").exists()


@pytest.fixture
def tiny_recipe(monkeypatch, tiny_data):
    monkeypatch.setattr(minimoe.data, "builtin_splits", lambda *a, **k: tiny_data)
    r = zoo.register(zoo.Recipe("test-cli-tiny", "tiny", dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=32),
                                dict(steps=3, batch_size=4, seq_len=32, warmup_steps=1, eval_every=3,
                                     eval_batches=2)))
    yield r
    zoo.RECIPES.pop(r.name, None)


def test_zoo_train_then_generate_by_name(tiny_recipe, cache, capsys):
    code, out, err = run(["zoo", "train", tiny_recipe.name], capsys)
    assert code == 0, err
    assert Path(out.strip()) == zoo.path(tiny_recipe.name)
    assert zoo.is_cached(tiny_recipe.name)
    _, out, _ = run(["zoo", "list"], capsys)
    assert next(row for row in out.splitlines() if row.startswith(tiny_recipe.name)).split()[1] == "cached"
    code, out, err = run(["generate", tiny_recipe.name, "--max-new-tokens", 5, "--device", "cpu"], capsys)
    assert code == 0, err


@pytest.fixture
def shipped_recipe(monkeypatch, tiny_data, tmp_path, without_book_recipes):
    """A tiny shipped recipe, its weights folder in a temporary $MINIMOE_WEIGHTS."""
    monkeypatch.setattr(minimoe.data, "builtin_splits", lambda *a, **k: tiny_data)
    monkeypatch.setenv("MINIMOE_WEIGHTS", str(tmp_path / "weights"))
    r = zoo.register(zoo.Recipe("test-cli-shipped", "tiny shipped",
                                dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=32),
                                dict(steps=6, batch_size=4, seq_len=32, warmup_steps=1, eval_every=3,
                                     eval_batches=2), shipped=True))
    yield r
    zoo.RECIPES.pop(r.name, None)


def test_zoo_verify_without_shipped_recipes(tmp_path, monkeypatch, capsys, without_book_recipes):
    monkeypatch.setenv("MINIMOE_WEIGHTS", str(tmp_path / "weights"))
    assert not zoo.shipped_recipes()
    code, out, err = run(["zoo", "verify"], capsys)
    assert code == 0, err
    assert "no shipped" in out


def test_zoo_train_and_verify_shipped_weights(shipped_recipe, tmp_path, capsys):
    name, folder = shipped_recipe.name, tmp_path / "weights" / shipped_recipe.name
    code, out, err = run(["zoo", "verify"], capsys)
    assert code == 1 and "no shipped weights" in err and f"minimoe zoo train {name} --force" in err
    _, out, _ = run(["zoo", "list"], capsys)
    assert next(row for row in out.splitlines() if row.startswith(name)).split()[1:3] == ["no", "weights"]

    code, out, err = run(["zoo", "train", "--scale", "book", "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    assert f"{name}: trained, wrote {folder}" in out
    code, out, err = run(["zoo", "train", "--scale", "book", "--quiet"], capsys)  # present: skipped
    assert code == 0 and f"{name}: weights present and verified, skipped" in out
    code, out, err = run(["zoo", "train", name, "--quiet"], capsys)
    assert code == 2 and "--force" in err and err.count("\n") == 1
    _, out, _ = run(["zoo", "list"], capsys)
    assert next(row for row in out.splitlines() if row.startswith(name)).split()[1] == "shipped"
    _, out, _ = run(["zoo", "path", name], capsys)
    assert Path(out.strip()) == folder

    for argv in (["zoo", "verify"], ["zoo", "verify", name, "--check-steps", 3]):
        code, out, err = run(argv, capsys)
        assert code == 0, err
        assert out.startswith(f"{name}: ok") and "bfloat16" in out
    assert "first 3 losses retrained on the CPU" in out and out.rstrip().endswith(": ok")
    code, out, err = run(["generate", name, "--max-new-tokens", 4, "--device", "cpu"], capsys)
    assert code == 0, err

    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    code, out, err = run(["zoo", "verify", name], capsys)
    assert code == 1
    assert "model.safetensors" in err and f"minimoe zoo train {name} --force" in err
    code, out, err = run(["zoo", "train", name, "--force", "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    assert run(["zoo", "verify"], capsys)[0] == 0


def test_train_book_models_script_is_the_cli(shipped_recipe, monkeypatch, capsys):
    import runpy
    calls = []
    monkeypatch.setattr(zoo, "train_book", lambda **k: calls.append(k) or {})
    monkeypatch.setattr(sys, "argv", ["train_book_models.py", "--force", "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "scripts" / "train_book_models.py"), run_name="__main__")
    assert e.value.code == 0
    assert calls == [{"force": True, "device": "cpu", "progress": True}]


# -----------------------------------------------------------------------------
# bench


def test_bench_decode_json(capsys):
    code, out, err = run(["bench", "decode", "--d-model", 32, "--n-layers", 1, "--n-heads", 2, "--batch-sizes", 1,
                          "--prompt-len", 8, "--new-tokens", 8, "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["batch_size"], row["prompt_len"], row["new_tokens"]) == (1, 8, 8)
    assert row["same_tokens"] is True
    for key in ("speedup", "cached_s", "uncached_s", "cached_tokens_per_s", "uncached_tokens_per_s"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["speedup"] == pytest.approx(row["uncached_s"] / row["cached_s"])


def test_bench_train_json(monkeypatch, capsys):
    # the matmul peak at the default 1024/2048 sizes costs seconds on 2 cores; the CLI plumbing is what is tested
    monkeypatch.setattr(minimoe.bench, "matmul_peak",
                        functools.partial(minimoe.bench.matmul_peak, sizes=(128,), repeats=2))
    code, out, err = run(["bench", "train", "--d-model", 32, "--n-layers", 1, "--n-heads", 2, "--batch-size", 2,
                          "--seq-len", 32, "--steps", 1, "--precision", "fp32", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["precision"] for r in rows] == ["fp32"]
    row = rows[0]
    assert row["tokens_per_step"] == 2 * 32
    assert 0 < row["mfu"] and math.isfinite(row["mfu"])
    for key in ("step_ms", "tokens_per_s", "model_tflops", "peak_tflops", "params"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["mfu"] == pytest.approx(row["model_tflops"] / row["peak_tflops"])


def test_bench_tables(monkeypatch, capsys):
    monkeypatch.setattr(minimoe.bench, "matmul_peak",
                        functools.partial(minimoe.bench.matmul_peak, sizes=(128,), repeats=2))
    code, out, _ = run(["bench", "decode", "--d-model", 32, "--n-layers", 1, "--n-heads", 2, "--batch-sizes", 1, 2,
                        "--prompt-len", 4, "--new-tokens", 4, "--device", "cpu"], capsys)
    assert code == 0 and "speed-up" in out and len(out.strip().splitlines()) == 4
    code, out, _ = run(["bench", "train", "--d-model", 32, "--n-layers", 1, "--n-heads", 2, "--batch-size", 1,
                        "--seq-len", 16, "--steps", 1, "--device", "cpu"], capsys)
    assert code == 0 and "MFU" in out and "bf16 / fp32 tokens/s" in out


def test_matmul_peak_is_positive():
    import torch
    peak = minimoe.bench.matmul_peak(torch.float32, "cpu", sizes=(64,), repeats=1)
    assert math.isfinite(peak) and peak > 0


def test_train_a_task_routed_moe_then_generate_per_task(tmp_path, text_files, capsys):
    ck = tmp_path / "moe"
    a, b = text_files
    code, out, err = run(["train", "--out", ck, "--data", a, b, *TINY_ARGS, "--steps", 2, "--eval-every", 2,
                          "--n-experts", 4, "--top-k", 1, "--moe-d-ff", 16, "--router", "task", "--n-tasks", 2,
                          "--attention", "mla"], capsys)
    assert code == 0, err
    cfg = load_checkpoint(ck).config
    assert (cfg.n_experts, cfg.router, cfg.n_tasks, cfg.attention) == (4, "task", 2, "mla")
    gen = ["generate", ck, "--prompt", "x", "--max-new-tokens", 4, "--device", "cpu"]
    code, out, err = run([*gen, "--task", 1], capsys)
    assert code == 0, err
    code, out, err = run(gen, capsys)  # a task-routed model needs a task
    assert code == 2 and "task_ids is required" in err


# -----------------------------------------------------------------------------
# eval and bench infer


def test_eval_and_bench_infer_on_a_checkpoint(tmp_path, text_files, capsys):
    a, b = text_files
    ck = tmp_path / "ck"
    code, _, err = run(["train", "--out", ck, "--data", a, b, *TINY_ARGS, "--steps", 2, "--eval-every", 2], capsys)
    assert code == 0, err
    code, out, err = run(["eval", ck, "--n", 6, "--axes", "reasoning", "knowledge", "--device", "cpu"], capsys)
    assert code == 0, err
    assert out.splitlines()[1].split()[:2] == ["axis", "score"]
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["reasoning", "knowledge"]
    code, out, err = run(["eval", ck, "--n", 6, "--axes", "dialogue", "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    result = json.loads(out)["dialogue"]
    assert result["n"] == 6 and 0 <= result["score"] <= 10 and result["chance"] == 0.25

    code, out, err = run(["bench", "infer", "--model", ck, "--batch-sizes", 1, 2, "--prompt-len", 8,
                          "--new-tokens", 4, "--repeats", 1, "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2] and all(r["matches_generate"] for r in rows)
    code, out, err = run(["bench", "infer", "--model", ck, "--prompt-len", 40, "--new-tokens", 4,
                          "--device", "cpu"], capsys)
    assert code == 2 and "prompt_len" in err and err.count("\n") == 1   # 40 + 4 > the 32-token context
