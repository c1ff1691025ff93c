"""Data for MiniMoE: a byte-level tokenizer, a built-in two-domain corpus, and batching.

The built-in corpus needs no download: it is the Python standard library that ships
with the interpreter. It has two "domains" with visibly different statistics, which is
exactly what we want for watching experts specialise:

* ``code``  - the source of every ``.py`` file in the stdlib (tests excluded);
* ``prose`` - the docstrings of those files, plus the reference-manual topics that
  ``pydoc`` ships in ``pydoc_data.topics``.

Everything is tokenized to raw UTF-8 bytes (vocab 256 + 4 special tokens), so there is
no tokenizer to train and bits-per-byte is trivial to compute.

Typical use::

    train, val = builtin_splits()
    x, y = train.sample_batch(32, 256, np.random.default_rng(0))   # [32, 256] each
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import os
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|sep|>")


# -----------------------------------------------------------------------------
# Tokenizer


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus the special tokens 256.. (bos=256, eos=257, pad=258, sep=259).

    A byte tokenizer has no training step and no unknown tokens: every string is
    representable, and one token is one byte, so loss in nats/token converts directly
    to bits-per-byte.
    """

    def __init__(self):
        self.n_bytes = 256
        self.special_tokens = SPECIAL_TOKENS
        self.bos_id, self.eos_id, self.pad_id, self.sep_id = range(256, 256 + len(SPECIAL_TOKENS))
        self.vocab_size = 256 + len(SPECIAL_TOKENS)  # 260

    def encode_array(self, text: str) -> np.ndarray:
        """text -> uint16 array [n_bytes] of byte ids (no special tokens)."""
        # One C-level pass instead of a Python loop per byte; uint16 so specials fit later.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """text -> list of ids, optionally wrapped in bos/eos."""
        ids = self.encode_array(text).tolist()
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def _as_array(self, ids) -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {self.vocab_size})")
        return arr

    def decode(self, ids) -> str:
        """ids (list/tuple/1-D tensor/array) -> text; special tokens are dropped.

        Model samples can end mid-character or be nonsense, so invalid UTF-8 is replaced
        with U+FFFD instead of raising.
        """
        arr = self._as_array(ids)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def count_bytes(self, ids) -> int:
        """Number of byte tokens (< 256) in ids: the denominator of bits-per-byte."""
        return int((self._as_array(ids) < 256).sum())

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, specials={self.special_tokens})"


# -----------------------------------------------------------------------------
# Corpora


@dataclass(frozen=True)
class Document:
    """One text. ``source`` decides the train/val split, so a file's code and its
    docstrings (same source, different domain) always land on the same side."""

    doc_id: str  # unique, e.g. "code:json/decoder.py", "prose:topic:assert"
    domain: str  # "code", "prose", or user-given
    text: str
    source: str  # the file/topic the text came from


# Directories never walked for the built-in corpus. Test suites are huge, repetitive and
# full of deliberately broken files; site-packages is not the stdlib. (lib2to3's test
# data lives under lib2to3/tests, covered by "tests".)
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_MAX_FILE_BYTES = 400_000  # e.g. pydoc_data/topics.py is one giant dict literal
_MIN_PROSE_CHARS = 200  # a file with a one-line docstring is not worth a prose document


def _docstrings(tree: ast.Module) -> list[str]:
    """Docstrings of a module and all its classes/functions, in source order."""
    out = []

    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and doc.strip():
                out.append(inspect.cleandoc(doc))
        # Only follow compound statements (if/for/try/with/match/def/class, all of which
        # have a .body): docstrings can't live in expressions or simple statements, and
        # skipping those is much faster than ast.walk over every node.
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(node, field, ()):
                if hasattr(child, "body"):
                    visit(child)

    visit(tree)
    return out


def _parse(text: str, filename: str) -> ast.Module | None:
    """ast.parse that returns None instead of raising on files we can't parse."""
    try:
        with warnings.catch_warnings():
            # Old stdlib files contain escapes like "\d" that newer Pythons warn about.
            warnings.simplefilter("ignore")
            return ast.parse(text, filename=filename)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def stdlib_corpus(stdlib_dir: str | None = None, max_files: int | None = None) -> list[Document]:
    """The built-in two-domain corpus: stdlib source ("code") and its docstrings ("prose").

    Files are sorted by relative path and ``max_files`` keeps the first N of them. The
    pydoc reference topics are always added to "prose" (they are already in memory and
    small, ~0.5 MB), so even a tiny ``max_files`` yields both domains.
    Returns code documents (file order), then file prose (file order), then topics (by name).
    """
    root = os.path.abspath(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not os.path.isdir(root):
        raise FileNotFoundError(f"stdlib directory not found: {root}")

    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                rel_paths.append(rel.replace(os.sep, "/"))  # same ids on every OS
    rel_paths.sort()

    code_docs, prose_docs = [], []
    n_kept = 0
    for rel in rel_paths:
        if max_files is not None and n_kept >= max_files:
            break
        path = os.path.join(root, rel)
        try:
            if os.path.getsize(path) > _MAX_FILE_BYTES:
                continue
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = text.removeprefix("\ufeff")  # a BOM is not content
        if not text.strip():
            continue  # empty __init__.py files add nothing but eos tokens
        n_kept += 1
        code_docs.append(Document(f"code:{rel}", "code", text, rel))

        tree = _parse(text, rel)
        if tree is None:
            continue  # unparsable files still count as code, just not as prose
        prose = "\n\n".join(_docstrings(tree))
        if len(prose) >= _MIN_PROSE_CHARS:
            prose_docs.append(Document(f"prose:{rel}", "prose", prose, rel))

    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; file prose still exists
        topics = {}
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            prose_docs.append(Document(f"prose:topic:{name}", "prose", text, f"topic:{name}"))

    return code_docs + prose_docs


def text_file_corpus(paths, domain: str = "text", suffixes=(".txt", ".md", ".py", ".rst")) -> list[Document]:
    """Your own data: files and/or directories (walked recursively) -> Documents.

    In directories only files ending in ``suffixes`` are read (hidden files/dirs and
    __pycache__ are skipped); a file named explicitly is always read. Files that are not
    valid UTF-8 or are blank are skipped. ``doc_id`` is "<domain>:<path>", ``source`` the path.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    suffixes = tuple(suffixes)

    files = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isfile(p):
            files.append(p)
        elif os.path.isdir(p):
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
                for name in filenames:
                    if name.endswith(suffixes) and not name.startswith("."):
                        found.append(os.path.join(dirpath, name))
            files.extend(sorted(found))
        else:
            raise FileNotFoundError(f"text_file_corpus: no such file or directory: {p!r}")

    docs, seen = [], set()
    for path in files:
        real = os.path.realpath(path)
        if real in seen:  # the same file reached through two arguments
            continue
        seen.add(real)
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8").removeprefix("\ufeff")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            name = path.replace(os.sep, "/")
            docs.append(Document(f"{domain}:{name}", domain, text, name))

    if not docs:
        raise ValueError(
            f"text_file_corpus found no usable text in {[os.fspath(p) for p in paths]} "
            f"(looked for non-empty UTF-8 files ending in {suffixes})"
        )
    return docs


# -----------------------------------------------------------------------------
# Train/validation split


def _unit_hash(seed: int, source: str) -> float:
    """Stable hash of (seed, source) -> [0, 1). Python's hash() is salted per process."""
    digest = hashlib.blake2b(f"{seed}:{source}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_documents(docs, val_fraction: float = 0.05, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val) by source, deterministically.

    A source goes to val iff its hash is < val_fraction, so the split does not depend on
    the order or number of other documents, and a file's code and docstrings never leak
    across. With >= 2 sources both sides are guaranteed non-empty; a single source always trains.
    """
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    docs = list(docs)
    h = {s: _unit_hash(seed, s) for s in {d.source for d in docs}}
    val_sources = {s for s, v in h.items() if v < val_fraction}
    if len(h) == 1:
        val_sources = set()  # nothing to hold out without leaving nothing to train on
    elif len(h) >= 2:
        # Tiny corpora: the hash may put everything on one side; move the nearest source over.
        if not val_sources:
            val_sources = {min(h, key=h.get)}
        elif len(val_sources) == len(h):
            val_sources.remove(max(h, key=h.get))
    train = [d for d in docs if d.source not in val_sources]
    val = [d for d in docs if d.source in val_sources]
    return train, val


# -----------------------------------------------------------------------------
# Tokenized dataset


def check_weights(weights: dict, field: str = "weights") -> None:
    """Mixture weights must be a non-empty {domain: finite number >= 0} with a positive sum."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"{field} must be a non-empty dict {{domain: weight}}, got {weights!r}")
    for k, w in weights.items():
        if not isinstance(k, str):
            raise ValueError(f"{field}: domain names must be strings, got {k!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)) \
                or not np.isfinite(w) or w < 0:
            raise ValueError(f"{field}: the weight of domain {k!r} must be a finite number >= 0, got {w!r}")
    if sum(float(w) for w in weights.values()) <= 0:
        raise ValueError(f"{field} are all zero: {weights}")


class TokenDataset:
    """Documents tokenized into one uint16 stream per domain, documents separated by eos.

    ``streams[domain]`` is ``doc_0 <eos> doc_1 <eos> ...``; a training window may cross a
    document boundary, and the eos tells the model that what follows is unrelated.
    """

    def __init__(self, docs, tokenizer: ByteTokenizer | None = None):
        self.tokenizer = tokenizer or ByteTokenizer()
        by_domain: dict[str, list[np.ndarray]] = {}
        for d in docs:
            if d.text:
                by_domain.setdefault(d.domain, []).append(self.tokenizer.encode_array(d.text))
        if not by_domain:
            raise ValueError("TokenDataset needs at least one non-empty document")
        streams = {}
        for domain, parts in by_domain.items():
            out = np.empty(sum(len(p) + 1 for p in parts), dtype=np.uint16)
            i = 0
            for p in parts:  # one copy per document, not per token
                out[i : i + len(p)] = p
                out[i + len(p)] = self.tokenizer.eos_id
                i += len(p) + 1
            streams[domain] = out
        self._set_streams(streams, {k: len(v) for k, v in by_domain.items()})

    @classmethod
    def from_streams(cls, streams: dict[str, np.ndarray], n_docs: dict[str, int] | None = None,
                     tokenizer: ByteTokenizer | None = None) -> "TokenDataset":
        """Build directly from already-tokenized streams (used by the disk cache)."""
        self = cls.__new__(cls)
        self.tokenizer = tokenizer or ByteTokenizer()
        self._set_streams({k: np.asarray(v, dtype=np.uint16) for k, v in streams.items()}, n_docs)
        return self

    def _set_streams(self, streams, n_docs):
        for arr in streams.values():
            arr.flags.writeable = False  # datasets are shared via lru_cache; keep them immutable
        self.streams: dict[str, np.ndarray] = dict(sorted(streams.items()))
        self.domains: list[str] = list(self.streams)
        self.n_docs: dict[str, int] = dict(n_docs) if n_docs is not None else {}

    def n_tokens(self, domain: str | None = None) -> int:
        """Tokens in one domain's stream (eos included), or in all of them."""
        if domain is None:
            return sum(len(s) for s in self.streams.values())
        return len(self._stream(domain))

    def _stream(self, domain: str) -> np.ndarray:
        if domain not in self.streams:
            raise ValueError(f"unknown domain {domain!r}; this dataset has {self.domains}")
        return self.streams[domain]

    def _check_window(self, domain: str, seq_len: int):
        n = len(self._stream(domain))
        if n < seq_len + 1:
            raise ValueError(
                f"domain {domain!r} has only {n} tokens, fewer than seq_len+1 = {seq_len + 1}; "
                f"use a shorter seq_len or more data"
            )

    def _probs(self, weights: dict[str, float] | None) -> np.ndarray:
        """Domain-sampling weights -> probabilities aligned with self.domains."""
        if weights is None:
            return np.full(len(self.domains), 1.0 / len(self.domains))
        check_weights(weights, "weights")
        for k in weights:
            if k not in self.streams:
                raise ValueError(f"unknown domain {k!r} in weights; this dataset has {self.domains}")
        p = np.array([float(weights.get(d, 0.0)) for d in self.domains])
        if p.sum() <= 0:
            raise ValueError(f"weights give zero probability to every domain of this dataset: {weights}")
        return p / p.sum()

    def mixture_weights(self, temperature: float = 1.0) -> dict[str, float]:
        """Temperature sampling: p(domain) proportional to (its tokens) ** (1 / temperature).

        temperature=1 samples in proportion to size (the "natural" mixture, dominated by the largest domain);
        larger temperatures flatten it towards uniform (mT5 used exponent 0.3, i.e. T of about 3.3).
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        sizes = np.array([len(self.streams[d]) for d in self.domains], dtype=np.float64)
        logp = np.log(sizes) / temperature
        p = np.exp(logp - logp.max())
        return {d: float(x) for d, x in zip(self.domains, p / p.sum())}

    def sample_batch(self, batch_size: int, seq_len: int, rng: np.random.Generator,
                     weights: dict[str, float] | None = None, return_domains: bool = False):
        """Random training windows -> (x, y), LongTensors [batch_size, seq_len], y[t] = x[t+1].

        Each row picks a domain (by ``weights``, normalized; missing domains get 0; default
        equal per domain, regardless of domain size), then a uniform window in that stream.
        return_domains=True adds a third LongTensor [batch_size]: each row's index in ``self.domains``
        (the task id of a task-routed model).
        """
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a np.random.Generator, e.g. np.random.default_rng(0)")
        p = self._probs(weights)
        for d, pd in zip(self.domains, p):
            if pd > 0:
                self._check_window(d, seq_len)
        dom = rng.choice(len(self.domains), size=batch_size, p=p)  # [B] domain index per row
        offsets = np.arange(seq_len + 1)
        windows = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for i, d in enumerate(self.domains):  # loop over domains, not tokens
            rows = np.flatnonzero(dom == i)
            if len(rows):
                stream = self.streams[d]
                starts = rng.integers(0, len(stream) - seq_len, size=len(rows))
                windows[rows] = stream[starts[:, None] + offsets]  # fancy-index gather [r, T+1]
        if return_domains:
            return (*self._xy(windows), torch.from_numpy(dom.astype(np.int64)))
        return self._xy(windows)

    @staticmethod
    def _xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Contiguous copies so callers can .view() them freely.
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1], dtype=np.int64))
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:], dtype=np.int64))
        return x, y

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                     domain: str | None = None, return_domains: bool = False) -> Iterator[tuple]:
        """Deterministic (x, y) batches of non-overlapping windows, domain by domain (sorted).

        Window k covers stream[k*seq_len : k*seq_len + seq_len + 1], so every token is a
        target exactly once. A batch never mixes domains; the last batch of a domain may
        have fewer than ``batch_size`` rows. ``max_batches`` caps the total (shared evenly
        between domains) and then takes windows evenly spaced through each stream, so a
        short evaluation still sees the whole stream rather than just its first files.
        return_domains=True adds each batch's domain index in ``self.domains`` (one per row, like
        ``sample_batch``).
        """
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        domains = self.domains if domain is None else [domain]
        for d in domains:  # validate now, not at the first next()
            self._check_window(d, seq_len)

        plan = []  # (domain, window indices)
        for i, d in enumerate(domains):
            n_win = (len(self.streams[d]) - 1) // seq_len
            k = n_win
            if max_batches is not None:
                budget = max_batches // len(domains) + (i < max_batches % len(domains))
                k = min(n_win, budget * batch_size)
            # floor(j * n/k) is strictly increasing for k <= n: distinct, spread-out windows
            idx = np.arange(k, dtype=np.int64) * n_win // max(k, 1)
            if k:
                plan.append((d, idx))
        return self._eval_iter(plan, batch_size, seq_len, return_domains)

    def _eval_iter(self, plan, batch_size, seq_len, return_domains=False):
        offsets = np.arange(seq_len + 1)
        for d, idx in plan:
            stream = self.streams[d]
            for b in range(0, len(idx), batch_size):
                starts = idx[b : b + batch_size] * seq_len
                xy = self._xy(stream[starts[:, None] + offsets].astype(np.int64))
                if return_domains:
                    xy = (*xy, torch.full((len(starts),), self.domains.index(d), dtype=torch.long))
                yield xy

    def __repr__(self) -> str:
        parts = ", ".join(f"{d}: {len(s):,} tokens" for d, s in self.streams.items())
        return f"TokenDataset({parts})"


# -----------------------------------------------------------------------------
# The built-in train/val datasets, cached in-process and on disk


_CACHE_FORMAT = 1  # bump when the corpus recipe changes so stale caches are ignored


def _cache_path(val_fraction, seed, max_files, name: str = "stdlib", extra=()) -> str:
    """~/.cache/minimoe/data/<key>.npz; the key covers everything the result depends on."""
    root = os.environ.get("MINIMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minimoe")
    recipe = repr((_CACHE_FORMAT, sys.version, sysconfig.get_paths()["stdlib"],
                   float(val_fraction), int(seed), max_files, *extra))
    key = hashlib.blake2b(recipe.encode(), digest_size=8).hexdigest()
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(root, "data", f"{name}-{py}-{key}.npz")


def _save_splits(path: str, splits: dict[str, TokenDataset]):
    arrays = {}
    for split, ds in splits.items():
        for d in ds.domains:
            arrays[f"{split}/{d}"] = ds.streams[d]
            arrays[f"{split}/{d}/n_docs"] = np.array(ds.n_docs.get(d, 0))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError as e:  # a read-only home dir must not break training
        warnings.warn(f"minimoe: could not write data cache {path}: {e}")


def _load_splits(path: str) -> dict[str, TokenDataset] | None:
    try:
        with np.load(path) as f:
            streams, n_docs = {}, {}
            for name in f.files:
                split, d, *rest = name.split("/")
                if rest:
                    n_docs.setdefault(split, {})[d] = int(f[name])
                else:
                    streams.setdefault(split, {})[d] = f[name]
    except (OSError, ValueError, KeyError):
        return None  # missing or corrupt cache: rebuild
    if set(streams) != {"train", "val"}:
        return None
    return {s: TokenDataset.from_streams(streams[s], n_docs.get(s)) for s in ("train", "val")}


@functools.lru_cache(maxsize=4)
def builtin_splits(val_fraction: float = 0.05, seed: int = 0,
                   max_files: int | None = None) -> tuple[TokenDataset, TokenDataset]:
    """(train, val) TokenDatasets of the stdlib corpus, split by source file.

    Cached in-process (notebooks call this repeatedly; the datasets are read-only) and on
    disk under $MINIMOE_CACHE (default ~/.cache/minimoe)/data, because parsing every
    stdlib file for docstrings takes several seconds while loading the arrays takes ~0.1 s.
    """
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    path = _cache_path(val_fraction, seed, max_files)
    cached = _load_splits(path) if os.path.exists(path) else None
    if cached is not None:
        return cached["train"], cached["val"]
    train_docs, val_docs = split_documents(stdlib_corpus(max_files=max_files), val_fraction, seed)
    train, val = TokenDataset(train_docs), TokenDataset(val_docs)
    _save_splits(path, {"train": train, "val": val})
    return train, val


# -----------------------------------------------------------------------------
# The five-domain corpus of chapter 2: the stdlib corpus, cleaned, plus three generated domains

GENERATED_EXAMPLES = 4000  # per generated domain; about 0.25-1.1 MB of text each


def _code_quality():
    from .cleaning import QualityFilter
    # Source code repeats lines ("return", "else:", "pass") by nature: the stdlib's most repetitive file,
    # bisect.py, repeats 46% of its lines, so code gets 0.5 instead of the prose default 0.3.
    return QualityFilter(max_duplicate_line_fraction=0.5)


def mixed_documents(n_generated: int = GENERATED_EXAMPLES, seed: int = 0, max_files: int | None = None,
                    progress: bool = False):
    """(documents, CleaningReport): the stdlib corpus after minimoe.cleaning.clean, then the generated
    arithmetic, dialogue and facts domains of minimoe.synthetic (generated clean, so not filtered)."""
    from .cleaning import QualityFilter, clean
    from .synthetic import synthetic_documents
    rules = {"code": _code_quality(), "prose": QualityFilter()}
    kept, report = clean(stdlib_corpus(max_files=max_files), rules=rules, progress=progress)
    return kept + synthetic_documents(n_per_domain=n_generated, seed=seed), report


@functools.lru_cache(maxsize=4)
def mixed_splits(val_fraction: float = 0.05, seed: int = 0, n_generated: int = GENERATED_EXAMPLES,
                 max_files: int | None = None) -> tuple[TokenDataset, TokenDataset]:
    """(train, val) of the five-domain corpus (code, prose, arithmetic, dialogue, facts), split by source so
    no generated problem and no stdlib file is on both sides; cached like builtin_splits."""
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    path = _cache_path(val_fraction, seed, max_files, name="mixed", extra=(n_generated,))
    cached = _load_splits(path) if os.path.exists(path) else None
    if cached is not None:
        return cached["train"], cached["val"]
    docs, _ = mixed_documents(n_generated, seed, max_files)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    train, val = TokenDataset(train_docs), TokenDataset(val_docs)
    _save_splits(path, {"train": train, "val": val})
    return train, val


# -----------------------------------------------------------------------------
# The corpus of the book-scale models (chapters 3, 4 and 6): the same five domains, more generated task data

# Examples per generated domain. Generators are prefix-stable, so the first GENERATED_EXAMPLES of each are the
# five-domain corpus's own, and every problem keeps its side of the split: the suite's held-out items stay held
# out and its knowledge items stay trained. Why these sizes: at the book models' budget (about 10M tokens, a
# quarter of them arithmetic) 40,000 arithmetic problems are each seen about once or twice, so the model learns
# the procedure rather than the answers; 16,000 facts examples state each of the 1,200 facts about 13 times
# per pass and are seen several passes, which is what recall needs; 16,000 chats (about 5 MB) are more than the
# dialogue share ever repeats.
BOOK_GENERATED = {"arithmetic": 40_000, "dialogue": 16_000, "facts": 16_000}


def book_documents(seed: int = 0, max_files: int | None = None, progress: bool = False):
    """(documents, CleaningReport): the cleaned stdlib corpus of mixed_documents plus BOOK_GENERATED examples of
    each generated domain (a superset of mixed_documents' generated examples)."""
    from .synthetic import synthetic_documents
    docs, report = mixed_documents(n_generated=1, seed=seed, max_files=max_files, progress=progress)
    docs = [d for d in docs if d.domain in ("code", "prose")]
    for domain, n in BOOK_GENERATED.items():
        docs += synthetic_documents(domains=(domain,), n_per_domain=n, seed=seed)
    return docs, report


@functools.lru_cache(maxsize=2)
def book_splits(val_fraction: float = 0.05, seed: int = 0,
                max_files: int | None = None) -> tuple[TokenDataset, TokenDataset]:
    """(train, val) of the book-scale corpus (book_documents), split by source like mixed_splits; cached."""
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    path = _cache_path(val_fraction, seed, max_files, name="book", extra=tuple(sorted(BOOK_GENERATED.items())))
    cached = _load_splits(path) if os.path.exists(path) else None
    if cached is not None:
        return cached["train"], cached["val"]
    docs, _ = book_documents(seed, max_files)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    train, val = TokenDataset(train_docs), TokenDataset(val_docs)
    _save_splits(path, {"train": train, "val": val})
    return train, val


CORPORA = {"stdlib": "builtin_splits", "mixed": "mixed_splits", "book": "book_splits"}  # name -> function here


def corpus_splits(name: str = "stdlib") -> tuple[TokenDataset, TokenDataset]:
    """The built-in corpus called `name`: "stdlib" (code and prose), "mixed" (five domains) or "book" (the five
    domains with more generated task data, for the book-scale models)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; built-in corpora: {', '.join(CORPORA)}")
    return globals()[CORPORA[name]]()  # looked up at call time, so tests can substitute a tiny corpus
