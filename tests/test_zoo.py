"""The zoo: named recipes trained once into $MINIMOE_CACHE/zoo and reused; interrupted trainings resume."""
from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

import minimoe.data
from minimoe import zoo
from minimoe.checkpoint import load_checkpoint, load_training_state, verify_checkpoint
from minimoe.config import ModelConfig
from minimoe.train import TrainConfig, train

TINY_MODEL = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
TINY_TRAIN = dict(steps=4, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1, eval_every=2, eval_batches=2,
                  seed=0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """$MINIMOE_CACHE -> tmp_path, so nothing is written to ~/.cache."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def tiny_corpus(monkeypatch, tiny_data):
    """train() falls back to data_lib.builtin_splits(); make that the tiny data set."""
    monkeypatch.setattr(minimoe.data, "builtin_splits", lambda *a, **k: tiny_data)
    return tiny_data


@pytest.fixture
def recipe(cache, tiny_corpus):
    """A tiny recipe registered for one test and removed afterwards."""
    names = []

    def make(name="test-tiny", **train_overrides):
        r = zoo.register(zoo.Recipe(name=name, description="a tiny test recipe", model=dict(TINY_MODEL),
                                    train={**TINY_TRAIN, **train_overrides}))
        names.append(name)
        return r

    yield make
    for name in names:
        zoo.RECIPES.pop(name, None)


@pytest.fixture
def train_calls(monkeypatch):
    """Record every zoo -> train() call (its resume flag), passing through to the real train()."""
    calls = []
    real = zoo.train

    def spy(*args, **kwargs):
        calls.append(kwargs.get("resume"))
        return real(*args, **kwargs)

    monkeypatch.setattr(zoo, "train", spy)
    return calls


def test_load_trains_once_then_reuses(recipe, cache, train_calls, monkeypatch):
    r = recipe()
    assert not zoo.is_cached(r.name)
    entry = zoo.load(r.name, progress=False)
    assert train_calls == [False]
    assert zoo.is_cached(r.name)
    assert entry.name == r.name
    assert entry.path == zoo.path(r.name)
    assert entry.path.parent == cache / "zoo"
    assert entry.path.name == f"{r.name}-{r.key()}"
    verify_checkpoint(entry.path)
    assert not entry.model.training
    assert entry.model.config == r.model_config()
    assert entry.model.config.extra == {"recipe": r.name}
    assert [e["step"] for e in entry.history["train"]] == [1, 2, 3, 4]
    assert all(math.isfinite(e["val_bpb"]) for e in entry.history["eval"])

    def no_training(*a, **k):
        raise AssertionError("a cached zoo model was trained again")

    monkeypatch.setattr(zoo, "train", no_training)
    again = zoo.load(r.name, progress=False)
    assert again.history == entry.history
    for k, v in entry.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k
    zoo.train_recipe(r.name, progress=False)  # cached: no retraining without force
    with pytest.raises(AssertionError, match="trained again"):
        zoo.train_recipe(r.name, force=True, progress=False)


def test_cache_folder_follows_minimoe_cache(recipe, tmp_path, monkeypatch):
    r = recipe()
    assert zoo.cache_dir() == tmp_path
    assert zoo.path(r.name) == tmp_path / "zoo" / f"{r.name}-{r.key()}"
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "elsewhere"))
    assert zoo.path(r.name) == tmp_path / "elsewhere" / "zoo" / f"{r.name}-{r.key()}"


def test_zoo_model_matches_a_direct_training_run(recipe, tiny_data):
    r = recipe()
    entry = zoo.load(r.name, progress=False)
    direct = train(r.model_config(), r.train_config(device="auto"), data=tiny_data, progress=False)
    assert [e["loss"] for e in entry.history["train"]] == [e["loss"] for e in direct.history["train"]]
    assert torch.equal(entry.model.embed.weight, direct.model.embed.weight)


def test_key_changes_with_the_recipe(recipe):
    base = zoo.Recipe("k", "d", dict(TINY_MODEL), dict(TINY_TRAIN))
    same = zoo.Recipe("k", "another description", dict(TINY_MODEL), dict(TINY_TRAIN))
    assert base.key() == same.key()
    assert len(base.key()) == 12
    keys = {base.key(),
            zoo.Recipe("k", "d", dict(TINY_MODEL), {**TINY_TRAIN, "steps": 5}).key(),
            zoo.Recipe("k", "d", dict(TINY_MODEL), {**TINY_TRAIN, "lr": 2e-2}).key(),
            zoo.Recipe("k", "d", {**TINY_MODEL, "d_model": 64}, dict(TINY_TRAIN)).key()}
    assert len(keys) == 4
    a = recipe("test-a")
    b = recipe("test-b", steps=5)
    assert zoo.path(a.name) != zoo.path(b.name)
    assert a.key() != b.key()


def test_changed_recipe_trains_afresh(recipe, train_calls):
    r = recipe()
    zoo.load(r.name, progress=False)
    old_path = zoo.path(r.name)
    zoo.RECIPES.pop(r.name)
    r2 = recipe(steps=3)
    assert zoo.path(r2.name) != old_path
    assert not zoo.is_cached(r2.name)
    entry = zoo.load(r2.name, progress=False)
    assert train_calls == [False, False]
    assert len(entry.history["train"]) == 3
    assert old_path.exists()  # the old model is left alone


def test_unknown_name_lists_available(cache):
    with pytest.raises(ValueError, match="unknown zoo model 'no-such-model'") as e:
        zoo.load("no-such-model")
    assert "dense-tiny" in str(e.value)
    for fn in (zoo.recipe, zoo.path, zoo.is_cached, zoo.train_recipe):
        with pytest.raises(ValueError, match="dense-tiny"):
            fn("no-such-model")
    assert not (cache / "zoo").exists() or not any((cache / "zoo").iterdir())


def test_load_without_training(recipe, cache, train_calls):
    r = recipe()
    with pytest.raises(FileNotFoundError, match=r.name):
        zoo.load(r.name, train_if_missing=False)
    assert train_calls == []
    assert not zoo.path(r.name).exists()


def test_interrupted_training_is_resumed(recipe, tiny_data, train_calls):
    r = recipe()
    folder = zoo.path(r.name)
    # an earlier training that stopped after 2 of 4 steps, with the recipe's own configs
    train(r.model_config(), r.train_config(device="auto"), data=tiny_data, out_dir=folder, stop_after=2,
          progress=False)
    assert load_training_state(folder)[0]["step"] == 2
    assert not zoo.is_cached(r.name)
    assert zoo._trained_steps(folder) == 2

    entry = zoo.load(r.name, progress=False)
    assert train_calls == [True]  # resumed, not restarted
    assert zoo.is_cached(r.name)
    full = train(r.model_config(), r.train_config(device="auto"), data=tiny_data, progress=False)
    assert [e["loss"] for e in entry.history["train"]] == [e["loss"] for e in full.history["train"]]
    assert torch.equal(entry.model.embed.weight, full.model.embed.weight)


def test_load_leaves_the_callers_random_state_alone(recipe, tiny_data):
    """Whether zoo.load resumes an interrupted training, trains from scratch or reads the cache, the caller's
    random streams (torch's, Python's, NumPy's) are as they were: a notebook's later cells must not depend on
    the state of the cache."""
    resumed, fresh = recipe(), recipe("test-tiny-2", seed=1)
    train(resumed.model_config(), resumed.train_config(device="auto"), data=tiny_data, out_dir=zoo.path(resumed.name),
          stop_after=2, progress=False)
    for name in (resumed.name, fresh.name, fresh.name):
        torch.manual_seed(5), random.seed(5), np.random.seed(5)
        zoo.load(name, progress=False)
        draws = torch.rand(2), random.random(), np.random.rand()
        torch.manual_seed(5), random.seed(5), np.random.seed(5)
        assert torch.equal(draws[0], torch.rand(2)) and draws[1:] == (random.random(), np.random.rand()), name


def test_corrupted_cache_is_retrained(recipe, train_calls):
    r = recipe()
    zoo.load(r.name, progress=False)
    f = zoo.path(r.name) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    assert not zoo.is_cached(r.name)
    entry = zoo.load(r.name, progress=False)
    assert train_calls == [False, False]
    verify_checkpoint(entry.path)


def test_available_lists_recipes(recipe, cache):
    r = recipe()
    rows = {row["name"]: row for row in zoo.available()}
    assert {"dense-tiny", r.name} <= set(rows)
    assert rows[r.name]["cached"] is False
    assert rows[r.name]["path"] == str(cache / "zoo" / f"{r.name}-{r.key()}")
    zoo.load(r.name, progress=False)
    assert {row["name"]: row for row in zoo.available()}[r.name]["cached"] is True


def test_register_rejects_duplicates_and_invalid_recipes(recipe):
    r = recipe()
    with pytest.raises(ValueError, match="already registered"):
        zoo.register(r)
    with pytest.raises(ValueError, match="n_heads"):
        zoo.register(zoo.Recipe("test-bad-model", "", {**TINY_MODEL, "n_heads": 3}, dict(TINY_TRAIN)))
    with pytest.raises(ValueError, match="schedule"):
        zoo.register(zoo.Recipe("test-bad-train", "", dict(TINY_MODEL), {**TINY_TRAIN, "schedule": "x"}))
    assert "test-bad-model" not in zoo.RECIPES and "test-bad-train" not in zoo.RECIPES


def test_dense_tiny_is_registered_and_valid(cache):
    r = zoo.recipe("dense-tiny")
    assert r is zoo.RECIPES["dense-tiny"]
    mc = r.model_config()
    assert isinstance(mc, ModelConfig)
    assert (mc.d_model, mc.n_layers, mc.n_heads, mc.max_seq_len) == (256, 4, 4, 256)
    assert mc.extra == {"recipe": "dense-tiny"}
    tc = r.train_config(device="cpu")
    assert isinstance(tc, TrainConfig)
    assert tc.device == "cpu" and tc.steps == r.train["steps"]
    assert tc.seq_len <= mc.max_seq_len
    assert ModelConfig.from_dict(mc.to_dict()) == mc
    assert not zoo.is_cached("dense-tiny")
    assert zoo.path("dense-tiny").parent == cache / "zoo"


def test_fixture_cleans_up():
    # runs after the tests above (file order): every temporary recipe was removed again
    assert not any(name.startswith("test-") for name in zoo.RECIPES)


def test_recipes_name_their_corpus(recipe, cache, monkeypatch, tiny_data):
    base = zoo.Recipe("test-corpus", "", dict(TINY_MODEL), dict(TINY_TRAIN))
    mixed = dataclasses.replace(base, corpus="mixed")
    assert base.key() != mixed.key()                       # a different corpus is a different model
    with pytest.raises(ValueError, match="corpus 'web'"):
        zoo.register(dataclasses.replace(base, corpus="web"))
    asked = []
    monkeypatch.setattr(minimoe.data, "mixed_splits", lambda *a, **k: asked.append("mixed") or tiny_data)
    zoo.register(mixed)
    try:
        zoo.load("test-corpus", progress=False)
    finally:
        zoo.RECIPES.pop("test-corpus", None)
    assert asked == ["mixed"]


def test_chapter2_recipes_match_their_studies(cache):
    """Dense and MoE of the equal-compute study: active parameters and FLOPs per token within 1.5% (the
    routers), the same data and training."""
    from minimoe.model import MiniLM
    dense, moe = (zoo.recipe(n) for n in zoo.DENSE_VS_MOE.values())
    d, m = MiniLM(dense.model_config()), MiniLM(moe.model_config())
    assert m.num_parameters() > 1.5 * d.num_parameters()
    assert 0 < m.num_active_parameters() / d.num_active_parameters() - 1 < 0.015
    assert 0 < m.flops_per_token(128) / d.flops_per_token(128) - 1 < 0.015
    assert (dense.train, dense.corpus) == (moe.train, moe.corpus)
    tc = {n: zoo.recipe(n).train_config() for n in zoo.BATCH_RUNS.values()}
    assert len({t.steps * t.tokens_per_step for t in tc.values()}) == 1          # equal tokens
    assert {zoo.recipe(n).train_config().schedule for n in zoo.SCHEDULE_RUNS.values()} == set(zoo.SCHEDULE_RUNS)


def test_shipped_flag_leaves_existing_keys_alone(monkeypatch):
    """shipped=False is the default and keys (so cache folders) are what they were before the field existed; a
    shipped recipe's key is the recipe alone, so committed weights survive a minimoe release or another Python."""
    import hashlib
    import json
    import sys

    def old_key(r):  # Recipe.key() as it was before shipped weights
        fields = {"model": r.model, "train": r.train, "minimoe": zoo.__version__, "python": sys.version.split()[0]}
        if r.corpus != "stdlib":
            fields["corpus"] = r.corpus
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    assert all(r.key() == old_key(r) for r in zoo.RECIPES.values() if not r.shipped)
    plain = zoo.Recipe("k", "d", dict(TINY_MODEL), dict(TINY_TRAIN))
    shipped = dataclasses.replace(plain, shipped=True)
    assert shipped.key() != plain.key()
    before = shipped.key(), plain.key()
    monkeypatch.setattr(zoo, "__version__", "99.0")
    monkeypatch.setattr(sys, "version", "3.99.0 (test)")
    assert shipped.key() == before[0] and plain.key() != before[1]
    assert dataclasses.replace(shipped, train={**TINY_TRAIN, "lr": 2e-2}).key() != before[0]
    with pytest.raises(ValueError, match="shipped must be True or False"):
        zoo.register(dataclasses.replace(plain, name="test-bad-shipped", shipped="yes"))
