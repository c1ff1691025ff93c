"""The book-scale models: the committed weights verify, and they are tied to the recipes that claim to make them.

The bad-input cases (a corrupted byte, a missing file, weights of a changed recipe) are tested on a tiny shipped
recipe in test_weights.py; here the real weights under weights/ are checked.
"""
from __future__ import annotations

import json
import sys

import pytest

from minimoe import weights, zoo
from minimoe.model import MiniLM

BOOK = zoo.shipped_recipes()


def test_the_book_family_is_registered():
    assert BOOK == sorted(n for base in zoo.BOOK_MODELS.values() for n in zoo.seed_names(base))
    assert len(zoo.SEEDS) >= 3
    for name in BOOK:
        r = zoo.recipe(name)
        assert r.corpus == "book" and r.model["max_seq_len"] >= 512 and r.train["seq_len"] >= 512


def test_equal_active_and_total_parameters():
    """Dense, softmax MoE and DeepSeekMoE do the same FFN arithmetic per token; the two MoEs store the same
    number of expert weights. Only the routers' d x n_experts weights differ (under 2% of the active count)."""
    models = {label: MiniLM(zoo.recipe(base).model_config()) for label, base in zoo.BOOK_MODELS.items()}
    active = {label: m.num_active_parameters() for label, m in models.items()}
    total = {label: m.num_parameters() for label, m in models.items()}
    for label in ("MoE", "DeepSeekMoE"):
        assert 1.0 <= active[label] / active["dense"] < 1.02, active
    assert abs(total["MoE"] / total["DeepSeekMoE"] - 1) < 0.01, total
    assert total["MoE"] > 2 * total["dense"]


@pytest.mark.parametrize("name", BOOK)
def test_committed_weights_verify(name):
    provenance = weights.verify_shipped(zoo.path(name), zoo.recipe(name))
    assert provenance["recipe_key"] == zoo.recipe(name).key()
    assert provenance["dtype"] in ("bfloat16", "float16")
    curve = provenance["loss_curve"]["train"]
    assert curve["step"][-1] == zoo.recipe(name).train["steps"]
    assert curve["loss"][-1] < curve["loss"][0] - 3  # it learned: ln(260) = 5.6 at the start


def test_shipped_weights_fit_the_repository():
    sizes = {f: f.stat().st_size for name in BOOK for f in zoo.path(name).iterdir()}
    assert max(sizes.values()) <= weights.MAX_FILE_BYTES
    assert sum(sizes.values()) <= weights.MAX_TOTAL_BYTES


def test_first_steps_retrain_to_the_recorded_curve():
    """The first 20 optimizer steps of book-dense, trained again now, give the losses its provenance records.

    The weights were trained on a 2-core x86 CPU in fp32 with one thread per run (provenance.json, "device"), and
    this test runs on the same kind of machine, so the only differences are the order in which a different
    thread count sums (around 1e-6 relative): rel_tol = 1e-4 is a hundred times that, and a thousand times
    smaller than the 8-24% that a changed learning rate, seed, batch or warm-up gives within 20 steps
    (weights.check_against_recipe). The corpus is this Python's standard library plus generated data, so the
    check needs the Python version the weights were trained with.
    """
    name = zoo.seed_names(zoo.BOOK_MODELS["dense"])[0]
    provenance = json.loads((zoo.path(name) / weights.PROVENANCE).read_text())
    trained_with = provenance["versions"]["python"]
    here = ".".join(map(str, sys.version_info[:2]))
    if not trained_with.startswith(here + "."):
        pytest.skip(f"{name} was trained with Python {trained_with}, whose standard library is its corpus; "
                    f"this is Python {here}")
    check = weights.check_against_recipe(zoo.path(name), zoo.recipe(name), steps=20, rel_tol=1e-4)
    assert check.ok, (check.max_rel_diff, check.recorded, check.recomputed)
