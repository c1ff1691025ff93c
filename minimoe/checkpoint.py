"""Checkpoints as folders: config.json + model.safetensors (+ trainer state), saved so that a crash cannot lose them.

Layout of a checkpoint folder:
    config.json          ModelConfig.to_json()
    model.safetensors    weights (a tied embedding stored once)
    trainer_state.json   step, history, data-sampler RNG state                  (training checkpoints only)
    optimizer.pt         optimizer + LR-scheduler state, every random generator (training checkpoints only)
    manifest.json        size and SHA-256 of every other file, written last

A save writes a hidden sibling folder, syncs it to disk and swaps it in with two renames (`atomic_folder`); after
a crash at any point, `load_checkpoint(path)` loads the old checkpoint or the new one. `manifest.json` makes a
truncated or edited file fail loudly on load instead of loading garbage, and tells a complete copy from a
half-written one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from .config import ModelConfig
from .model import MiniLM

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, corrupted or does not match the model."""


@contextlib.contextmanager
def atomic_folder(path: str | Path):
    """Yield a hidden sibling folder to write into; on success, add the manifest and swap the folder in at `path`.

    The save, step by step:
      1. tidy up after killed saves of `path` (see below);
      2. the block writes its files into `.NAME.tmp-XXXXXXXX`; each is fsync'd, then the manifest is written and
         fsync'd, then the folder itself (its entries): from here on the new copy is complete on disk;
      3. the old folder, if any, is renamed aside to `.NAME.old-XXXXXXXX` and the new one renamed to `path`;
      4. the parent folder is fsync'd, so the renames survive a power cut, and the old copy is deleted.

    The rule, after a crash at any point: `load_checkpoint(path)` loads the old checkpoint or the new one, never
    fails. Once the new one loads, it keeps loading. A first save (no old checkpoint) may leave no checkpoint,
    but only while no complete copy of the new one exists. The one moment `path` is missing, between the two
    renames of step 3, both complete copies sit beside it: every loader reads through `checkpoint_folder`, which
    then picks the new copy (the old one if the new is not complete), and the next save's step 1 renames that
    copy back into place and deletes every other leftover. An exception (rather than a crash) in the block or
    in a rename leaves the old checkpoint in place and nothing beside it.

    Why not a versioned folder behind a symlink, swapped with a single os.replace: the checkpoint would stop
    being a plain folder (copying, zipping or uploading it would carry a link; Windows needs privileges for
    symlinks), and the folders earlier versions saved could not be turned into a link in one atomic step.
    Two renames and a loader that knows the window between them give the same guarantee with a plain folder.
    One writer per path at a time (the zoo holds a lock; under DDP only the main process saves).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _tidy(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:  # on disk before the manifest that vouches for them
            _fsync(tmp / name)
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if path.exists():  # swap: the old folder stays complete until the new one is in place
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the new one failed to land: put the old checkpoint back
                raise
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
        _tidy(path)  # the old copy
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_folder(path: str | Path) -> Path:
    """The folder that holds the checkpoint saved at `path`: `path` itself, or, when a save was killed between
    its two renames (so that `path` is missing), the complete copy it left beside it (see atomic_folder)."""
    path = Path(path)
    if path.exists():
        return path
    return _surviving_copy(path) or path


def _siblings(path: Path) -> list[tuple[str, Path]]:
    """("tmp" or "old", folder) for each hidden folder that saves of `path` write in or set the old copy aside in."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    try:
        entries = list(path.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [(m.group(1), p) for p in entries if (m := pattern.fullmatch(p.name))]


def _surviving_copy(path: Path) -> Path | None:
    """With `path` missing: the complete copy a killed save left beside it, its new one before its old one (and
    of several, which only older versions could leave, the latest); None if there is none."""
    best = None
    for kind, folder in _siblings(path):
        try:
            _verify(folder)
        except CheckpointError:
            continue  # its save was killed before the manifest: not a checkpoint
        key = (kind == "tmp", (folder / MANIFEST).stat().st_mtime_ns)
        if best is None or key > best[0]:
            best = key, folder
    return None if best is None else best[1]


def _tidy(path: Path) -> None:
    """Finish what killed saves of `path` left: put the copy that loads back in place if `path` is missing, then
    delete every other leftover. Nothing that loads changes, at any point of this either."""
    if not path.exists():
        survivor = _surviving_copy(path)
        if survivor is not None:
            os.replace(survivor, path)
            _fsync(path.parent)
    for _, folder in _siblings(path):
        shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(path: str | Path, model: MiniLM, *, optimizer=None, scheduler=None,
                    trainer_state: dict | None = None) -> Path:
    """Write `model` (and optionally optimizer/scheduler/trainer state) to the folder `path`, atomically."""
    with atomic_folder(path) as tmp:
        model.config.to_json(tmp / "config.json")
        save_model(_unwrap(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if trainer_state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        if optimizer is not None:
            # "torch_rng" as well, so that older minimoe versions can still resume the checkpoint
            torch.save({"optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "rng": rng_state(), "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    return Path(path)


def verify_checkpoint(path: str | Path) -> dict:
    """Check the checkpoint against its manifest; return the manifest. Raises CheckpointError."""
    return _verify(checkpoint_folder(path))


def _verify(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    if not (path / MANIFEST).exists():
        raise CheckpointError(f"{path} is not a complete minimoe checkpoint (no {MANIFEST}; was the save "
                              "interrupted, or is this another format?)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path / MANIFEST} is corrupted (not valid JSON)") from None
    for name in ("config.json", "model.safetensors"):
        if name not in manifest:
            raise CheckpointError(f"{path} has no {name} in its manifest")
    for name, entry in manifest.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{path} is missing {name}")
        if f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"{f} is corrupted: its size or SHA-256 does not match {MANIFEST}")
    return manifest


def load_config(path: str | Path) -> ModelConfig:
    path = checkpoint_folder(path)
    try:
        return ModelConfig.from_json(path / "config.json")
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json") from None
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'} is not a valid ModelConfig: {e}") from None


def fresh_model(config: ModelConfig) -> MiniLM:
    """MiniLM(config) to load weights into. Its random init is about to be overwritten, so it runs under
    torch.random.fork_rng: the caller's next torch.rand (or dropout mask) is what it would have been. (Built on
    the CPU, whose generator is the only one the init draws from.)"""
    with torch.random.fork_rng(devices=[]):
        return MiniLM(config)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", model: MiniLM | None = None) -> MiniLM:
    """Load the model saved at `path`. With `model` given, load into it (its config must match)."""
    folder = checkpoint_folder(path)
    _verify(folder)
    config = load_config(folder)
    if model is None:
        model = fresh_model(config)
    elif model.config.to_dict() != config.to_dict():
        diff = sorted(k for k, v in config.to_dict().items() if model.config.to_dict().get(k) != v)
        raise CheckpointError(f"checkpoint {path} was saved for a different model config "
                              f"(fields that differ: {', '.join(diff)})")
    missing, unexpected = load_model(_unwrap(model), str(folder / "model.safetensors"), strict=False,
                                     device=str(torch.device(device) if device != "auto" else "cpu"))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device) if device != "auto" else model


def load_training_state(path: str | Path) -> tuple[dict, dict]:
    """(trainer_state, {"optimizer", "scheduler", "rng", "torch_rng"}) of a training checkpoint.

    "rng" is what rng_state() returned at the save. A checkpoint from before minimoe saved every generator holds
    torch's CPU generator only ("torch_rng"): its "rng" is {"torch": that state}."""
    path = checkpoint_folder(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        # weights_only=True: a checkpoint from elsewhere can never run code when loaded
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is a model-only checkpoint; it has no training state to resume from") from None
    opt.setdefault("rng", {"torch": opt["torch_rng"]})
    return state, opt


def rng_state() -> dict:
    """The state of every random generator a training run can draw from: the ones accelerate's save_state records.

    Python's `random`, NumPy's global generator, torch's CPU generator, each CUDA device's
    (torch.cuda.get_rng_state_all) and MPS's, where there are such devices. accelerate's save_state/load_state
    themselves do not fit: they write their own file layout, and load_state only logs a generator it could not
    restore. Everything here is a tensor or plain Python, so optimizer.pt still loads with weights_only=True.
    """
    numpy = np.random.get_state(legacy=False)
    numpy["state"]["key"] = torch.from_numpy(numpy["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _has_mps():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state: dict, device: str | torch.device | None = None) -> list[str]:
    """Set every generator `state` (from rng_state) holds. Returns the generators of `device` it holds none for
    (e.g. ["cuda:0"], from an older checkpoint or one saved without a GPU): they go on from where they are, so
    dropout on `device` will not continue the saved run's masks. A machine with fewer CUDA devices than the
    saving one restores those it has."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        numpy = {**state["numpy"], "state": dict(state["numpy"]["state"])}
        numpy["state"]["key"] = np.asarray(numpy["state"]["key"].numpy(), dtype=np.uint32)
        np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    cuda = torch.cuda.is_available()
    n_cuda = min(len(state.get("cuda", [])), torch.cuda.device_count()) if cuda else 0
    if n_cuda:
        torch.cuda.set_rng_state_all(state["cuda"][:n_cuda])
    if "mps" in state and _has_mps():
        torch.mps.set_rng_state(state["mps"])
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else (torch.cuda.current_device() if cuda else 0)
        return [] if index < n_cuda else [f"cuda:{index}"]
    if device.type == "mps" and not ("mps" in state and _has_mps()):
        return ["mps"]
    return []


def _has_mps() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _unwrap(model):
    """The MiniLM inside a DDP / accelerate / torch.compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (the files in it, what was renamed into it), to the disk.
    Windows cannot open a folder: there only files are synced."""
    if path.is_dir():
        if os.name != "posix":
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    with open(path, "rb") as f:
        os.fsync(f.fileno())
