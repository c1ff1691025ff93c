"""Tests for minimoe.evals: items are deterministic and held out, and the scoring maps an oracle to 10 and a
model without preferences to chance. Models here are tiny random MiniLMs or stubs whose logits we choose."""
from types import SimpleNamespace

import pytest
import torch

from minimoe import evals, synthetic
from minimoe.config import ModelConfig
from minimoe.data import GENERATED_EXAMPLES, ByteTokenizer, _unit_hash
from minimoe.evals import AXES, Item
from minimoe.model import MiniLM

N = 20
TOK = ByteTokenizer()


class StubModel(torch.nn.Module):
    """A "model" with chosen logits: zeros everywhere (no preference), except that a row starting with one of
    the ``favoured`` token sequences gets a large logit on each next token of that sequence."""

    def __init__(self, max_seq_len=64, favoured=()):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.favoured = [list(f) for f in favoured]

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, TOK.vocab_size)
        for r, row in enumerate(input_ids.tolist()):
            for f in self.favoured:
                if row[: len(f)] == f:
                    for t in range(len(f) - 1):
                        logits[r, t, f[t + 1]] = 30.0
        return SimpleNamespace(logits=logits)


def oracle(items, max_seq_len=64):
    """A stub that prefers exactly the correct candidate of every item (after the same left-truncation)."""
    return StubModel(max_seq_len, [TOK.encode(it.prompt + it.answer)[-max_seq_len:] for it in items])


@pytest.fixture(scope="module")
def items():
    return {axis: evals.axis_items(axis, N, seed=1) for axis in AXES}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return MiniLM(ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))


# -----------------------------------------------------------------------------
# items


@pytest.mark.parametrize("axis", AXES)
def test_items_deterministic_and_well_formed(items, axis):
    got = items[axis]
    assert len(got) == N
    assert got == evals.axis_items(axis, N, seed=1)  # same seed, same items
    for it in got:
        assert isinstance(it, Item) and len(it.candidates) == 4
        assert len(set(it.candidates)) == 4  # distinct
        assert 0 <= it.correct_index < 4 and it.answer == it.candidates[it.correct_index]
        assert it.prompt and all(c for c in it.candidates)


def test_seed_changes_items(items):
    assert evals.axis_items("reasoning", N, seed=2) != items["reasoning"]
    assert [it.correct_index for it in items["knowledge"]] != [0] * N  # answers are not always first


@pytest.mark.parametrize("domain, axis", [("arithmetic", "reasoning"), ("dialogue", "dialogue")])
def test_generated_items_are_held_out(items, domain, axis):
    train = [ex for ex in synthetic.GENERATORS[domain](GENERATED_EXAMPLES, 0)
             if _unit_hash(0, f"{domain}:{ex.key}") >= 0.05]
    assert train
    for it in items[axis]:
        assert _unit_hash(0, it.source) < 0.05  # the problem's source is on the validation side
        assert not any(ex.text.startswith(it.prompt) for ex in train)


def test_reasoning_and_dialogue_distractors_are_of_the_same_kind(items):
    for it in items["reasoning"]:
        if it.source.startswith("arithmetic:expr:"):
            assert all(c.startswith(" ") and c.strip().lstrip("-").isdigit() for c in it.candidates)
        else:
            assert all(c.strip() in synthetic._NAMES for c in it.candidates)
    for it in items["dialogue"]:
        slot = it.source.split("ask=")[1]
        pool = {"name": synthetic._NAMES, "city": synthetic._CITIES, "colour": synthetic._COLOURS}.get(slot)
        assert all(c.strip() in pool if pool else c.strip().isdigit() for c in it.candidates)


def test_knowledge_items_use_training_entities(items):
    kb = synthetic.knowledge_base(0)
    for it in items["knowledge"]:
        land = it.source.removeprefix("facts:")
        assert _unit_hash(0, it.source) >= 0.05  # a training-side kingdom
        assert it.prompt.startswith("Q:") and land in it.prompt
        assert it.answer.strip() in kb[land].values()
        attr = next(a for a, v in kb[land].items() if " " + v == it.answer)
        assert all(c.strip() in {e[attr] for e in kb.values()} for c in it.candidates)


@pytest.mark.parametrize("axis", ["language", "code"])
def test_cloze_and_code_come_from_validation_documents(items, axis):
    train, val = evals.suite._stdlib_sides()
    val_docs = {d.doc_id: d for d in val}
    train_ids = {d.doc_id for d in train}
    for it in items[axis]:
        assert it.source in val_docs and it.source not in train_ids
        doc = val_docs[it.source]
        assert doc.domain == ("prose" if axis == "language" else "code")
        assert it.prompt + it.answer in doc.text  # the true continuation is the document's own text
        if axis == "code":
            indent = {c[: len(c) - len(c.lstrip())] for c in it.candidates}
            assert len(indent) == 1 and all(c.endswith("\n") and c in doc.text for c in it.candidates)
            assert evals.line_parses(it.prompt, it.answer)


# -----------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("axis", ["reasoning", "code", "dialogue", "knowledge"])
def test_oracle_scores_ten(items, axis, monkeypatch):
    monkeypatch.setattr(evals.suite, "axis_items", lambda *a, **k: items[axis])
    r = evals.evaluate_axis(oracle(items[axis]), axis, n=N, seed=1)
    assert r.value == 1.0 and r.score == 10.0 and r.score_ci[1] == 10.0 and r.n == N
    assert r.chance == 0.25 and r.metric == "accuracy" and "1/k" in r.normalization


@pytest.mark.parametrize("axis", ["language", "dialogue", "knowledge"])
def test_model_without_preference_is_at_chance(axis):
    got = evals.axis_items(axis, 60, seed=3)
    scored = evals.score_items(StubModel(64), got)
    lo, hi = evals.wilson_interval(sum(scored["correct"]), scored["n"])
    assert lo <= 0.25 <= hi
    assert evals.mc_score(lo, 4) == 0.0


def test_score_items_counts_truncation():
    long = Item("x" * 100, (" a", " b"), 1)
    short = Item("y" * 10, (" a", " b"), 0)
    scored = evals.score_items(oracle([long, short], 32), [long, short], batch_size=1)
    assert scored["truncated"] == 1 and scored["accuracy"] == 1.0 and scored["choices"] == [1, 0]
    assert len(scored["logprobs"]) == 2 and scored["logprobs"][0][1] > scored["logprobs"][0][0]


def test_tiny_model_suite(tiny_model, tiny_data, monkeypatch):
    monkeypatch.setattr(evals.suite, "_prose_validation_set", lambda: tiny_data[1])
    results = evals.evaluate_suite(tiny_model, n=8, seed=0)
    assert tuple(results) == AXES
    for axis, r in results.items():
        assert r.axis == axis and 0.0 <= r.score_ci[0] <= r.score <= r.score_ci[1] <= 10.0
        assert 0.0 <= r.value_ci[0] <= r.value <= r.value_ci[1] <= 1.0 and r.n == 8
        assert 0 <= r.extra["truncated"] <= 8
    lang = results["language"].extra
    assert lang["bpb"] > 0 and lang["bpb_score"] == evals.bpb_score(lang["bpb"])
    assert 0 <= results["code"].extra["syntax_valid"] <= 1
    assert 0 <= results["dialogue"].extra["exact_match"] <= 1
    rows = evals.results_rows(results)
    assert [row["axis"] for row in rows] == list(AXES) and all("score" in row for row in rows)


# -----------------------------------------------------------------------------
# normalisations and arguments


def test_wilson_interval():
    lo, hi = evals.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert evals.wilson_interval(0, 10)[0] == 0.0 and evals.wilson_interval(10, 10)[1] == 1.0
    lo, hi = evals.wilson_interval(5, 10)
    assert lo + hi == pytest.approx(1.0)
    assert evals.wilson_interval(50, 100)[1] - evals.wilson_interval(50, 100)[0] < hi - lo  # narrower with n
    with pytest.raises(ValueError, match="successes"):
        evals.wilson_interval(11, 10)


def test_score_mappings():
    assert evals.bpb_score(8.0) == 0.0 and evals.bpb_score(1.0) == 10.0
    assert evals.bpb_score(4.5) == pytest.approx(5.0)
    assert evals.bpb_score(9.5) == 0.0 and evals.bpb_score(0.5) == 10.0  # clipped
    assert evals.mc_score(0.25, 4) == 0.0 and evals.mc_score(1.0, 4) == 10.0
    assert evals.mc_score(0.1, 4) == 0.0 and evals.mc_score(0.625, 4) == pytest.approx(5.0)
    assert evals.mc_score(0.75, 2) == pytest.approx(5.0)


def test_line_parses():
    assert evals.line_parses("def f(x):\n", "    y = x + 1\n")
    assert evals.line_parses("def f(x):\n", "    if x:\n")  # opens a block: checked with a `pass`
    assert not evals.line_parses("def f(x):\n", "    y = (x +\n")
    assert not evals.line_parses("    def f(self):\n        if x:\n", "        return 1\n")  # if needs a body


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="unknown axis 'math'.*language, reasoning, code, dialogue, knowledge"):
        evals.axis_items("math")
    with pytest.raises(ValueError, match="^n must"):
        evals.axis_items("reasoning", n=0)
    with pytest.raises(ValueError, match="^k must"):
        evals.evaluate_axis(tiny_model, "reasoning", n=5, k=1)
    with pytest.raises(ValueError, match="^n must"):
        evals.evaluate_suite(tiny_model, n=-1)
    with pytest.raises(ValueError, match="batch_size"):
        evals.score_items(tiny_model, [Item("a", (" b", " c"), 0)], batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        evals.score_items(tiny_model, [])


# -----------------------------------------------------------------------------
# a model's preference for an extreme value must not push the reasoning axis below chance


def test_reasoning_answers_take_every_rank_among_the_values_alike():
    """Symmetric near misses (answer +- 1, 2, ...) put the answer in the middle of the candidate values, so a model
    that always picks the smallest value scored 11 of 124 expression items (chance 31): below chance without
    knowing anything. The answer's rank among the values is now uniform."""
    got = evals.axis_items("reasoning", 400, seed=0)
    ranks = evals.suite.answer_value_ranks(got)
    assert len(ranks) > 150
    for r in range(4):
        share = ranks.count(r) / len(ranks)
        assert 0.17 < share < 0.33, (r, share)


@pytest.mark.parametrize("pick", [min, max])
def test_a_model_that_prefers_an_extreme_value_is_at_chance(pick):
    got = [it for it in evals.axis_items("reasoning", 400, seed=0) if it.source.startswith("arithmetic:expr:")]
    favoured = [pick(it.candidates, key=int) for it in got]
    stub = StubModel(512, [TOK.encode(it.prompt + c) for it, c in zip(got, favoured)])
    scored = evals.score_items(stub, got)
    assert scored["choices"] == [it.candidates.index(c) for it, c in zip(got, favoured)]  # the stub's preference
    lo, hi = evals.wilson_interval(sum(scored["correct"]), scored["n"])
    assert lo <= 0.25 <= hi, (sum(scored["correct"]), scored["n"])
