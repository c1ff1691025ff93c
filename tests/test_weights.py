"""Shipped weights: written once with their provenance, verified on every load, never retrained by zoo.load."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import minimoe
import minimoe.data
from minimoe import weights, zoo
from minimoe.checkpoint import verify_checkpoint
from minimoe.weights import ShippedWeightsError

# A shipped recipe small enough to train in a couple of seconds; registered only while a test runs
TINY = zoo.Recipe(name="test-shipped-tiny", description="a tiny shipped test recipe",
                  model=dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=32),
                  train=dict(steps=20, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=10,
                             eval_batches=2, seed=0),
                  shipped=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """TINY trained once on the CPU by zoo.train_shipped: (its weights folder, the fp32 model train() returned)."""
    root = tmp_path_factory.mktemp("weights")
    results = []
    real_train = zoo.train
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zoo, "RECIPES", {n: r for n, r in zoo.RECIPES.items() if not r.shipped})
        mp.setenv("MINIMOE_WEIGHTS", str(root))
        mp.setattr(minimoe.data, "builtin_splits", lambda *a, **k: tiny_data)
        mp.setattr(zoo, "train", lambda *a, **k: results.append(real_train(*a, **k)) or results[-1])
        zoo.register(TINY)
        try:
            folder = zoo.train_shipped(TINY.name, device="cpu", progress=False)
        finally:
            zoo.RECIPES.pop(TINY.name, None)
    assert folder == root / TINY.name and len(results) == 1
    return folder, results[0].model


@pytest.fixture
def shipped(trained, tmp_path, monkeypatch, tiny_data, without_book_recipes):
    """A fresh copy of the trained weights in a temporary $MINIMOE_WEIGHTS, with TINY registered for the test."""
    folder, model = trained
    root = tmp_path / "weights"
    shutil.copytree(folder, root / TINY.name)
    monkeypatch.setenv("MINIMOE_WEIGHTS", str(root))
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(minimoe.data, "builtin_splits", lambda *a, **k: tiny_data)
    zoo.register(TINY)
    yield root / TINY.name, model
    zoo.RECIPES.pop(TINY.name, None)


@pytest.fixture
def no_training(monkeypatch):
    """Any training from here on fails the test."""
    def refuse(*a, **k):
        raise AssertionError("shipped weights were trained again")

    monkeypatch.setattr(zoo, "train", refuse)
    monkeypatch.setattr(weights, "train", refuse)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_is_the_trained_model_in_bf16(shipped, no_training):
    folder, model = shipped
    entry = zoo.load(TINY.name)
    assert entry.path == folder == zoo.path(TINY.name)
    assert not entry.model.training
    assert {p.dtype for p in entry.model.parameters()} == {torch.float32}
    expected = copy.deepcopy(model).eval()  # the trained weights rounded to bf16 (not the rotary tables)
    with torch.no_grad():
        for p in expected.parameters():
            p.copy_(p.to(torch.bfloat16))
    assert any(not torch.equal(p, q) for p, q in zip(expected.parameters(), model.parameters()))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(entry.model(x).logits, expected(x).logits)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    half, _ = weights.load_shipped(folder, TINY, dtype=None)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert [r["step"] for r in entry.history["train"]] == list(range(1, 21))
    assert [r["step"] for r in entry.history["eval"]] == [10, 20]
    assert zoo.is_cached(TINY.name)


def test_provenance_records_everything(shipped):
    folder, model = shipped
    p = json.loads((folder / weights.PROVENANCE).read_text())
    assert p["recipe_name"] == TINY.name and p["recipe_key"] == TINY.key()
    assert p["recipe"] == dataclasses.asdict(TINY)
    git = p["git"]  # None outside a git checkout
    assert git is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))
    assert {"python", "minimoe", "torch", "safetensors"} <= set(p["versions"])
    assert p["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert "thread" in p["device"]  # a CPU's name and torch's thread count
    assert p["dtype"] == "bfloat16"
    assert p["wall_time_s"] > 0
    assert p["tokens_seen"] == 20 * 4 * 32
    assert p["parameters"] == model.num_parameters()
    train_curve, eval_curve = p["loss_curve"]["train"], p["loss_curve"]["eval"]
    assert train_curve["step"] == list(range(1, 21))
    assert len(train_curve["loss"]) == 20 and all(math.isfinite(v) for v in train_curve["loss"])
    assert eval_curve["step"] == [10, 20] and all(math.isfinite(v) for v in eval_curve["val_loss"])
    assert set(p["files"]) == {"config.json", "model.safetensors"}  # not provenance.json, not the manifest
    for name, entry in p["files"].items():
        assert entry == {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
    assert set(verify_checkpoint(folder)) == {"config.json", "model.safetensors", weights.PROVENANCE}


def test_a_corrupted_byte_is_named(shipped, no_training):
    folder, _ = shipped
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ShippedWeightsError, match="model.safetensors") as e:
        zoo.load(TINY.name)
    assert f"minimoe zoo train {TINY.name} --force" in str(e.value)
    assert not zoo.is_cached(TINY.name)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "provenance.json", "manifest.json"])
def test_a_missing_file_is_named(shipped, no_training, name):
    folder, _ = shipped
    (folder / name).unlink()
    with pytest.raises(ShippedWeightsError, match=name.replace(".", r"\.")) as e:
        zoo.load(TINY.name)
    assert "--force" in str(e.value)


def test_missing_folder_is_an_error_not_a_training(shipped, no_training):
    folder, _ = shipped
    shutil.rmtree(folder)
    with pytest.raises(ShippedWeightsError, match="no shipped weights") as e:
        zoo.load(TINY.name, train_if_missing=True)
    assert str(folder) in str(e.value) and "--force" in str(e.value)
    assert not folder.exists()


def test_weights_of_a_changed_recipe_are_refused(shipped, no_training):
    zoo.RECIPES.pop(TINY.name)
    zoo.register(dataclasses.replace(TINY, train={**TINY.train, "lr": 2e-2}))
    with pytest.raises(ShippedWeightsError, match="provenance.json") as e:
        zoo.load(TINY.name)
    assert "train.lr 0.01 -> 0.02" in str(e.value) and "--force" in str(e.value)


def test_an_edited_provenance_is_caught(shipped, no_training):
    folder, _ = shipped
    record = folder / weights.PROVENANCE
    p = json.loads(record.read_text())
    p["loss_curve"]["train"]["loss"][0] = 1.0
    record.write_text(json.dumps(p, indent=1))
    with pytest.raises(ShippedWeightsError, match="provenance.json is corrupted"):
        zoo.load(TINY.name)
    record.write_text("{not json")
    with pytest.raises(ShippedWeightsError, match="provenance.json is corrupted"):
        zoo.load(TINY.name)


def test_existing_weights_are_not_overwritten_without_force(shipped, monkeypatch):
    folder, _ = shipped
    before = {f.name: _sha256(f) for f in folder.iterdir()}
    calls = []
    real_train = zoo.train
    monkeypatch.setattr(zoo, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    with pytest.raises(FileExistsError, match=f"minimoe zoo train {TINY.name} --force"):
        zoo.train_shipped(TINY.name, device="cpu", progress=False)
    assert calls == [] and {f.name: _sha256(f) for f in folder.iterdir()} == before
    assert zoo.train_book(device="cpu", progress=False) == {TINY.name: None}  # present and verified: skipped
    assert calls == []
    zoo.train_shipped(TINY.name, force=True, device="cpu", progress=False)
    assert calls == [1]
    weights.verify_shipped(folder, TINY)
    old, new = before[weights.PROVENANCE], _sha256(folder / weights.PROVENANCE)
    assert old != new  # a new record (its date and wall time at least)


def test_train_book_stops_on_bad_weights_before_training(shipped, no_training):
    folder, _ = shipped
    (folder / "config.json").write_text("{}")
    with pytest.raises(ShippedWeightsError, match="config.json"):
        zoo.train_book(progress=False)


def test_shipped_and_cached_recipes_keep_apart(shipped):
    with pytest.raises(ValueError, match="shipped"):
        zoo.train_recipe(TINY.name)
    with pytest.raises(ValueError, match="not a shipped recipe"):
        zoo.train_shipped("dense-tiny")
    assert TINY.name in zoo.shipped_recipes() and "dense-tiny" not in zoo.shipped_recipes()
    row = next(r for r in zoo.available() if r["name"] == TINY.name)
    assert row["shipped"] and row["cached"] and row["path"] == str(shipped[0])


def test_weights_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MINIMOE_WEIGHTS", raising=False)
    assert weights.weights_dir() == Path(minimoe.__file__).resolve().parents[1] / "weights"
    monkeypatch.setenv("MINIMOE_WEIGHTS", str(tmp_path))
    assert weights.shipped_path("x") == tmp_path / "x"


def test_the_repository_weights_folder_is_not_ignored():
    import subprocess
    repo = Path(minimoe.__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", "weights/x/model.safetensors"])
    assert ignored.returncode == 1  # 1: not ignored


def test_write_shipped_keeps_to_the_size_limits(shipped, monkeypatch):
    folder, model = shipped
    history = weights.shipped_history(json.loads((folder / weights.PROVENANCE).read_text()))
    write = dict(device="cpu", wall_time_s=1.0)
    with pytest.raises(ValueError, match="half precision"):
        weights.write_shipped(folder.parent / "fp32", model, TINY, history, dtype=torch.float32, **write)
    monkeypatch.setattr(weights, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ShippedWeightsError, match=r"model\.safetensors would be .* over the 0 MB limit"):
        weights.write_shipped(folder.parent / "big", model, TINY, history, **write)
    monkeypatch.setattr(weights, "MAX_FILE_BYTES", 50_000_000)
    monkeypatch.setattr(weights, "MAX_TOTAL_BYTES", weights.shipped_bytes(folder.parent) + 1000)
    with pytest.raises(ShippedWeightsError, match="limit for all of them together"):
        weights.write_shipped(folder.parent / "second", model, TINY, history, **write)
    assert sorted(p.name for p in folder.parent.iterdir()) == [TINY.name]  # nothing left behind
    weights.write_shipped(folder, model, TINY, history, dtype=torch.float16, **write)  # replaces itself: fits
    assert json.loads((folder / weights.PROVENANCE).read_text())["dtype"] == "float16"


def test_check_against_recipe(shipped):
    folder, model = shipped
    torch.manual_seed(3)
    check = weights.check_against_recipe(folder, TINY, steps=5)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))  # the caller's random state is left alone
    assert check.steps == 5 and len(check.recomputed) == len(check.recorded) == 5
    assert check.max_rel_diff < 1e-5 and check.ok  # same device, same precision: the same losses
    # a consistent forgery (hashes rewritten to match): a curve 10% higher than this recipe's
    history = weights.shipped_history(json.loads((folder / weights.PROVENANCE).read_text()))
    for row in history["train"]:
        row["loss"] *= 1.1
    weights.write_shipped(folder, model, TINY, history, device="cpu", wall_time_s=1.0)
    weights.verify_shipped(folder, TINY)
    forged = weights.check_against_recipe(folder, TINY, steps=5)
    assert forged.max_abs_diff > 0.3 and forged.max_rel_diff == pytest.approx(1 / 11, rel=1e-6)
    assert not forged.ok
    assert weights.check_against_recipe(folder, TINY, steps=5, rel_tol=0.1).ok  # the tolerance is a parameter
    with pytest.raises(ValueError, match="fewer than steps=21"):
        weights.check_against_recipe(folder, TINY, steps=21)
