"""Shipped weights: book-scale models trained once, committed to the repository, and verified on every load.

The zoo's small models are cheap enough to train on first use (see zoo.py). A book-scale model is not: it is
trained once, by `minimoe zoo train NAME` (or `python scripts/train_book_models.py` for all of them), usually on
a GPU, and its weights are committed under weights/<recipe-name>/ in half precision:

    config.json          ModelConfig.to_json()
    model.safetensors    the weights in bf16 (or fp16); routers stay fp32, as MiniLM keeps them in any dtype
    provenance.json      what made them: the recipe and its key, git commit, versions, device, dtype, wall time,
                         tokens seen, the loss curve, and the size and SHA-256 of config.json and model.safetensors
    manifest.json        size and SHA-256 of the three files above (checkpoint.py's manifest, written last)

Loading (`load_shipped`, which zoo.load uses for a recipe with shipped=True) never trains: the folder must
exist, provenance.json must name the recipe's current key (weights of a changed recipe are refused), and every
file must match its hash. Any failure raises ShippedWeightsError naming the file and the command that retrains.
The folder is $MINIMOE_WEIGHTS if set, else weights/ at the root of the checkout minimoe is imported from: a
non-editable `pip install` copies the package without the weights, so there set MINIMOE_WEIGHTS to a checkout's
weights/ folder (or work from a checkout).

Hashes prove the files are the ones trained; `check_against_recipe` ties them to the recipe itself, by training
the recipe's first steps again and comparing the losses with the recorded curve.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model

from . import __version__
from .checkpoint import (CheckpointError, _sha256, _unwrap, atomic_folder, checkpoint_folder, load_checkpoint,
                         restore_rng_state, rng_state, verify_checkpoint)
from .data import corpus_splits
from .device import device_name, resolve_device
from .train import train

PROVENANCE = "provenance.json"
REQUIRED = ("config.json", "model.safetensors")
# GitHub warns about files over 50 MiB and refuses them over 100 MiB; decimal megabytes stay under both
MAX_FILE_BYTES = 50_000_000
MAX_TOTAL_BYTES = 100_000_000   # every shipped folder together
HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# The train-row fields the loss curve keeps (routing statistics such as max_vio are kept when present)
CURVE_TRAIN_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "seconds", "max_vio")
CURVE_EVAL_FIELDS = ("step", "val_loss", "val_bpb", "val_loss_by_domain", "val_max_vio")


class ShippedWeightsError(ValueError):
    """Shipped weights that are missing, corrupted, or were trained for another recipe."""


def weights_dir() -> Path:
    """Where shipped weights live: $MINIMOE_WEIGHTS, else weights/ beside the minimoe package (a checkout's)."""
    env = os.environ.get("MINIMOE_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "weights"


def shipped_path(name: str) -> Path:
    """The folder that holds the shipped weights of recipe `name`."""
    return weights_dir() / name


def retrain_hint(name: str) -> str:
    return (f"retrain with `minimoe zoo train {name} --force` (every book-scale model: "
            "`python scripts/train_book_models.py --force`)")


# ---- writing ----


def write_shipped(path: str | Path, model, recipe, history: dict, *, device, wall_time_s: float,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save `model`, trained by `recipe` with `history` (TrainResult.history), as shipped weights at `path`.

    The weights are cast to `dtype` (bf16 or fp16) in a copy; `model` itself is left alone. The folder is written
    atomically (checkpoint.atomic_folder): a failed or killed save leaves the old weights in place. Raises
    ShippedWeightsError, before anything is swapped in, if a file would exceed MAX_FILE_BYTES or the shipped
    folders beside `path` would together exceed MAX_TOTAL_BYTES.
    """
    dtype_name = next((n for n, d in HALF_DTYPES.items() if d == dtype), None)
    if dtype_name is None:
        raise ValueError(f"shipped weights are stored in half precision (torch.bfloat16 or torch.float16), "
                         f"got {dtype}")
    if not history.get("train"):
        raise ValueError("the history has no training steps: write_shipped expects TrainResult.history")
    path = Path(path)
    half = copy.deepcopy(_unwrap(model)).to(dtype)
    with atomic_folder(path) as tmp:
        half.config.to_json(tmp / "config.json")
        save_model(half, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in REQUIRED}
        _check_sizes(path, files)
        provenance = {
            "format": 1,
            "recipe_name": recipe.name,
            "recipe_key": recipe.key(),
            "recipe": dataclasses.asdict(recipe),
            "git": git_state(),
            "versions": versions(),
            "device": device_name(device),
            "dtype": dtype_name,
            "parameters": half.num_parameters(),
            "wall_time_s": float(wall_time_s),
            "tokens_seen": int(history["train"][-1]["tokens"]),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "loss_curve": {"train": _columns(history["train"], CURVE_TRAIN_FIELDS),
                           "eval": _columns(history.get("eval", []), CURVE_EVAL_FIELDS)},
            "training": {k: history[k] for k in ("train_config", "mixture", "domain_tokens", "throughput")
                         if k in history},
            "files": files,
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=1))
    return path


def _check_sizes(path: Path, files: dict) -> None:
    for name, entry in files.items():
        if entry["bytes"] > MAX_FILE_BYTES:
            raise ShippedWeightsError(f"{path / name} would be {entry['bytes'] / 1e6:.1f} MB, over the "
                                      f"{MAX_FILE_BYTES / 1e6:.0f} MB limit for one committed file; ship a smaller "
                                      "model")
    total = shipped_bytes(path.parent, exclude=path.name) + sum(e["bytes"] for e in files.values())
    if total > MAX_TOTAL_BYTES:
        raise ShippedWeightsError(f"with {path.name}, the shipped weights in {path.parent} would take "
                                  f"{total / 1e6:.1f} MB, over the {MAX_TOTAL_BYTES / 1e6:.0f} MB limit for all "
                                  "of them together")


def shipped_bytes(root: str | Path, exclude: str | None = None) -> int:
    """Bytes of every shipped folder (one with a provenance.json) directly under `root`, except `exclude`."""
    root = Path(root)
    if not root.is_dir():
        return 0
    return sum(f.stat().st_size for d in root.iterdir()
               if d.is_dir() and d.name != exclude and (d / PROVENANCE).is_file()
               for f in d.iterdir() if f.is_file())


def _columns(rows: list[dict], fields: tuple[str, ...]) -> dict:
    """[{"step": 1, "loss": 5.5}, ...] -> {"step": [1, ...], "loss": [5.5, ...]}: compact in JSON."""
    present = [f for f in fields if any(f in row for row in rows)]
    return {f: [row.get(f) for row in rows] for f in present}


def _rows(columns: dict) -> list[dict]:
    n = len(next(iter(columns.values()), []))
    return [{f: values[i] for f, values in columns.items()} for i in range(n)]


def git_state(root: str | Path | None = None) -> dict | None:
    """{"commit", "dirty", "changed"} of the git checkout minimoe runs from; None outside one (or without git).

    "changed" lists the paths `git status` reports, except under weights/ (which training itself rewrites);
    "dirty" is whether there are any, i.e. whether the commit alone does not describe the code that ran.
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60,
                              check=True).stdout

    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != root.resolve():
            return None  # minimoe is installed inside some other repository (e.g. a venv in one)
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return None
    changed = [line[3:] for line in status.splitlines() if line[3:] and not line[3:].startswith("weights/")]
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:50]}


def versions() -> dict:
    """Versions of Python, minimoe and the installed packages the weights depend on."""
    out = {"python": platform.python_version(), "minimoe": __version__}
    for package in ("torch", "safetensors", "accelerate", "numpy", "transformers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass  # not installed: not recorded
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


# ---- reading ----


def verify_shipped(path: str | Path, recipe) -> dict:
    """Check the shipped weights at `path` against `recipe` and their hashes; return their provenance.

    Raises ShippedWeightsError, naming the file at fault and how to retrain, when the folder or provenance.json
    is missing or unreadable, when the provenance was written for another recipe key (the recipe changed since
    the weights were trained), or when a file it lists is missing or does not match its size and SHA-256
    (and, through manifest.json, when provenance.json itself was edited).
    """
    folder = checkpoint_folder(path)
    hint = retrain_hint(recipe.name)
    if not folder.is_dir():
        raise ShippedWeightsError(f"no shipped weights for {recipe.name!r} at {folder}; {hint}")
    record = folder / PROVENANCE
    try:
        provenance = json.loads(record.read_text())
        key, files = provenance["recipe_key"], provenance["files"]
        listed = {name: (entry["bytes"], entry["sha256"]) for name, entry in files.items()}
    except FileNotFoundError:
        raise ShippedWeightsError(f"{record} is missing, so nothing ties the weights in {folder} to recipe "
                                  f"{recipe.name!r}; {hint}") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ShippedWeightsError(f"{record} is corrupted ({type(e).__name__}: {e}); {hint}") from None
    if key != recipe.key():
        changed = _recipe_diff(provenance.get("recipe", {}), dataclasses.asdict(recipe))
        raise ShippedWeightsError(f"{record} says the weights were trained for recipe key {key}, but recipe "
                                  f"{recipe.name!r} now has key {recipe.key()} (changed: {changed}); {hint}")
    for name in REQUIRED:
        if name not in listed:
            raise ShippedWeightsError(f"{record} does not list {name}; {hint}")
    for name, (size, sha256) in listed.items():
        f = folder / name
        if not f.is_file():
            raise ShippedWeightsError(f"{f} is missing (listed in {PROVENANCE}); {hint}")
        if f.stat().st_size != size or _sha256(f) != sha256:
            raise ShippedWeightsError(f"{f} is corrupted: its size or SHA-256 does not match {PROVENANCE}; {hint}")
    try:
        verify_checkpoint(folder)  # manifest.json: catches an edited provenance.json
    except CheckpointError as e:
        raise ShippedWeightsError(f"{e}; {hint}") from None
    return provenance


def _recipe_diff(old: dict, new: dict) -> str:
    """"train.steps 20 -> 21, corpus stdlib -> mixed" for the recipe fields that differ."""
    out = []
    for part in ("model", "train", "corpus"):
        a, b = old.get(part), new.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{part}.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{part} {a!r} -> {b!r}")
    return ", ".join(out) or "no model, train or corpus field; the key's definition"


def load_shipped(path: str | Path, recipe, device="cpu", dtype: torch.dtype | None = torch.float32):
    """(model, provenance) from the shipped weights at `path`, after verify_shipped. Never trains.

    device: where to put the model ("auto": CUDA, then MPS, then CPU). dtype: the model's dtype (default fp32,
    the weights widened exactly); None keeps the stored half dtype.
    """
    provenance = verify_shipped(path, recipe)
    folder = checkpoint_folder(path)
    try:
        model = load_checkpoint(folder, device="cpu")
    except CheckpointError as e:
        raise ShippedWeightsError(f"{e}; {retrain_hint(recipe.name)}") from None
    built, saved = recipe.model_config().to_dict(), model.config.to_dict()
    if built != saved:
        fields = ", ".join(sorted(k for k in set(built) | set(saved) if built.get(k) != saved.get(k)))
        raise ShippedWeightsError(f"{folder / 'config.json'} differs from the model recipe {recipe.name!r} builds "
                                  f"with this minimoe (fields: {fields}); {retrain_hint(recipe.name)}")
    dtype = HALF_DTYPES[provenance["dtype"]] if dtype is None else dtype
    return model.to(device=resolve_device(device), dtype=dtype).eval(), provenance


def shipped_history(provenance: dict) -> dict:
    """The training history recorded in `provenance`, in TrainResult.history's shape ("train" and "eval" rows)."""
    curve = provenance["loss_curve"]
    return {**provenance.get("training", {}), "train": _rows(curve["train"]), "eval": _rows(curve["eval"])}


# ---- tied to the recipe ----


@dataclass
class CurveCheck:
    steps: int
    recorded: list[float]     # the first `steps` training losses in provenance.json
    recomputed: list[float]   # the same steps trained again from the recipe
    max_abs_diff: float
    max_rel_diff: float       # max |recomputed - recorded| / recorded
    rel_tol: float
    ok: bool                  # max_rel_diff <= rel_tol


def check_against_recipe(path: str | Path, recipe, steps: int = 20, rel_tol: float = 0.02,
                         device="cpu") -> CurveCheck:
    """Train the recipe's first `steps` optimizer steps again and compare their losses with the recorded curve.

    The hashes prove the files are the ones written; this proves they came from this recipe: the same model,
    data, seed, learning rate and schedule (the run stops after `steps` of the full recipe, so the LR schedule
    is the recipe's own). A curve copied from another run, or from a recipe with another learning rate, batch or
    architecture, differs by far more than the tolerance within a few dozen steps.

    Retraining on the device the weights were trained on (same torch, same precision) repeats the losses
    (in the tests, exactly), so rel_tol can be tiny there (1e-5). Across devices it cannot: other kernels sum in
    another order, and under bf16 autocast each matmul input is rounded to 8 significant bits (0.4%). The
    default rel_tol = 2% (the largest relative difference over the `steps` compared) is for weights trained
    on a GPU in bf16 and checked on a CPU. Measured on the CPU with a 2-layer, 32-wide model over 20 steps:
    bf16 autocast against fp32 differed by at most 0.02%, while half or 1.5x the learning rate, another seed,
    twice the batch or twice the warm-up differed by 8% to 24% at their worst step. GPU against CPU was not
    measured here; 2% leaves a hundredfold margin over that rounding and stays four times under the smallest
    recipe change measured. Compare at least 20 steps: the first loss is about ln(256) for any byte model.

    The data come from recipe.corpus on this machine; the "stdlib" corpus is this Python's standard library, so
    run the check with the Python version in provenance["versions"]. Leaves the caller's random state alone.
    """
    provenance = verify_shipped(path, recipe)
    recorded = provenance["loss_curve"]["train"]["loss"][:steps]
    if len(recorded) < steps:
        raise ValueError(f"{path} records {len(recorded)} training losses, fewer than steps={steps}")
    caller = rng_state()
    try:
        result = train(recipe.model_config(), recipe.train_config(device=device), data=corpus_splits(recipe.corpus),
                       stop_after=steps, progress=False)
    finally:
        restore_rng_state(caller)
    recomputed = [row["loss"] for row in result.history["train"]]
    abs_diff = [abs(a - b) for a, b in zip(recomputed, recorded)]
    rel_diff = [d / abs(b) if b else (math.inf if d else 0.0) for d, b in zip(abs_diff, recorded)]
    max_rel = max(rel_diff, default=0.0)
    return CurveCheck(steps=steps, recorded=recorded, recomputed=recomputed, max_abs_diff=max(abs_diff, default=0.0),
                      max_rel_diff=max_rel, rel_tol=rel_tol, ok=max_rel <= rel_tol)
