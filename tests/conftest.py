"""Shared fixtures: a tiny model config, a tiny two-domain dataset and a short training config.

Everything here is sized for a 2-core CPU: a test that trains uses a 2-layer, 32-wide model for a handful
of steps on a few KB of generated text, never the built-in corpus.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from minimoe.config import ModelConfig
from minimoe.data import Document, TokenDataset
from minimoe.train import TrainConfig

# Tiny models gain nothing from a second intra-op thread, and on a shared 2-core machine torch's spinning
# worker threads make every kernel dozens of times slower whenever another process is busy.
torch.set_num_threads(int(os.environ.get("MINIMOE_TEST_THREADS", "1")))

_WORDS = ("the model reads every byte of text and learns which byte comes next so a small network "
          "can still see structure in language when it trains for long enough on clean data").split()
_NAMES = ("x", "y", "total", "value", "items", "count", "result", "key", "node", "data")


def make_prose(seed: int, n_bytes: int = 3000) -> str:
    """English-like sentences from a fixed word list (deterministic for a seed)."""
    rng = random.Random(seed)
    out, n = [], 0
    while n < n_bytes:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 12))]
        sentence = " ".join(words).capitalize() + ". "
        out.append(sentence)
        n += len(sentence)
    return "".join(out)


def make_code(seed: int, n_bytes: int = 3000) -> str:
    """Python-like functions (deterministic for a seed)."""
    rng = random.Random(seed)
    out, n = [], 0
    while n < n_bytes:
        a, b, c = rng.sample(_NAMES, 3)
        fn = (f"def f_{rng.randint(0, 99)}({a}, {b}):\n"
              f"    {c} = {a} + {b} * {rng.randint(1, 9)}\n"
              f"    for i in range({rng.randint(2, 20)}):\n"
              f"        {c} += i\n"
              f"    return {c}\n\n")
        out.append(fn)
        n += len(fn)
    return "".join(out)


def make_docs(n_per_domain: int = 3, n_bytes: int = 3000, seed: int = 0) -> list[Document]:
    docs = []
    for i in range(n_per_domain):
        docs.append(Document(f"code:gen{i}.py", "code", make_code(seed * 100 + i, n_bytes), f"gen{i}.py"))
        docs.append(Document(f"prose:gen{i}.txt", "prose", make_prose(seed * 100 + i, n_bytes), f"gen{i}.txt"))
    return docs


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)


@pytest.fixture(scope="session")
def tiny_data() -> tuple[TokenDataset, TokenDataset]:
    """(train, val): ~18 KB of train text and ~3 KB of val text, domains "code" and "prose".

    val has two documents per domain, so eos separators are among its evaluation targets.

    TokenDatasets are read-only (their streams are not writeable), so one pair is shared by the session.
    """
    train = TokenDataset(make_docs(n_per_domain=3, n_bytes=3000, seed=0))
    val = TokenDataset(make_docs(n_per_domain=2, n_bytes=800, seed=1))
    return train, val


@pytest.fixture
def tiny_train_config() -> TrainConfig:
    return TrainConfig(steps=6, batch_size=4, seq_len=32, eval_every=3, eval_batches=2, warmup_steps=2,
                       device="cpu", lr=1e-2)


@pytest.fixture
def text_makers():
    """(make_code, make_prose): generators of deterministic code-like and English-like text."""
    return make_code, make_prose


@pytest.fixture
def without_book_recipes(monkeypatch):
    """zoo.RECIPES without the registered shipped (book-scale) recipes, so that a test's own tiny shipped recipe
    is the only one `zoo train --scale book`, zoo.train_book and `zoo verify` see (and nothing real trains)."""
    from minimoe import zoo
    monkeypatch.setattr(zoo, "RECIPES", {n: r for n, r in zoo.RECIPES.items() if not r.shipped})
