"""Tests for minimoe.synthetic: every answer is re-derived from the text by an independent checker."""
import re
from collections import defaultdict

import pytest

from minimoe.data import _unit_hash, split_documents
from minimoe.synthetic import (
    GENERATORS, Example, _FACT_TEMPLATES, arithmetic_examples, facts_examples,
    held_out_examples, knowledge_base, synthetic_documents,
)

DOMAINS = tuple(GENERATORS)


@pytest.fixture(scope="module")
def examples():
    return {d: GENERATORS[d](400, seed=3) for d in DOMAINS}


# -----------------------------------------------------------------------------
# shape of every example


@pytest.mark.parametrize("domain", DOMAINS)
def test_example_structure(examples, domain):
    for ex in examples[domain]:
        assert isinstance(ex, Example) and ex.domain == domain
        assert ex.text.startswith(ex.prompt + ex.answer) and ex.text.endswith("\n")
        assert ex.answer.startswith(" ") and ex.answer.strip() and "\n" not in ex.answer
        assert ex.text.isascii() and 40 <= len(ex.text) <= 400, ex.text
        assert ex.key and ex.prompt.startswith(ex.question)
        assert ex.question.endswith(("A:", "Bot:")) or domain == "facts"


@pytest.mark.parametrize("domain", DOMAINS)
def test_deterministic_prefix_stable_and_seeded(domain):
    gen = GENERATORS[domain]
    a = gen(150, seed=5)
    assert a == gen(150, seed=5)
    assert gen(40, seed=5) == a[:40]  # held_out_examples relies on this
    assert [e.text for e in gen(150, seed=6)] != [e.text for e in a]


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", None, True])
def test_bad_n(domain, bad):
    with pytest.raises(ValueError, match="n must"):
        GENERATORS[domain](bad)


@pytest.mark.parametrize("domain", ["arithmetic", "dialogue"])
def test_key_is_canonical_and_varied(domain):
    exs = GENERATORS[domain](2000)
    answers = defaultdict(set)
    for ex in exs:
        answers[ex.key].add(ex.answer)
    assert all(len(a) == 1 for a in answers.values())  # one problem, one answer
    assert len(answers) > 0.9 * len(exs)


# -----------------------------------------------------------------------------
# correctness, checked independently of the generators


_STEP = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\.")
_CLUE = re.compile(r"(\w+) is (\w+) than (\w+)\.")
_MORE = {"taller": "tallest", "older": "oldest", "faster": "fastest", "heavier": "heaviest"}
_LESS = {"shorter": "shortest", "younger": "youngest", "slower": "slowest", "lighter": "lightest"}


def _check_expression(ex, expr):
    n_ops = sum(expr.count(op) for op in (" + ", " - ", " * "))  # operands are positive: no unary minus
    assert 2 <= n_ops <= 4
    result = eval(expr)  # the expression holds only ints and + - *
    assert ex.answer == f" {result}" and ex.text.endswith(f" So the answer is {result}.\n")
    steps = _STEP.findall(ex.text.split("\nA:")[1])
    assert len(steps) == n_ops
    for a, op, b, r in steps:
        assert eval(f"{a} {op} ({b})") == int(r)
    assert int(steps[-1][3]) == result


def _check_comparison(ex):
    question = re.search(r"Who is the (\w+)\?", ex.prompt).group(1)
    above = defaultdict(set)  # name -> names ranked above it (more <relation>)
    names = set()
    for a, rel, b in _CLUE.findall(ex.prompt.split("Who is")[0]):
        hi, lo = (a, b) if rel in _MORE else (b, a)
        assert rel in _MORE or rel in _LESS
        above[lo].add(hi)
        names |= {a, b}
    below = defaultdict(set)
    for lo, his in above.items():
        for hi in his:
            below[hi].add(lo)
    ranked_by = above if question in _MORE.values() else below
    winners = [x for x in names if not ranked_by[x]]
    assert winners == [ex.answer.strip()]
    assert ex.text.endswith(f"So the answer is {winners[0]}.\n")


def test_arithmetic_answers(examples):
    kinds = defaultdict(int)
    for ex in examples["arithmetic"]:
        m = re.match(r"Q: ([-+* \d]+) = \?\nA:", ex.prompt)
        if m:
            _check_expression(ex, m.group(1))
            assert ex.key == f"expr:{m.group(1)}"
            kinds["expr"] += 1
        else:
            _check_comparison(ex)
            kinds["cmp"] += 1
    assert kinds["expr"] > 150 and kinds["cmp"] > 80


def test_arithmetic_precedence_example():
    ex = next(e for e in arithmetic_examples(300) if re.match(r"Q: \d+ [-+] \d+ \* \d+ [-+] \d+ = \?", e.text))
    nums = [int(x) for x in re.findall(r"\d+", ex.question)]
    assert ex.text.split("\nA: ")[1].startswith(f"{nums[1]} * {nums[2]} = {nums[1] * nums[2]}.")


_DIALOGUE_RULES = [  # (pattern, slot, how the match updates the state)
    (r"(?:My name is|I'm|Call me|call me) (\w+)\.", "name", lambda s, m: m[0]),
    (r"(?:I live in|My home is in|I just moved to) (\w+)\.", "city", lambda s, m: m[0]),
    (r"(?:favourite colour is|I love the colour) (\w+)\.", "colour", lambda s, m: m[0]),
    (r"I (?:have|own) (\d+) (\w+)\.", "count", lambda s, m: int(m[0])),
    (r"I bought (\d+) more (\w+)\.", "count", lambda s, m: s + int(m[0])),
    (r"I gave (\d+) of my (\w+) away\.", "count", lambda s, m: s - int(m[0])),
]
_DIALOGUE_QUESTIONS = {"What is my name?": "name", "Where do I live?": "city",
                       "What is my favourite colour?": "colour"}
_DIALOGUE_CUES = {"name": "Your name is", "city": "You live in", "count": "You have",
                  "colour": "Your favourite colour is"}


def test_dialogue_answers_match_tracked_state(examples):
    n_updated = 0
    for ex in examples["dialogue"]:
        lines = ex.text.rstrip("\n").split("\n")
        assert [ln.split(":")[0] for ln in lines] == ["User", "Bot"] * (len(lines) // 2)
        assert 3 <= len(lines) // 2 - 1 <= 5  # opening + 2-4 fillers (update included), then the question
        user = [ln[len("User: "):] for ln in lines[::2]]
        state, item = {}, None
        for turn in user[:-1]:
            for pattern, slot, update in _DIALOGUE_RULES:
                for m in re.findall(pattern, turn):
                    m = m if isinstance(m, tuple) else (m,)
                    n_updated += slot in state
                    state[slot] = update(state.get(slot), m)
                    item = m[1] if slot == "count" else item
        question = user[-1]
        how_many = re.fullmatch(r"How many (\w+) do I have\?", question)
        slot = "count" if how_many else _DIALOGUE_QUESTIONS[question]
        assert not how_many or how_many.group(1) == item
        assert ex.answer == f" {state[slot]}", ex.text
        assert ex.prompt.endswith("\nBot: " + _DIALOGUE_CUES[slot])
    assert n_updated > 100  # about half the dialogues change a fact midway


def test_facts_answers_match_knowledge_base(examples):
    kb = knowledge_base(seed=3)
    seen = defaultdict(set)
    for ex in examples["facts"]:
        assert ex.key in kb
        matches = [(attr, rest) for attr, templates in _FACT_TEMPLATES.items() for prompt, rest in templates
                   if prompt.format(e=ex.key) == ex.prompt]
        assert len(matches) == 1, ex.prompt
        attr, rest = matches[0]
        assert ex.answer == " " + kb[ex.key][attr]
        assert ex.text == ex.prompt + ex.answer + rest
        seen[ex.key, attr].add(ex.answer)
    assert all(len(v) == 1 for v in seen.values())  # the same fact never changes value
    assert len({k for k, _ in seen}) > 100


def test_knowledge_base():
    kb = knowledge_base(seed=1)
    assert kb == knowledge_base(seed=1) and kb != knowledge_base(seed=2)
    assert len(kb) == 200 and len(knowledge_base(1, n_entities=30)) == 30
    capitals = [v["capital"] for v in kb.values()]
    assert len(set(capitals)) == 200 and not set(capitals) & set(kb)
    assert sorted(int(v["rank"][:-2]) for v in kb.values()) == list(range(1, 201))
    assert {v["rank"][-2:] for v in kb.values() if v["rank"][:-2] in ("1", "2", "3", "11", "12", "13", "22")} \
        == {"st", "nd", "rd", "th"}
    for name, facts in kb.items():
        assert name.isascii() and name.isalpha() and name[0].isupper()
        assert set(facts) == set(_FACT_TEMPLATES) and 1000 <= int(facts["year"]) <= 1899
    for bad in (0, -1, 2.0, 10_000):
        with pytest.raises(ValueError, match="n_entities"):
            knowledge_base(0, bad)


def test_facts_repeat_entities_with_default_size():
    exs = facts_examples(2000)
    assert len({e.key for e in exs}) == 200
    assert facts_examples(50, n_entities=5) and len({e.key for e in facts_examples(50, n_entities=5)}) <= 5


# -----------------------------------------------------------------------------
# documents, split, held-out examples


def test_synthetic_documents_and_split():
    docs = synthetic_documents(n_per_domain=2000, seed=0)
    assert len(docs) == 6000 and len({d.doc_id for d in docs}) == 6000
    assert {d.domain for d in docs} == set(DOMAINS)
    for d, ex in zip(docs[:2000], arithmetic_examples(2000, seed=0)):
        assert (d.doc_id, d.text, d.source) == (f"arithmetic:{d.doc_id.split(':')[1]}", ex.text, f"arithmetic:{ex.key}")
    train, val = split_documents(docs)
    assert {d.source for d in train}.isdisjoint({d.source for d in val})
    assert not {d.text for d in val} & {d.text for d in train}
    assert {d.domain for d in val} == set(DOMAINS)
    assert 0.02 < len(val) / len(docs) < 0.09


def test_synthetic_documents_bad_domains():
    with pytest.raises(ValueError, match=r"'poetry'.*arithmetic.*dialogue.*facts"):
        synthetic_documents(("arithmetic", "poetry"), n_per_domain=5)
    with pytest.raises(ValueError, match="twice"):
        synthetic_documents(("facts", "facts"), n_per_domain=5)
    assert {d.domain for d in synthetic_documents("facts", n_per_domain=5)} == {"facts"}
    with pytest.raises(ValueError, match="n must"):
        synthetic_documents(n_per_domain=0)


@pytest.mark.parametrize("domain", DOMAINS)
def test_held_out_examples_are_never_trained_on(domain):
    held = held_out_examples(domain, 30, seed=0)
    assert len(held) == 30 and held == held_out_examples(domain, 30, seed=0)
    assert all(_unit_hash(0, f"{domain}:{e.key}") < 0.05 for e in held)
    train, _ = split_documents(synthetic_documents((domain,), n_per_domain=1000, seed=0))
    assert not {f"{domain}:{e.key}" for e in held} & {d.source for d in train}
    assert not {e.text for e in held} & {d.text for d in train}
    other = held_out_examples(domain, 10, seed=0, val_fraction=0.2, split_seed=1)
    assert all(_unit_hash(1, f"{domain}:{e.key}") < 0.2 for e in other)


def test_held_out_examples_bad_arguments():
    with pytest.raises(ValueError, match="poetry"):
        held_out_examples("poetry", 5)
    with pytest.raises(ValueError, match="n must"):
        held_out_examples("facts", 0)
    with pytest.raises(ValueError, match="val_fraction"):
        held_out_examples("facts", 5, val_fraction=1.5)
