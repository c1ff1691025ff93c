"""Checkpoints as folders: config.json + model.safetensors (+ trainer state), written atomically.

Layout of a checkpoint folder:
    config.json          ModelConfig.to_json()
    model.safetensors    weights (a tied embedding stored once)
    trainer_state.json   step, history, data-sampler RNG state          (training checkpoints only)
    optimizer.pt         optimizer + LR-scheduler state, torch RNG     (training checkpoints only)
    manifest.json        size and SHA-256 of every other file, written last

Everything is first written to a hidden sibling folder and then renamed into place, so a crash mid-save
leaves either the old checkpoint or the new one, never a half-written folder that loads. `manifest.json`
makes a truncated or edited file fail loudly on load instead of loading garbage.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .config import ModelConfig
from .model import MiniLM

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, corrupted or does not match the model."""


@contextlib.contextmanager
def atomic_folder(path: str | Path):
    """Yield a hidden sibling folder to write into; on success, add the manifest and rename it to `path`.

    A crash (or an exception in the block) leaves the old folder, or none, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in tmp.iterdir():
            _fsync(p)
        if path.exists():  # swap: the old folder stays complete until the new one is in place
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the new one failed to land: put the old checkpoint back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(path: str | Path, model: MiniLM, *, optimizer=None, scheduler=None,
                    trainer_state: dict | None = None) -> Path:
    """Write `model` (and optionally optimizer/scheduler/trainer state) to the folder `path`, atomically."""
    with atomic_folder(path) as tmp:
        model.config.to_json(tmp / "config.json")
        save_model(_unwrap(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if trainer_state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    return Path(path)


def verify_checkpoint(path: str | Path) -> dict:
    """Check the folder against its manifest; return the manifest. Raises CheckpointError."""
    path = Path(path)
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
    path = Path(path)
    try:
        return ModelConfig.from_json(path / "config.json")
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json") from None
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'} is not a valid ModelConfig: {e}") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", model: MiniLM | None = None) -> MiniLM:
    """Load the model saved at `path`. With `model` given, load into it (its config must match)."""
    verify_checkpoint(path)
    path = Path(path)
    config = load_config(path)
    if model is None:
        model = MiniLM(config)
    elif model.config.to_dict() != config.to_dict():
        diff = sorted(k for k, v in config.to_dict().items() if model.config.to_dict().get(k) != v)
        raise CheckpointError(f"checkpoint {path} was saved for a different model config "
                              f"(fields that differ: {', '.join(diff)})")
    missing, unexpected = load_model(_unwrap(model), str(path / "model.safetensors"), strict=False,
                                     device=str(torch.device(device) if device != "auto" else "cpu"))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device) if device != "auto" else model


def load_training_state(path: str | Path) -> tuple[dict, dict]:
    """(trainer_state, {"optimizer", "scheduler", "torch_rng"}) of a training checkpoint."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        # weights_only=True: a checkpoint from elsewhere can never run code when loaded
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is a model-only checkpoint; it has no training state to resume from") from None
    return state, opt


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
    with open(path, "rb") as f:
        os.fsync(f.fileno())
