"""Named recipes, trained on first use and cached, so every notebook reuses the same models.

    from minimoe import zoo
    entry = zoo.load("dense-tiny")        # trains (about a minute on 2 CPU cores) or loads from the cache
    entry.model, entry.history

The cache lives in $MINIMOE_CACHE (default ~/.cache/minimoe)/zoo/<name>-<key>/, where <key> hashes the
recipe, the minimoe version and the Python version (the built-in corpus is that Python's standard library),
so changing any of them trains afresh instead of silently reusing a stale model.

A recipe with shipped=True is a book-scale model: too big to train on first use, so it is trained once
(`minimoe zoo train NAME`, usually on a GPU) and its weights are committed under weights/NAME/ (see weights.py).
zoo.load checks those files against their hashes and the recipe, and never trains: missing or stale weights are
an error that says how to retrain them.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import __version__, weights
from .checkpoint import (CheckpointError, checkpoint_folder, load_checkpoint, load_training_state,
                         restore_rng_state, rng_state, verify_checkpoint)
from .config import ModelConfig
from .data import CORPORA, corpus_splits
from .train import TrainConfig, train


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model: dict   # ModelConfig fields
    train: dict   # TrainConfig fields
    corpus: str = "stdlib"  # a built-in corpus of minimoe.data.CORPORA
    shipped: bool = False   # book-scale: trained once, weights committed under weights/<name> (see weights.py)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({**self.model, "extra": {"recipe": self.name}})

    def train_config(self, device: str = "auto") -> TrainConfig:
        return TrainConfig.from_dict({**self.train, "device": device})

    def key(self) -> str:
        """12 hex digits of a hash of what makes the model: model and train fields, corpus, minimoe and Python.

        A shipped recipe's key is the recipe alone: its committed weights stay valid across minimoe releases
        and on every reader's Python (provenance.json records the versions they were trained with).
        """
        if self.shipped:
            blob = json.dumps({"model": self.model, "train": self.train, "corpus": self.corpus, "shipped": True},
                              sort_keys=True)
            return hashlib.sha256(blob.encode()).hexdigest()[:12]
        fields = {"model": self.model, "train": self.train, "minimoe": __version__, "python": sys.version.split()[0]}
        if self.corpus != "stdlib":  # keeps the keys (and caches) of the stdlib recipes as they were
            fields["corpus"] = self.corpus
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"a recipe named {recipe.name!r} is already registered")
    recipe.model_config(), recipe.train_config()  # validate now, not at first training
    if not isinstance(recipe.shipped, bool):
        raise ValueError(f"recipe {recipe.name!r}: shipped must be True or False, got {recipe.shipped!r}")
    if recipe.corpus not in CORPORA:
        raise ValueError(f"recipe {recipe.name!r}: unknown corpus {recipe.corpus!r}; built-in: {', '.join(CORPORA)}")
    RECIPES[recipe.name] = recipe
    return recipe


register(Recipe(
    name="dense-tiny",
    description="4-layer, 256-wide Llama-style byte-level model, 400 steps x 2048 tokens on the built-in corpus",
    model=dict(d_model=256, n_layers=4, n_heads=4, max_seq_len=256),
    train=dict(steps=400, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=40, eval_every=50,
               eval_batches=8, seed=0),
))


# ---- chapter 1: a small DeepSeekMoE (fine-grained + shared experts), its balancing study and task routing ----
# 16 routed experts of width 32, 4 per token, plus one shared expert; the first layer stays dense as in
# DeepSeek-V3. Every variant trains for the same 300 steps x 1024 tokens, with three seeds each.
MOE_TINY = dict(d_model=64, n_layers=3, n_heads=4, max_seq_len=128, n_experts=16, top_k=4, moe_d_ff=32,
                n_shared_experts=1, router="deepseek", first_dense_layers=1)
MOE_TINY_TRAIN = dict(steps=300, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=30, eval_every=50,
                      eval_batches=8)
SEEDS = (0, 1, 2)
# balancing method -> (recipe base name, ModelConfig changes). gamma = 0.005 was chosen from a sweep over
# {0.1, 0.03, 0.01, 0.005} on these runs (chapter 1, "DeepSeekMoE"); the aux-loss alpha = 0.01 was not tuned.
BALANCING = {
    "bias": ("moe-tiny", dict(bias_update_speed=0.005)),
    "aux-loss": ("moe-tiny-aux-loss", dict(bias_update_speed=0.0, aux_loss_coef=0.01)),
    "none": ("moe-tiny-unbalanced", dict(bias_update_speed=0.0)),
}
TASK_ROUTED = ("moe-tiny-task", dict(router="task", n_tasks=2, bias_update_speed=None))


def seed_names(base: str) -> list[str]:
    """The recipe names of `base` trained with each of SEEDS: base, base-s1, base-s2."""
    return [base if seed == 0 else f"{base}-s{seed}" for seed in SEEDS]


for _base, _changes, _what in [
        *((b, c, f"balancing: {m}") for m, (b, c) in BALANCING.items()),
        (*TASK_ROUTED, "task-routed: code and prose each own 8 of the 16 experts")]:
    for _seed, _name in zip(SEEDS, seed_names(_base)):
        register(Recipe(
            name=_name,
            description=f"3-layer 64-wide DeepSeekMoE (16 experts, top-4, 1 shared), {_what}, seed {_seed}",
            model={**MOE_TINY, **_changes},
            train={**MOE_TINY_TRAIN, "seed": _seed},
        ))


# ---- chapter 2: data mixtures, LR schedules, batch size, and dense against MoE at equal active parameters ----
# The mixture and schedule studies use a dense model of MOE_TINY's shape on the five-domain corpus; every run
# sees the same 600 x 1024 tokens (at 300 steps these models are still leaving the plateau where the loss
# stalls, and the seed-to-seed spread is several times larger). eval_batches = 20 gives each of the five
# domains 4 validation batches.
SMALL = dict(d_model=64, n_layers=3, n_heads=4, max_seq_len=128)
SMALL_TRAIN = {**MOE_TINY_TRAIN, "steps": 600, "warmup_steps": 60, "eval_every": 100, "eval_batches": 20}
MIXTURES = {  # name -> how domains are sampled
    "natural": dict(mixture_temperature=1.0),   # in proportion to size: mostly stdlib code
    "T=3": dict(mixture_temperature=3.0),       # flattened, as multilingual models sample languages
    "uniform": dict(),                          # every domain equally (TrainConfig's default)
}
SCHEDULE_RUNS = {"cosine": "mix-uniform", "linear": "sched-linear", "step": "sched-step",
                 "exponential": "sched-exponential"}  # the cosine run is the uniform-mixture run
BATCH_RUNS = {1024: "mix-uniform", 4096: "batch-4k"}  # tokens per step -> run; both see 614,400 tokens
# Dense against MoE at equal active parameters: the uniform-mixture dense model (SwiGLU width 192) against
# moe-tiny's layout with top-5 routing, so that 5 routed + 1 shared experts of width 32 are 192 wide too. The
# MoE's only extra active weights are its two routers (2 x 64 x 16 = 2,048, +1.2%).
DENSE_VS_MOE = {"dense": "mix-uniform", "MoE": "moe-mixed"}
MOE_MIXED = {**MOE_TINY, "top_k": 5, "bias_update_speed": BALANCING["bias"][1]["bias_update_speed"]}


def _register_seeds(base, model, train_, corpus, what):
    for seed, name in zip(SEEDS, seed_names(base)):
        register(Recipe(name=name, description=f"{what}, seed {seed}", model=model,
                        train={**train_, "seed": seed}, corpus=corpus))


for _m, _how in MIXTURES.items():
    _register_seeds(f"mix-{_m.lower().replace('=', '')}", SMALL, {**SMALL_TRAIN, **_how}, "mixed",
                    f"3-layer 64-wide dense model, five-domain corpus, {_m} mixture")
for _s, _name in SCHEDULE_RUNS.items():
    if _name.startswith("sched-"):
        _register_seeds(_name, SMALL, {**SMALL_TRAIN, "schedule": _s}, "mixed",
                        f"3-layer 64-wide dense model, five-domain corpus, uniform mixture, {_s} LR schedule")
_register_seeds(BATCH_RUNS[4096], SMALL, {**SMALL_TRAIN, "steps": 150, "warmup_steps": 15, "eval_every": 25,
                                          "batch_tokens": 4096}, "mixed",
                "3-layer 64-wide dense model, five-domain corpus, 4,096-token batches by 4x accumulation")
_register_seeds(DENSE_VS_MOE["MoE"], MOE_MIXED, SMALL_TRAIN, "mixed",
                "3-layer 64-wide DeepSeekMoE (16 experts, top-5, 1 shared), five-domain corpus, uniform mixture")


# ---- chapter 3: a plain (Switch / Mixtral-style) MoE beside chapter 2's dense and DeepSeekMoE models ----
# 8 experts of width 64, top-3, no shared expert, a softmax router with the Switch auxiliary loss: 192 units of
# expert width per token as in the dense model; active parameters 177,856 (+0.6% for the routers).
MOE_PLAIN = {**MOE_TINY, "router": "softmax", "n_experts": 8, "moe_d_ff": 64, "top_k": 3, "n_shared_experts": 0,
             "aux_loss_coef": 0.01}
EVAL_MODELS = {"dense": "mix-uniform", "MoE": "moe-plain", "DeepSeekMoE": "moe-mixed"}  # label -> recipe base
_register_seeds(EVAL_MODELS["MoE"], MOE_PLAIN, SMALL_TRAIN, "mixed",
                "3-layer 64-wide MoE (8 experts, top-3, softmax router, Switch aux loss), five-domain corpus")


# ---- chapter 6: dense against DeepSeekMoE at three widths, same tokens, same recipe ----
# Width d, 3 layers, 16-wide heads; the dense SwiGLU is 3d wide, the MoE has 16 experts of width d/2, 5 routed + 1
# shared per token (3d active), as in chapter 2's pair, which is the middle point (d = 64) and is reused.
SCALING_WIDTHS = (32, 64, 96)


def _scaled(d: int, moe: bool) -> dict:
    model = {**SMALL, "d_model": d, "n_heads": d // 16, "d_ff": 3 * d}
    return {**MOE_MIXED, **model, "moe_d_ff": d // 2} if moe else model


SCALING = {family: {d: (DENSE_VS_MOE[family] if d == 64 else f"scale-{family.lower()}-{d}") for d in SCALING_WIDTHS}
           for family in ("dense", "MoE")}
for _family, _runs in SCALING.items():
    for _d, _base in _runs.items():
        if _d != 64:
            _register_seeds(_base, _scaled(_d, _family == "MoE"), SMALL_TRAIN, "mixed",
                            f"3-layer {_d}-wide {'DeepSeekMoE' if _family == 'MoE' else 'dense'} model, "
                            "five-domain corpus, uniform mixture (scaling study)")


# ---- book scale (chapters 3, 4 and 6): models big enough to do the tasks the suite measures ----
# Trained once (scripts/train_book_models.py) and shipped under weights/ (shipped=True): a dense model, a softmax
# top-2 MoE and a DeepSeekMoE at equal active and equal total parameters, three seeds each, on the "book" corpus
# (the five domains with more generated task data, data.BOOK_GENERATED) at a 512-byte context, which holds every
# suite item whole. Every layer of both MoEs is sparse; per token each has 3d units of FFN width active like the
# dense model (softmax: 2 of 8 experts 1.5d wide; DeepSeekMoE: 5 of 23 routed experts d/2 wide plus one shared
# expert d/2 wide) and 12d in all. Why d = 96, 4 layers and 1,000 steps of 8,192 tokens (8.2M tokens): the CPU
# that trains them (2 cores, one run per core) has about 20 minutes per run, and a sweep at equal CPU time
# (scripts/book_sweep.py, records in book/03-evaluation/book-sweep/) put the 96-wide model ahead of the 128-wide
# one on validation loss (1.286 against 1.309 after 300 s each), as the compute-optimal rule of about 20 tokens
# per parameter predicts at this budget (0.5M parameters x 8.2M tokens, against 0.9M x 6M for d = 128).
BOOK_MIX = {"arithmetic": 0.25, "dialogue": 0.2, "facts": 0.25, "code": 0.2, "prose": 0.1}
BOOK_TRAIN = dict(batch_size=16, seq_len=512, lr=3e-3, warmup_steps=50, eval_every=100, eval_batches=10,
                  domain_weights=BOOK_MIX)


def book_model(d: int, family: str, n_layers: int = 4) -> dict:
    """ModelConfig fields of a book-scale model of width d: family "dense", "MoE" or "DeepSeekMoE"."""
    model = dict(d_model=d, n_layers=n_layers, n_heads=max(1, d // 32), max_seq_len=512, d_ff=3 * d)
    if family == "MoE":
        model.update(n_experts=8, top_k=2, moe_d_ff=3 * d // 2, router="softmax", aux_loss_coef=0.01)
    elif family == "DeepSeekMoE":
        model.update(n_experts=23, top_k=5, moe_d_ff=d // 2, n_shared_experts=1, router="deepseek",
                     bias_update_speed=0.001)
    elif family != "dense":
        raise ValueError(f"family must be 'dense', 'MoE' or 'DeepSeekMoE', got {family!r}")
    return model


BOOK_WIDTH, BOOK_STEPS = 96, 1000
BOOK_MODELS = {"dense": "book-dense", "MoE": "book-moe", "DeepSeekMoE": "book-dsmoe"}  # label -> recipe base
for _label, _base in BOOK_MODELS.items():
    for _seed, _name in zip(SEEDS, seed_names(_base)):
        register(Recipe(
            name=_name,
            description=(f"book scale: 4-layer {BOOK_WIDTH}-wide {_label} model, context 512, "
                         f"{BOOK_STEPS} steps x 8,192 tokens on the book corpus, seed {_seed}"),
            model=book_model(BOOK_WIDTH, _label),
            train={**BOOK_TRAIN, "steps": BOOK_STEPS, "warmup_steps": 50, "seed": _seed},
            corpus="book", shipped=True))


@dataclass
class ZooEntry:
    name: str
    model: "object"
    history: dict
    path: Path


def cache_dir() -> Path:
    return Path(os.environ.get("MINIMOE_CACHE", Path.home() / ".cache" / "minimoe"))


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def path(name: str) -> Path:
    """The recipe's cache folder; for a shipped recipe, its folder of committed weights."""
    r = recipe(name)
    if r.shipped:
        return weights.shipped_path(r.name)
    return cache_dir() / "zoo" / f"{r.name}-{r.key()}"


def results_dir(name: str) -> Path:
    """Where measurements of the trained model `name` are cached (suite scores, quantized evaluations).

    A cached recipe's own folder; for a shipped recipe a folder under cache_dir()/shipped named after the recipe
    and the hash of its weights, so the committed weights folder stays exactly as trained and retrained weights
    never meet the old weights' results.
    """
    r = recipe(name)
    if not r.shipped:
        return path(name)
    provenance = json.loads((path(name) / weights.PROVENANCE).read_text())
    sha = provenance["files"]["model.safetensors"]["sha256"][:12]
    folder = cache_dir() / "shipped" / f"{r.name}-{r.key()}-{sha}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def is_cached(name: str) -> bool:
    """True when the cache holds the recipe trained to its last step (a shipped recipe: its weights verify)."""
    r = recipe(name)
    if r.shipped:
        try:
            weights.verify_shipped(path(name), r)
            return True
        except weights.ShippedWeightsError:
            return False
    return _trained_steps(path(name)) >= r.train["steps"]


def load(name: str, device: str = "cpu", train_if_missing: bool = True, progress: bool = True) -> ZooEntry:
    """The trained zoo model `name` (training it first if it is not cached).

    A shipped recipe is loaded from its committed weights once they verify (weights.load_shipped), in fp32; it
    is never trained here, whatever train_if_missing says: weights.ShippedWeightsError says how to retrain.
    """
    r = recipe(name)
    folder = path(name)
    if r.shipped:
        model, provenance = weights.load_shipped(folder, r, device=device)
        return ZooEntry(name=name, model=model, history=weights.shipped_history(provenance), path=folder)
    with _lock(folder):
        if not is_cached(name):
            if not train_if_missing:
                raise FileNotFoundError(f"zoo model {name!r} is not cached at {folder}; run `minimoe zoo train {name}`")
            _train(name, folder, progress)
        model = load_checkpoint(folder, device=device)
        state, _ = load_training_state(folder)
    model.eval()
    return ZooEntry(name=name, model=model, history=state["history"], path=folder)


def train_recipe(name: str, force: bool = False, progress: bool = True, device: str = "auto") -> Path:
    """Train `name` into the cache (again, with force=True). Shipped recipes: see train_shipped."""
    if recipe(name).shipped:
        raise ValueError(f"{name!r} is a shipped (book-scale) recipe: its weights are committed, not cached; "
                         f"train them with `minimoe zoo train {name}` (zoo.train_shipped)")
    folder = path(name)
    with _lock(folder):
        if force or not is_cached(name):
            _train(name, folder, progress, device)
    return folder


def _train(name: str, folder: Path, progress: bool, device: str = "auto") -> None:
    r = recipe(name)
    tc = r.train_config(device=device)
    # an interrupted earlier training of the same recipe resumes where its last checkpoint stopped
    resume = 0 < _trained_steps(folder) < tc.steps
    # train() seeds torch, and a resume sets every generator to its checkpoint's: give the caller's random state
    # back, so that what a notebook draws after zoo.load does not depend on whether the cache was warm
    caller = rng_state()
    try:
        train(r.model_config(), tc, data=corpus_splits(r.corpus), out_dir=folder, resume=resume, progress=progress)
    finally:
        restore_rng_state(caller)


def shipped_recipes() -> list[str]:
    """The names of the shipped (book-scale) recipes, sorted."""
    return sorted(n for n, r in RECIPES.items() if r.shipped)


def train_shipped(name: str, force: bool = False, device: str = "auto", progress: bool = True) -> Path:
    """Train the shipped recipe `name` from scratch and write its weights and provenance to path(name).

    Refuses (FileExistsError) to replace weights that are there unless force=True. The weights are written in
    bf16 (weights.write_shipped), atomically: an interrupted or failed run leaves the old ones. Leaves the
    caller's random state alone. Returns the folder, whose files are then ready to commit.
    """
    r = recipe(name)
    if not r.shipped:
        raise ValueError(f"{name!r} is not a shipped recipe; train it into the cache with zoo.train_recipe "
                         f"(`minimoe zoo train {name}`)")
    folder = path(name)
    if checkpoint_folder(folder).exists() and not force:
        raise FileExistsError(f"{folder} already holds weights for {name!r}; pass force=True "
                              f"(`minimoe zoo train {name} --force`) to train them again and replace them")
    caller = rng_state()
    try:
        start = time.perf_counter()
        result = train(r.model_config(), r.train_config(device=device), data=corpus_splits(r.corpus),
                       progress=progress)
        wall_time_s = time.perf_counter() - start
    finally:
        restore_rng_state(caller)
    return weights.write_shipped(folder, result.model, r, result.history,
                                 device=next(result.model.parameters()).device, wall_time_s=wall_time_s)


def train_book(force: bool = False, device: str = "auto", progress: bool = True) -> dict[str, Path | None]:
    """Train every shipped recipe whose weights are missing (all of them with force=True).

    Returns {name: folder written, or None where verified weights were already there}. Weights that are there
    but fail verification stop the call before anything trains: replace them with force=True.
    """
    todo = []
    for name in shipped_recipes():
        if force or not checkpoint_folder(path(name)).exists():
            todo.append(name)
        else:
            weights.verify_shipped(path(name), recipe(name))  # raises, naming the file and the fix
    return {name: train_shipped(name, force=force, device=device, progress=progress) if name in todo else None
            for name in shipped_recipes()}


def _trained_steps(folder: Path) -> int:
    """Optimizer steps done by the valid checkpoint in `folder`; 0 if there is none."""
    try:
        verify_checkpoint(folder)
        state, _ = load_training_state(folder)
        return int(state["step"])
    except (CheckpointError, KeyError):
        return 0


def available() -> list[dict]:
    return [{"name": n, "description": r.description, "cached": is_cached(n), "path": str(path(n)),
             "shipped": r.shipped} for n, r in sorted(RECIPES.items())]


@contextmanager
def _lock(folder: Path):
    """One trainer per recipe at a time, across processes (e.g. nbval and a book build running together)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
