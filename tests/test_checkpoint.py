"""Checkpoint folders: round trip, atomic overwrite, crash safety, random state, corruption and mismatch
detection, safe torch.load."""
from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import io
import itertools
import json
import os
import random
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import safetensors.torch
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
    assert set(got_opt) == {"optimizer", "scheduler", "torch_rng", "rng"}
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
# crash safety: a save killed after any filesystem operation leaves the old checkpoint or the new one


class Crash(BaseException):
    """The process dying: raised instead of a filesystem operation and of every one after it, so that no except
    or finally clause gets to tidy up, as none would after a kill or a power cut."""


def _op_paths(name: str, args: tuple) -> tuple[str, ...]:
    if name == "fsync":
        fd = args[0] if isinstance(args[0], int) else args[0].fileno()
        link = Path(f"/proc/self/fd/{fd}")
        return (os.readlink(link) if link.exists() else str(fd),)
    if name in ("save", "save_file"):  # torch.save(obj, f), save_file(tensors, filename)
        return (str(args[1]),)
    if name in ("rename", "replace", "symlink"):
        return (str(args[0]), str(args[1]))
    return (str(args[0]),)


@contextlib.contextmanager
def filesystem_ops(crash_at: int | None = None):
    """Log every filesystem operation that changes what is on disk: creating, writing, syncing, renaming or
    removing. With crash_at=k the first k - 1 of them run, and the k-th and all later ones raise Crash.

    Yields the log, one (operation, path, ...) per operation that ran (fsync's path read from /proc on Linux).
    shutil.rmtree counts once itself and once per file and folder it removes, so a crash can hit it midway."""
    log = []
    targets = [(os, n) for n in ("mkdir", "rmdir", "unlink", "remove", "rename", "replace", "fsync", "symlink")]
    targets += [(shutil, "rmtree"), (torch, "save"), (safetensors.torch, "save_file"), (io, "open"),
                (builtins, "open")]

    def wrap(name, real):
        def op(*args, **kwargs):
            if name == "open":
                mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
                if not any(c in mode for c in "wax+"):
                    return real(*args, **kwargs)  # reading changes nothing
            if crash_at is not None and len(log) + 1 >= crash_at:
                raise Crash(f"killed before {name}{args[:2]}")
            log.append((name, *_op_paths(name, args)))
            return real(*args, **kwargs)
        return op

    with contextlib.ExitStack() as stack:
        for module, name in targets:
            stack.enter_context(mock.patch.object(module, name, wrap(name, getattr(module, name))))
        yield log


def crash_sweep(setup, save, load) -> list:
    """For k = 1, 2, ...: path = setup(k), a fresh folder; kill save(path) at its k-th filesystem operation;
    then load(path) (None if it raises CheckpointError). Stops at the first k the save survives.

    Returns (k, what load returned, path) for every k, the last one's after the completed save."""
    runs = []
    for k in itertools.count(1):
        path = setup(k)
        with filesystem_ops(crash_at=k):
            try:
                save(path)
                completed = True
            except Crash:
                completed = False
        try:
            loaded = load(path)
        except CheckpointError:
            loaded = None
        runs.append((k, loaded, path))
        if completed:
            return runs
        assert k < 500, "the save never completes"


def which(model: MiniLM, **candidates: MiniLM) -> str:
    """The name of the candidate whose weights `model` has (AssertionError if none)."""
    sd = model.state_dict()
    for name, c in candidates.items():
        if all(torch.equal(sd[k], v) for k, v in c.state_dict().items()):
            return name
    raise AssertionError(f"the loaded weights are none of {list(candidates)}")


def _is_complete(folder: Path) -> bool:
    try:
        verify_checkpoint(folder)
        return True
    except CheckpointError:
        return False


def _training_save(path, model, step: int = 1) -> Path:
    tc = TrainConfig(steps=5, warmup_steps=1, device="cpu")
    opt = make_optimizer(model, tc)
    return save_checkpoint(path, model, optimizer=opt, scheduler=make_scheduler(opt, tc),
                           trainer_state={"step": step})


@pytest.mark.parametrize("training", [False, True], ids=["model", "training"])
def test_a_save_killed_at_any_point_of_an_overwrite_leaves_the_old_or_the_new(tmp_path, tiny_config, training):
    old, new = _model(tiny_config, seed=0), _model(tiny_config, seed=1)

    def save(path, model, step):
        return _training_save(path, model, step) if training else save_checkpoint(path, model)

    def load(path):
        got = which(load_checkpoint(path), old=old, new=new)
        if training:  # the training state always comes from the same save as the weights
            assert load_training_state(path)[0]["step"] == {"old": 1, "new": 2}[got]
        return got

    runs = crash_sweep(lambda k: save(tmp_path / str(k) / "ck", old, 1), lambda p: save(p, new, 2), load)
    outcomes = [got for _, got, _ in runs]
    assert len(runs) > 10  # every write, sync, rename and removal was a crash point
    assert None not in outcomes  # never nothing, never an error
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    # once the new checkpoint is what loads, it stays so: no later crash point brings the old one back
    assert outcomes == sorted(outcomes, key=["old", "new"].index)
    # after any crash the next save succeeds and leaves nothing behind
    newer = _model(tiny_config, seed=2)
    for k, _, path in runs:
        save(path, newer, 3)
        assert which(load_checkpoint(path), newer=newer) == "newer"
        assert _leftovers(path.parent) == [], k


def test_a_first_save_killed_at_any_point_leaves_nothing_or_the_new(tmp_path, tiny_config):
    """The rule for a first save: no checkpoint at all is allowed only while no complete copy of the new one
    exists yet; from the moment one does, it is what loads."""
    new = _model(tiny_config, seed=1)

    def setup(k):
        (tmp_path / str(k)).mkdir()
        return tmp_path / str(k) / "ck"

    runs = crash_sweep(setup, lambda p: save_checkpoint(p, new), lambda p: which(load_checkpoint(p), new=new))
    outcomes = [got for _, got, _ in runs]
    assert outcomes[0] is None and outcomes[-1] == "new"
    assert outcomes == sorted(outcomes, key=[None, "new"].index)
    for k, got, path in runs:
        if got is None:
            assert not any(_is_complete(p) for p in path.parent.iterdir()), k
    for k, _, path in runs:
        save_checkpoint(path, new)
        assert _leftovers(path.parent) == [], k


def test_load_finds_the_copy_a_save_killed_between_its_renames_left(tmp_path, tiny_config):
    """Killed between moving the old folder aside and moving the new one in: `path` is missing, and the load
    reads the complete copy beside it, the new one if it is complete, else the old one."""
    old, new = _model(tiny_config, seed=0), _model(tiny_config, seed=1)
    path = tmp_path / "ck"
    os.replace(save_checkpoint(path, old), tmp_path / ".ck.old-0000aaaa")
    os.replace(save_checkpoint(tmp_path / "staging", new), tmp_path / ".ck.tmp-0000bbbb")
    assert not path.exists()
    assert ckpt.checkpoint_folder(path) == tmp_path / ".ck.tmp-0000bbbb"
    assert which(load_checkpoint(path), old=old, new=new) == "new"
    assert load_config(path) == tiny_config
    # a new copy whose save did not get as far as its manifest is not a checkpoint: the old one loads
    (tmp_path / ".ck.tmp-0000bbbb" / MANIFEST).unlink()
    assert which(load_checkpoint(path), old=old, new=new) == "old"
    # the next save puts the surviving copy back in place first, then replaces it, and removes the rest
    save_checkpoint(path, new)
    assert which(load_checkpoint(path), old=old, new=new) == "new"
    assert _leftovers(tmp_path) == []
    # nothing complete anywhere: no checkpoint
    shutil.rmtree(path)
    (tmp_path / ".ck.tmp-0000cccc").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(path)


def test_the_next_save_removes_only_its_own_leftovers(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path / "ck", _model(tiny_config, seed=0))
    (tmp_path / ".ck.tmp-0badc0de").mkdir()
    (tmp_path / ".ck.tmp-0badc0de" / "model.safetensors").write_bytes(b"\x00" * 10)  # killed mid-write
    shutil.copytree(path, tmp_path / ".ck.old-12345678")
    others = [".ck2.tmp-0badc0de", ".ck.tmp-0badc0de.tmp-0badc0de", ".ck.tmp-mine"]  # another save's, or a user's
    for name in others:
        (tmp_path / name).mkdir()
    save_checkpoint(path, _model(tiny_config, seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck", *others])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the names of fsync'd files from /proc")
def test_a_save_syncs_its_files_before_the_manifest_and_the_folder_after_the_rename(tmp_path, tiny_config):
    """Power-cut safety: a manifest on disk must imply its files are, and the renames must reach the disk."""
    path = save_checkpoint(tmp_path / "ck", _model(tiny_config, seed=0))
    with filesystem_ops() as log:
        _training_save(path, _model(tiny_config, seed=1))
    real = os.path.realpath
    commit = next(i for i, (op, *p) in enumerate(log) if op == "replace" and real(p[1]) == real(path))
    tmp = real(log[commit][1])  # the folder the new checkpoint was written in
    synced = {real(p[0]): i for i, (op, *p) in enumerate(log) if op == "fsync"}
    manifest_written = next(i for i, (op, *p) in enumerate(log) if p and real(p[0]) == real(f"{tmp}/{MANIFEST}"))
    for name in ("config.json", "model.safetensors", "trainer_state.json", "optimizer.pt"):
        assert synced.get(real(f"{tmp}/{name}"), 1 << 30) < manifest_written, name
    assert manifest_written < synced[real(f"{tmp}/{MANIFEST}")] < commit
    assert synced[tmp] < commit  # the folder's entries
    assert max(i for i, (op, *p) in enumerate(log) if op == "fsync" and real(p[0]) == real(tmp_path)) > commit


# -----------------------------------------------------------------------------
# random state: every generator a training run draws from is saved; loading draws from none


def as_old_checkpoint(path: Path) -> None:
    """Rewrite a training checkpoint as minimoe wrote it before it saved every random generator: optimizer.pt
    with torch's CPU state only ("torch_rng"), and a manifest that matches."""
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    torch.save({k: opt[k] for k in ("optimizer", "scheduler", "torch_rng")}, path / "optimizer.pt")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["optimizer.pt"] = {"bytes": (path / "optimizer.pt").stat().st_size,
                                "sha256": ckpt._sha256(path / "optimizer.pt")}
    (path / MANIFEST).write_text(json.dumps(manifest))


def _draws(cuda: bool) -> list:
    out = [random.random(), float(np.random.rand()), torch.rand(3)]
    return out + [torch.rand(3, device="cuda").cpu()] if cuda else out


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_training_checkpoint_records_every_random_generator(tmp_path, tiny_config):
    """Python's random, NumPy's global generator, torch's CPU generator and each CUDA device's (where there is
    one), as accelerate's save_state records them: restored, each stream continues where the save left it."""
    cuda = torch.cuda.is_available()
    model = _model(tiny_config)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    if cuda:
        torch.cuda.manual_seed_all(4)
    path = _training_save(tmp_path / "ck", model)
    expected = _draws(cuda)
    assert not _same(_draws(cuda), expected)  # every stream has moved on
    _, opt = load_training_state(path)
    assert {"python", "numpy", "torch"} <= set(opt["rng"]) and ("cuda" in opt["rng"]) == cuda
    assert torch.equal(opt["torch_rng"], opt["rng"]["torch"])  # still there for older minimoe versions
    assert ckpt.restore_rng_state(opt["rng"], torch.device("cuda", 0) if cuda else torch.device("cpu")) == []
    assert _same(_draws(cuda), expected)


def test_each_cuda_devices_generator_is_saved_and_restored(tmp_path, tiny_config):
    """Mocked, so that it runs without a GPU: every device's state as torch.cuda.get_rng_state_all gives it is
    saved, and each device gets its own back; a machine with fewer devices restores those it has and names the
    training device whose generator it cannot restore."""
    states = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    model = _model(tiny_config)
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "get_rng_state_all", return_value=states):
        path = _training_save(tmp_path / "ck", model)
    _, opt = load_training_state(path)
    assert [s.tolist() for s in opt["rng"]["cuda"]] == [s.tolist() for s in states]
    for devices, device, missing in [(2, 1, []), (1, 0, []), (1, 1, ["cuda:1"])]:
        with mock.patch.object(torch.cuda, "is_available", return_value=True), \
                mock.patch.object(torch.cuda, "device_count", return_value=devices), \
                mock.patch.object(torch.cuda, "set_rng_state_all") as set_all:
            assert ckpt.restore_rng_state(opt["rng"], torch.device("cuda", device)) == missing
        (restored,), _ = set_all.call_args
        assert [s.tolist() for s in restored] == [s.tolist() for s in states[:devices]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_round_trip_on_a_gpu(tmp_path, tiny_config):
    torch.cuda.manual_seed_all(5)
    torch.rand(7, device="cuda")
    path = _training_save(tmp_path / "ck", _model(tiny_config))
    expected = torch.rand(5, device="cuda")
    torch.cuda.manual_seed_all(5)  # what train() does at its start: the state a resume must not keep
    _, opt = load_training_state(path)
    assert ckpt.restore_rng_state(opt["rng"], torch.device("cuda", torch.cuda.current_device())) == []
    assert torch.equal(torch.rand(5, device="cuda"), expected)


def test_a_checkpoint_from_before_the_rng_fields_still_loads(tmp_path, tiny_config):
    """Older checkpoints hold torch's CPU state only: it is restored, and a device whose generator is not in
    the checkpoint is named, so that train() can say the resumed losses will not match exactly."""
    path = _training_save(tmp_path / "ck", _model(tiny_config))
    expected = torch.rand(3)
    as_old_checkpoint(path)
    verify_checkpoint(path)
    _, opt = load_training_state(path)
    assert set(opt["rng"]) == {"torch"}
    assert ckpt.restore_rng_state(opt["rng"], torch.device("cpu")) == []
    assert torch.equal(torch.rand(3), expected)
    assert ckpt.restore_rng_state(opt["rng"], torch.device("cuda", 0)) == ["cuda:0"]


def test_loading_leaves_the_callers_random_state_alone(tmp_path, tiny_config):
    """load_checkpoint builds the model before loading its weights; that random init must not shift what the
    caller's next torch.rand (or dropout mask) would have been."""
    path = _training_save(tmp_path / "ck", _model(tiny_config))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(before)
    load_checkpoint(path)
    load_training_state(path)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(4), expected)


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
