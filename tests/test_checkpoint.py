"""Checkpoint folders: round trip, atomic overwrite, corruption and mismatch detection, safe torch.load."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import minimoe
import minimoe.checkpoint as ckpt
from minimoe.checkpoint import (
    MANIFEST, CheckpointError, load_checkpoint, load_config, load_training_state, save_checkpoint,
    verify_checkpoint,
)
from minimoe.config import ModelConfig
from minimoe.model import MiniLM
from minimoe.train import TrainConfig, make_optimizer, make_scheduler


def _model(cfg: ModelConfig, seed: int = 0) -> MiniLM:
    torch.manual_seed(seed)
    return MiniLM(cfg).eval()


def _ids(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# -----------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_state_dict_and_logits(tmp_path, tiny_config, tied):
    cfg = dataclasses.replace(tiny_config, tie_embeddings=tied)
    model = _model(cfg)
    out = save_checkpoint(tmp_path / "ck", model)
    assert out == tmp_path / "ck"
    for name in ("config.json", "model.safetensors", MANIFEST):
        assert (out / name).is_file()
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest) == {"config.json", "model.safetensors"}
    assert verify_checkpoint(out) == manifest

    loaded = load_checkpoint(out)
    assert loaded.config.to_dict() == cfg.to_dict()
    assert load_config(out).to_dict() == cfg.to_dict()
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    # a tied embedding must still be one tensor after loading; an untied one two distinct tensors
    assert (loaded.lm_head.weight is loaded.embed.weight) == tied
    if not tied:
        assert not torch.equal(loaded.lm_head.weight, loaded.embed.weight)
    x = _ids(cfg)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded.eval()(x).logits)


def test_load_into_given_model_overwrites_its_weights(tmp_path, tiny_config):
    src = _model(tiny_config, seed=0)
    save_checkpoint(tmp_path / "ck", src)
    dst = _model(tiny_config, seed=1)
    assert not torch.equal(dst.embed.weight, src.embed.weight)
    out = load_checkpoint(tmp_path / "ck", model=dst)
    assert out is dst
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_training_checkpoint_round_trips_trainer_state(tmp_path, tiny_config):
    model = _model(tiny_config)
    tc = TrainConfig(steps=5, warmup_steps=1, device="cpu")
    opt = make_optimizer(model, tc)
    sched = make_scheduler(opt, tc)
    model(_ids(tiny_config), targets=_ids(tiny_config)).loss.backward()
    opt.step()
    sched.step()
    state = {"step": 1, "history": {"train": [{"step": 1, "loss": 5.5}]}}
    save_checkpoint(tmp_path / "ck", model, optimizer=opt, scheduler=sched, trainer_state=state)
    assert set(json.loads((tmp_path / "ck" / MANIFEST).read_text())) == {
        "config.json", "model.safetensors", "trainer_state.json", "optimizer.pt"}
    got_state, got_opt = load_training_state(tmp_path / "ck")
    assert got_state == state
    assert set(got_opt) == {"optimizer", "scheduler", "torch_rng"}
    assert got_opt["scheduler"] == sched.state_dict()
    fresh = make_optimizer(_model(tiny_config), tc)
    fresh.load_state_dict(got_opt["optimizer"])
    for a, b in zip(opt.state.values(), fresh.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


# -----------------------------------------------------------------------------
# atomic overwrite


@pytest.mark.parametrize("failing_call", [1, 2])
def test_failed_overwrite_keeps_old_checkpoint(tmp_path, tiny_config, monkeypatch, failing_call):
    """os.replace failing on the 1st (old -> aside) or 2nd (new -> into place) rename of an overwrite."""
    old_model, new_model = _model(tiny_config, seed=0), _model(tiny_config, seed=1)
    path = save_checkpoint(tmp_path / "ck", old_model)

    real_replace = ckpt.os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError("simulated crash during rename")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, new_model)
    monkeypatch.undo()
    assert len(calls) >= failing_call

    verify_checkpoint(path)
    loaded = load_checkpoint(path)
    for k, v in old_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not torch.equal(loaded.embed.weight, new_model.embed.weight)
    assert _leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]

    # and a later save still works
    save_checkpoint(path, new_model)
    assert torch.equal(load_checkpoint(path).embed.weight, new_model.embed.weight)
    assert _leftovers(tmp_path) == []


def test_failed_weight_write_keeps_old_checkpoint(tmp_path, tiny_config, monkeypatch):
    old_model, new_model = _model(tiny_config, seed=0), _model(tiny_config, seed=1)
    path = save_checkpoint(tmp_path / "ck", old_model)

    def half_written(model, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # a partial file, then the "crash"
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "save_model", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, new_model)
    monkeypatch.undo()
    verify_checkpoint(path)
    assert torch.equal(load_checkpoint(path).embed.weight, old_model.embed.weight)
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_weights(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path / "ck", _model(tiny_config, seed=0))
    new = _model(tiny_config, seed=1)
    save_checkpoint(path, new)
    assert torch.equal(load_checkpoint(path).embed.weight, new.embed.weight)
    assert _leftovers(tmp_path) == []


# -----------------------------------------------------------------------------
# corruption and mismatches


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "append"])
def test_damaged_weights_are_reported_as_corrupted(tmp_path, tiny_config, damage):
    path = save_checkpoint(tmp_path / "ck", _model(tiny_config))
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip_byte":
        raw[-5] ^= 0xFF  # same size, different content: only the SHA-256 can tell
    else:
        raw += b"\x00"
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def test_edited_config_is_reported_as_corrupted(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path / "ck", _model(tiny_config))
    cfg = json.loads((path / "config.json").read_text())
    cfg["norm_eps"] = 1e-6
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def test_missing_manifest(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path / "ck", _model(tiny_config))
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(path)


def test_missing_weights_file(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path / "ck", _model(tiny_config))
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)


def test_garbage_manifest(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path / "ck", _model(tiny_config))
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted"):
        verify_checkpoint(path)


@pytest.mark.parametrize("field, value, differing", [
    ("d_model", 64, "d_model"),   # replace() keeps the resolved d_ff, so only d_model differs
    ("n_layers", 3, "n_layers"),
    ("norm_eps", 1e-6, "norm_eps"),
    ("tie_embeddings", False, "tie_embeddings"),
])
def test_load_into_model_with_different_config(tmp_path, tiny_config, field, value, differing):
    path = save_checkpoint(tmp_path / "ck", _model(tiny_config))
    other = MiniLM(dataclasses.replace(tiny_config, **{field: value}))
    with pytest.raises(CheckpointError, match=field) as e:
        load_checkpoint(path, model=other)
    assert f"fields that differ: {differing})" in str(e.value)  # exactly the differing fields, no others


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError):
        verify_checkpoint(tmp_path / "nope")


def test_a_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "f")


def test_training_state_of_model_only_checkpoint(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path / "ck", _model(tiny_config))
    with pytest.raises(CheckpointError, match="model-only"):
        load_training_state(path)


def test_checkpoint_error_is_a_value_error():
    # the CLI turns ValueErrors into one-line messages; CheckpointError must be one of them
    assert issubclass(CheckpointError, ValueError)


# -----------------------------------------------------------------------------
# torch.load is never allowed to unpickle code


def test_every_torch_load_in_the_package_uses_weights_only():
    package = Path(minimoe.__file__).parent
    calls = []
    for f in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f.name, node.lineno, ok))
    assert calls, "expected at least one torch.load (checkpoint.load_training_state)"
    assert all(ok for _, _, ok in calls), [c for c in calls if not c[2]]


def test_load_training_state_calls_torch_load_with_weights_only(tmp_path, tiny_config, monkeypatch):
    model = _model(tiny_config)
    tc = TrainConfig(steps=3, warmup_steps=0, device="cpu")
    opt = make_optimizer(model, tc)
    save_checkpoint(tmp_path / "ck", model, optimizer=opt, scheduler=make_scheduler(opt, tc),
                    trainer_state={"step": 0})
    real_load = torch.load
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_training_state(tmp_path / "ck")
    assert seen == [True]
