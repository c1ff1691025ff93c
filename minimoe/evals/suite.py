"""A five-axis capability suite: language, reasoning, code, dialogue and knowledge, scored 0-10.

The article compares model families on a "radar" of five capabilities. Our models are tiny byte-level networks,
far too weak to be graded on free-form answers, so every axis is measured first by **multiple choice by
likelihood**: an item is a prompt, the correct continuation and K-1 distractors of the same kind; the model picks
the candidate whose bytes get the highest total log-probability after the prompt. This needs no generation, works
for any model that gives next-byte probabilities, and has a known chance level, 1/K.

Every item is held out from training *by construction*, and deterministic from a seed:

* ``language``  - (a) bits per byte on the validation prose of the five-domain corpus and (b) a cloze test on
  sentences of validation-side stdlib docstrings (files the model never trained on);
* ``reasoning`` - validation-side arithmetic and comparison-chain problems (``synthetic.held_out_examples``);
* ``code``      - next-line prediction inside functions of validation-side stdlib files;
* ``dialogue``  - validation-side multi-turn chats: recall the asked value;
* ``knowledge`` - the opposite on purpose: recall facts about kingdoms the model *did* train on (knowledge is
  memorised, so asking about held-out kingdoms would measure guessing); the questions use the generator's own
  question templates.

Scores. With accuracy ``acc`` and chance ``c = 1/K``, an axis scores ``10 * max(0, (acc - c) / (1 - c))``: 0 is
what a model that guesses gets on average, 10 is a perfect score, and the scale is linear in the number of items
answered correctly above chance, so two models' scores compare like their "excess" accuracies. Raw accuracy would
not compare across K (25% is chance at K=4 but good at K=10), which is why it is normalised. The 95% Wilson
interval of ``acc`` is mapped through the same formula (Wilson, not acc +- 1.96 SE, because it stays inside [0, 1]
and behaves at acc near 0 or 1 and for small n).

Typical use::

    results = evaluate_suite(model, n=200)               # {axis: AxisResult}
    rows = results_rows(results)                         # list of dicts, one per axis, for a table
"""

from __future__ import annotations

import ast
import functools
import math
import random
import re
import textwrap
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import synthetic
from ..data import GENERATED_EXAMPLES, ByteTokenizer, _unit_hash, split_documents, stdlib_corpus

AXES = ("language", "reasoning", "code", "dialogue", "knowledge")
# bumped whenever the items change (2: the answer's rank among the reasoning candidates' values drawn uniformly),
# so that scores cached by an earlier suite are never read as this one's
SUITE_VERSION = 2

# The corpus recipe of ``data.mixed_splits()`` (its defaults): which side of the split a document falls on.
VAL_FRACTION = 0.05
SPLIT_SEED = 0
CORPUS_SEED = 0  # seed of the generated domains in the training corpus

BPB_UNIFORM = 8.0  # bits per byte of a uniform guess over the 256 byte values: score 0
BPB_STRONG = 1.0  # roughly a strong language model on English text: score 10
CODE_MAX_LINE = 60  # longest answer line (bytes, with indentation and newline) of a code item
CLOZE_SUFFIX = 20  # bytes of right context that follow the cloze word in every candidate
Z95 = 1.959963984540054  # two-sided 95% normal quantile

__all__ = [
    "AXES",
    "VAL_FRACTION",
    "SPLIT_SEED",
    "CORPUS_SEED",
    "BPB_UNIFORM",
    "BPB_STRONG",
    "Z95",
    "Item",
    "AxisResult",
    "wilson_interval",
    "mc_score",
    "bpb_score",
    "training_facts",
    "line_parses",
    "axis_items",
    "score_items",
    "greedy_continuations",
    "evaluate_axis",
    "evaluate_suite",
    "results_rows",
]

_TOK = ByteTokenizer()


# -----------------------------------------------------------------------------
# Items, results and the normalisations


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: the model should continue ``prompt`` with ``candidates[correct_index]``."""

    prompt: str
    candidates: tuple[str, ...]
    correct_index: int
    source: str = ""  # where it came from: an example key, a document id (for the held-out checks)

    @property
    def answer(self) -> str:
        return self.candidates[self.correct_index]


@dataclass
class AxisResult:
    """The score of one axis: ``score`` in [0, 10] with its 95% interval, and the raw metric behind it."""

    axis: str
    score: float
    score_ci: tuple[float, float]
    metric: str  # name of the raw metric, e.g. "accuracy"
    value: float  # the raw metric
    value_ci: tuple[float, float]
    n: int  # items scored
    chance: float  # the raw metric of a guessing model
    normalization: str  # how value became score, in words
    extra: dict = field(default_factory=dict)  # secondary metrics (greedy exact match, truncation, ...)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: (lo, hi), always within [0, 1].

    The centre is shrunk towards 1/2 and the width never collapses to 0 at 0 or n successes, unlike the Wald
    interval p +- z * sqrt(p(1-p)/n), which is why it suits small suites and near-perfect or near-zero models.
    """
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if successes == 0 else lo), (1.0 if successes == n else hi)  # exact ends, no rounding error


def mc_score(accuracy: float, k: int) -> float:
    """Multiple-choice accuracy -> 0-10: ``10 * max(0, (acc - 1/k) / (1 - 1/k))``; chance -> 0, perfect -> 10.

    Below-chance accuracy is clipped to 0: on a few hundred items it is noise, not a meaningful negative skill.
    """
    c = 1.0 / k
    return 10.0 * max(0.0, (accuracy - c) / (1.0 - c))


def bpb_score(bpb: float) -> float:
    """Bits per byte -> 0-10, linear from 8 bits/byte (score 0) to 1 bit/byte (score 10), clipped to [0, 10].

    8 bits/byte is a uniform guess over byte values, the least any model should manage; about 1 bit/byte is what
    strong (large) models reach on English text, so 10 is out of reach for a tiny model and that is intended:
    the scale says how far along the road from knowing nothing to knowing English a model is.
    """
    return float(min(10.0, max(0.0, 10.0 * (BPB_UNIFORM - bpb) / (BPB_UNIFORM - BPB_STRONG))))


def _check_args(n, k, seed=0):
    for name, value, low in (("n", n, 1), ("k", k, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _check_axis(axis):
    if axis not in AXES:
        raise ValueError(f"unknown axis {axis!r}; the axes are {', '.join(AXES)}")


# -----------------------------------------------------------------------------
# Distractors


def _pick_distractors(answer: str, pool, m: int, rng: random.Random, first=()) -> list[str]:
    """m distinct values from ``first`` (hard distractors, kept in order) and then ``pool``, none equal to
    ``answer``. Among the pool, values of the same byte length as the answer come first, then the nearest lengths.

    Why the length matters: the model's choice is the *total* log-probability of a candidate's bytes, and every
    byte costs probability, so a model that knows nothing prefers short candidates. With equal lengths a
    guessing model is exactly at chance (ties are broken at random by ``score_items``).
    """
    out = []
    for v in first:
        if v != answer and v not in out and len(out) < m:
            out.append(v)
    rest = sorted({v for v in pool if v != answer and v not in out})
    rng.shuffle(rest)
    rest.sort(key=lambda v: abs(len(v) - len(answer)))  # stable: random order within one length
    out += rest[: m - len(out)]
    if len(out) < m:
        raise ValueError(f"only {len(out)} distractors for {answer!r}; need {m} (use a smaller k)")
    return out


def _make_item(prompt: str, answer: str, distractors, rng: random.Random, source: str = "") -> Item:
    """An Item with the answer at a random position among the candidates."""
    candidates = list(distractors)
    pos = rng.randrange(len(candidates) + 1)
    candidates.insert(pos, answer)
    return Item(prompt, tuple(candidates), pos, source)


def _held_out_pool(domain: str, n: int, seed: int) -> list:
    """n validation-side examples of a generated domain, one per problem (key), chosen by ``seed``.

    Examples are always generated with the corpus seed: a problem generated with another seed could be a
    training problem. ``seed`` only chooses among the held-out ones (and the distractors)."""
    pool, seen = [], set()
    for ex in synthetic.held_out_examples(domain, 3 * n + 20, CORPUS_SEED, VAL_FRACTION, SPLIT_SEED):
        if ex.key not in seen:
            seen.add(ex.key)
            pool.append(ex)
    random.Random(f"{seed}:{domain}:pick").shuffle(pool)
    return pool[:n]


# -----------------------------------------------------------------------------
# The corpora behind the language and code axes


@functools.lru_cache(maxsize=1)
def _stdlib_sides():
    """(train, val) documents of the stdlib corpus, split exactly as the five-domain corpus splits them."""
    return split_documents(stdlib_corpus(), VAL_FRACTION, SPLIT_SEED)


@functools.lru_cache(maxsize=1)
def _train_prose_text() -> str:
    return "\n".join(d.text for d in _stdlib_sides()[0] if d.domain == "prose")


@functools.lru_cache(maxsize=1)
def _train_code_triples() -> frozenset:
    """Every run of three consecutive lines of the training code: a cheap index for "seen in training"."""
    triples = set()
    for d in _stdlib_sides()[0]:
        if d.domain == "code":
            lines = d.text.split("\n")
            triples.update(zip(lines, lines[1:], lines[2:]))
    return frozenset(triples)


def _prose_validation_set():
    """The validation side of the five-domain corpus (a TokenDataset); replaced by a tiny one in the tests."""
    from ..data import mixed_splits
    return mixed_splits()[1]


# -----------------------------------------------------------------------------
# Items of each axis

_WORD = re.compile(r"[a-z]{3,12}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _cloze_sentences(doc) -> list[tuple[int, int]]:
    """(start, end) offsets of prose-like sentences in a document: 40-240 bytes, ending in ".", mostly letters,
    no code examples or markup."""
    out = []
    for para in re.finditer(r"(?:[^\n]+\n?)+", doc.text):  # paragraphs: runs of non-blank lines
        start = para.start()
        text = para.group()
        pos = 0
        for piece in _SENTENCE_END.split(text):
            i = text.index(piece, pos)
            pos = i + len(piece)
            s = piece.strip()
            if not (40 <= len(s) <= 240 and s.endswith(".") and s[0].isupper() and s.isascii()):
                continue
            if any(t in s for t in (">>>", "::", "``", "|", "*", "=", "(", "{", "[", "\t")):
                continue
            if sum(ch.isalpha() or ch == " " for ch in s) < 0.9 * len(s) or len(s.split()) < 6:
                continue
            a = start + i + piece.index(s)
            out.append((a, a + len(s)))
    return out


def _language_items(n: int, seed: int, k: int) -> list[Item]:
    """Cloze items from validation-side stdlib docstrings.

    A sentence loses one lowercase word (not among its first two words); the prompt is the sentence up to that
    word, and every candidate is a word plus the same ``CLOZE_SUFFIX`` bytes that follow it in the sentence. As
    the suffix is shared, comparing candidates is comparing the likelihood of the whole sentence (up to there)
    with each word in place: the right context lets grammar decide ("a ___ of the"), which a bare word could not
    use. Distractors are other words of the validation prose of the same length (see ``_pick_distractors``).
    Sentences that occur verbatim in the training prose (docstrings copied between files) are skipped.
    """
    rng = random.Random(f"{seed}:language")
    docs = [d for d in _stdlib_sides()[1] if d.domain == "prose"]
    vocab = sorted({w for d in docs for w in _WORD.findall(d.text) if w.isalpha()})
    by_len: dict[int, list[str]] = {}
    for w in vocab:
        by_len.setdefault(len(w), []).append(w)
    sentences = [(d, a, b) for d in docs for a, b in _cloze_sentences(d)]
    rng.shuffle(sentences)
    train_text = _train_prose_text()
    items, seen = [], set()
    for doc, a, b in sentences:
        s = doc.text[a:b]
        if s in seen or s in train_text:
            continue
        words = [m for m in re.finditer(r"\S+", s)][2:]
        words = [m for m in words if re.fullmatch(r"[a-z]{3,12}", m.group()) and len(by_len[len(m.group())]) >= k]
        if not words:
            continue
        seen.add(s)
        w = rng.choice(words)
        word, suffix = w.group(), s[w.end(): w.end() + CLOZE_SUFFIX]
        others = _pick_distractors(word, by_len[len(word)], k - 1, rng)
        item = _make_item(s[: w.start()], word, others, rng, doc.doc_id)
        items.append(Item(item.prompt, tuple(c + suffix for c in item.candidates), item.correct_index, item.source))
        if len(items) == n:
            break
    return items


def _reasoning_items(n: int, seed: int, k: int) -> list[Item]:
    """Held-out arithmetic and comparison problems; the prompt ends just before the final answer.

    Expressions: distractors are near misses of the right kind - answer +- 1, 2, 3, 10, 20, the operands of the
    last step (one of them is the previous step's result), the last step done with another operator - preferring
    the answer's number of digits. The answer's place among the k candidate *values* is drawn uniformly (that
    many distractors below it, the rest above): symmetric near misses would put the answer in the middle of the
    values almost always, and a model with any preference for an extreme value (the smallest, the largest) would
    then score *below* chance without knowing anything (the book-scale study found exactly that; see
    `answer_value_ranks`). Comparison chains: the other names of the chain, then (for chains shorter than k
    names) other names of the generator's list.
    """
    rng = random.Random(f"{seed}:reasoning")
    items = []
    for ex in _held_out_pool("arithmetic", n, seed):
        ans = ex.answer.strip()
        if ex.key.startswith("cmp:"):
            chain = ex.key.split(":")[2].split(">")
            others = [x for x in chain if x != ans]
            rng.shuffle(others)
            wrong = _pick_distractors(ans, synthetic._NAMES, k - 1, rng, first=others)
        else:
            a, op, b = ex.prompt[:-2].rsplit(" ", 3)[-3:]
            a, b, r = int(a), int(b), int(ans)
            near = {r + d for d in (1, -1, 2, -2, 10, -10, 3, -3, 20, -20)} | {a, b, a + b, a - b, a * b}
            below = rng.randrange(k)  # how many distractors lie below the answer: its rank among the values
            lower = _pick_distractors(ans, [str(x) for x in near if x < r], below, rng)
            upper = _pick_distractors(ans, [str(x) for x in near if x > r], k - 1 - len(lower), rng)
            wrong = lower + upper
            if len(wrong) < k - 1:  # too few values above the answer: the rest from below
                wrong += _pick_distractors(ans, [str(x) for x in near if x < r and str(x) not in wrong],
                                           k - 1 - len(wrong), rng)
        items.append(_make_item(ex.prompt, " " + ans, [" " + w for w in wrong], rng, f"arithmetic:{ex.key}"))
    return items


def answer_value_ranks(items) -> list[int]:
    """For numeric items: the answer's rank among its candidates' values (0 = the smallest). Uniform over
    0..k-1 when a model that prefers an extreme value is at chance; see `_reasoning_items`."""
    ranks = []
    for it in items:
        try:
            values = [int(c) for c in it.candidates]
        except ValueError:
            continue
        ranks.append(sorted(values).index(values[it.correct_index]))
    return ranks


def _dialogue_items(n: int, seed: int, k: int) -> list[Item]:
    """Held-out chats; the prompt ends at the bot's cue ("Bot: You live in").

    Distractors are other values of the asked slot from the generator's pools (names, cities, colours; counts
    4..16). When the value was updated during the chat, the stale value is the first distractor: choosing it
    means the model remembered the statement but missed the update.
    """
    rng = random.Random(f"{seed}:dialogue")
    pools = {"name": synthetic._NAMES, "city": synthetic._CITIES, "colour": synthetic._COLOURS,
             "count": [str(i) for i in range(2, 17)]}
    items = []
    for ex in _held_out_pool("dialogue", n, seed):
        facts, *_, ask = ex.key.split("|")
        ask = ask.removeprefix("ask=")
        stated = dict(kv.split("=", 1) for kv in facts.split(";"))[ask].split(" ")[0]
        wrong = _pick_distractors(ex.answer.strip(), pools[ask], k - 1, rng, first=[stated])
        items.append(_make_item(ex.prompt, ex.answer, [" " + w for w in wrong], rng, f"dialogue:{ex.key}"))
    return items


def training_facts() -> list[tuple[str, str]]:
    """(kingdom, attribute) pairs that the five-domain training corpus states at least once: kingdoms whose
    source ``"facts:<kingdom>"`` goes to the training side, in examples among its generated facts."""
    pairs = set()
    for ex in synthetic.facts_examples(GENERATED_EXAMPLES, CORPUS_SEED):
        if _unit_hash(SPLIT_SEED, f"facts:{ex.key}") >= VAL_FRACTION:
            attr = next(a for a, temps in synthetic._FACT_TEMPLATES.items()
                        if any(ex.prompt == p.format(e=ex.key) for p, _ in temps))
            pairs.add((ex.key, attr))
    return sorted(pairs)


def _knowledge_items(n: int, seed: int, k: int) -> list[Item]:
    """Questions about trained kingdoms in the generator's two Q/A templates; distractors are the same attribute
    of other kingdoms (other capitals, founders, years, ...)."""
    rng = random.Random(f"{seed}:knowledge")
    kb = synthetic.knowledge_base(CORPUS_SEED)
    pairs = training_facts()
    rng.shuffle(pairs)
    items = []
    for land, attr in pairs[:n]:
        prompt = rng.choice([p for p, _ in synthetic._FACT_TEMPLATES[attr] if p.startswith("Q:")]).format(e=land)
        value = kb[land][attr]
        wrong = _pick_distractors(value, [v[attr] for v in kb.values()], k - 1, rng)
        items.append(_make_item(prompt, " " + value, [" " + w for w in wrong], rng, f"facts:{land}"))
    return items


_SIMPLE = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Return, ast.Raise, ast.Pass, ast.Break,
           ast.Continue, ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.Delete, ast.Assert)


def line_parses(prefix: str, line: str) -> bool:
    """Is ``line`` syntactically valid Python right after ``prefix`` (a function's first lines)?

    The check parses ``dedent(prefix + line)``, plus an indented ``pass`` when the line opens a block (ends in
    ":"), so a correct ``if x:`` passes. It accepts any line that could start a statement there - including a
    wrong one, such as a return of an undefined name - and rejects a correct first line of a multi-line
    statement (an open bracket) or a line that would close the function. Items are chosen so that the true line
    passes it (single-line simple statements, no unclosed ``try:``).
    """
    text = prefix + line.rstrip("\n") + "\n"
    if line.rstrip().endswith(":"):
        indent = line[: len(line) - len(line.lstrip())]
        text += indent + "    pass\n"
    try:
        ast.parse(textwrap.dedent(text))
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _code_items(n: int, seed: int, k: int) -> list[Item]:
    """Next-line prediction in functions of validation-side stdlib files.

    One item per function (3-30 lines): a line i >= 1 that is a whole simple statement (an assignment, a call,
    a return, ...) of at most ``CODE_MAX_LINE`` bytes. The prompt is the function's source up to line i, the
    answer line i with its newline; distractors are other lines of the same file with exactly the same
    indentation, the ones closest in length to the answer first. Skipped: lines whose two preceding lines and
    itself occur together in the training code (the codec boilerplate shared by dozens of stdlib files).
    """
    rng = random.Random(f"{seed}:code")
    seen_triples = _train_code_triples()
    functions = []  # (doc, lines, first line index, last line index)
    for doc in _stdlib_sides()[1]:
        if doc.domain != "code":
            continue
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        lines = doc.text.split("\n")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and 3 <= node.end_lineno - node.lineno + 1 <= 30:
                functions.append((doc, lines, node))
    rng.shuffle(functions)
    by_indent_cache = {}
    items = []
    for doc, lines, fn in functions:
        first = fn.lineno - 1
        choices = []
        for st in ast.walk(fn):
            if isinstance(st, _SIMPLE) and st.lineno == st.end_lineno and st.lineno - 1 > first:
                if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
                    continue  # a docstring or bare constant
                j = st.lineno - 1
                line = lines[j] + "\n"
                if line.strip() and len(line) <= CODE_MAX_LINE and st.col_offset == len(line) - len(line.lstrip()) \
                        and ";" not in line and tuple(lines[j - 2: j + 1]) not in seen_triples:
                    choices.append(j)
        rng.shuffle(choices)
        for j in choices:
            prefix = "".join(x + "\n" for x in lines[first: j])
            answer = lines[j] + "\n"
            if not line_parses(prefix, answer):
                continue
            indent = answer[: len(answer) - len(answer.lstrip())]
            key = (doc.doc_id, indent)
            if key not in by_indent_cache:
                by_indent_cache[key] = {x + "\n" for x in lines
                                        if x.strip() and not x.lstrip().startswith("#")
                                        and x[: len(x) - len(x.lstrip())] == indent}
            pool = by_indent_cache[key] - {answer}
            if len(pool) < k - 1:
                continue
            wrong = _pick_distractors(answer, pool, k - 1, rng)
            items.append(_make_item(prefix, answer, wrong, rng, doc.doc_id))
            break
        if len(items) == n:
            break
    return items


_BUILDERS = {"language": _language_items, "reasoning": _reasoning_items, "code": _code_items,
             "dialogue": _dialogue_items, "knowledge": _knowledge_items}


def axis_items(axis: str, n: int = 200, seed: int = 0, k: int = 4) -> list[Item]:
    """The multiple-choice items of one axis (at most n; fewer only if the held-out material runs out),
    deterministic from (axis, n, seed, k). For ``language`` these are the cloze items."""
    _check_axis(axis)
    _check_args(n, k, seed)
    return _BUILDERS[axis](int(n), int(seed), int(k))


# -----------------------------------------------------------------------------
# Scoring


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.inference_mode()
def score_items(model, items, batch_size: int = 64) -> dict:
    """Multiple choice by likelihood: per item, the candidate with the highest total log-probability of its
    bytes after the prompt.

    Every (prompt + candidate) is left-truncated to the model's context (``model.config.max_seq_len``) and the
    number of items where that happened is returned as "truncated"; a candidate's first byte is scored only if
    at least one byte precedes it. Sequences are sorted by length and right-padded into batches (padding after
    the candidate cannot change its scores in a causal model). Exact ties - a model with no preference - are
    broken at random with a fixed seed.

    Returns {"accuracy", "n", "correct": [bool], "choices": [int], "logprobs": [[float]], "truncated"}.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    items = list(items)
    if not items:
        raise ValueError("items is empty: nothing to score")
    ctx = int(model.config.max_seq_len)
    seqs, truncated = [], 0  # (item index, candidate index, ids, index of the first scored target)
    for i, it in enumerate(items):
        p = _TOK.encode(it.prompt)
        cut = False
        for c, cand in enumerate(it.candidates):
            ids = p + _TOK.encode(cand)
            drop = max(0, len(ids) - ctx)
            cut |= drop > 0
            seqs.append((i, c, ids[drop:], max(1, len(p) - drop)))
        truncated += cut
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    device = _device(model)
    scores = [[0.0] * len(it.candidates) for it in items]
    order = sorted(range(len(seqs)), key=lambda s: -len(seqs[s][2]))
    for b in range(0, len(order), batch_size):
        batch = [seqs[s] for s in order[b: b + batch_size]]
        width = len(batch[0][2])
        x = torch.full((len(batch), width), _TOK.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width - 1), dtype=torch.bool)  # target positions of candidate bytes
        for r, (_, _, ids, start) in enumerate(batch):
            x[r, : len(ids)] = torch.tensor(ids)
            mask[r, start - 1: len(ids) - 1] = True
        logits = model(x.to(device)).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None].to(device))[..., 0]
        totals = (logp * mask.to(device)).sum(dim=1).cpu().tolist()
        for (i, c, _, _), t in zip(batch, totals):
            scores[i][c] = t
    if was_training and hasattr(model, "train"):
        model.train(True)
    rng = random.Random(0)
    choices = []
    for row in scores:
        best = max(row)
        tied = [c for c, v in enumerate(row) if v >= best - 1e-6 * max(1.0, abs(best))]
        choices.append(tied[0] if len(tied) == 1 else rng.choice(tied))
    correct = [ch == it.correct_index for ch, it in zip(choices, items)]
    return {"accuracy": sum(correct) / len(items), "n": len(items), "correct": correct, "choices": choices,
            "logprobs": scores, "truncated": truncated}


def greedy_continuations(model, prompts, max_new_tokens: int) -> list[str]:
    """Greedy (argmax) continuation of each prompt, ``max_new_tokens`` bytes, as text.

    Prompts are left-truncated to ``max_seq_len - max_new_tokens`` bytes and grouped by length, so each group is
    one batched ``model.generate`` call with a KV cache."""
    ctx = int(model.config.max_seq_len)
    room = ctx - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_seq_len={ctx}")
    device = _device(model)
    ids = [_TOK.encode(p)[-room:] for p in prompts]
    out = [""] * len(ids)
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        groups.setdefault(len(x), []).append(i)
    for length, rows in groups.items():
        for b in range(0, len(rows), 64):
            chunk = rows[b: b + 64]
            x = torch.tensor([ids[i] for i in chunk], dtype=torch.long, device=device)
            y = model.generate(x, max_new_tokens, temperature=0.0)[:, length:]
            for i, row in zip(chunk, y.cpu()):
                out[i] = _TOK.decode(row)
    return out


def _exact_match(model, items) -> float | None:
    """Share of items whose greedy continuation starts with the answer and then ends the word (the next byte is
    not a letter or digit), so " 12" does not count for " 128". None for models without ``generate``."""
    if not hasattr(model, "generate"):
        return None
    width = max(len(_TOK.encode(it.answer)) for it in items) + 1
    gen = greedy_continuations(model, [it.prompt for it in items], width)
    hits = 0
    for g, it in zip(gen, items):
        rest = g[len(it.answer): len(it.answer) + 1]
        hits += g.startswith(it.answer) and not (rest.isalnum() or rest == "_")
    return hits / len(items)


def _code_greedy(model, items) -> dict:
    """Greedy next line of each code item: exact-match rate and the rate of lines that pass ``line_parses``."""
    if not hasattr(model, "generate"):
        return {"exact_match": None, "syntax_valid": None}
    width = min(CODE_MAX_LINE + 4, int(model.config.max_seq_len) // 2)
    gen = greedy_continuations(model, [it.prompt for it in items], width)
    exact = valid = 0
    for g, it in zip(gen, items):
        line = g.split("\n")[0] + "\n" if "\n" in g else g
        exact += line == it.answer
        valid += "\n" in g and line_parses(it.prompt, line)
    return {"exact_match": exact / len(items), "syntax_valid": valid / len(items), "greedy_bytes": width}


# -----------------------------------------------------------------------------
# Axes and the suite


_MC_NORMALIZATION = "10 * max(0, (acc - 1/k) / (1 - 1/k)): chance = 0, perfect = 10; CI = Wilson 95% on acc, mapped"


def _mc_result(axis: str, scored: dict, k: int, extra: dict) -> AxisResult:
    n, acc = scored["n"], scored["accuracy"]
    lo, hi = wilson_interval(sum(scored["correct"]), n)
    return AxisResult(axis, mc_score(acc, k), (mc_score(lo, k), mc_score(hi, k)), "accuracy", acc, (lo, hi), n,
                      1.0 / k, _MC_NORMALIZATION, {"truncated": scored["truncated"], **extra})


def _equal_length_share(items) -> float:
    """Share of items whose candidates all have the same byte length: there a guessing model is exactly at
    chance; elsewhere total log-probability favours short candidates."""
    return sum(len({len(_TOK.encode(c)) for c in it.candidates}) == 1 for it in items) / len(items)


def _answer_in_context(model, items) -> float:
    """Share of dialogue items whose asked value is still inside the context after left-truncation: only
    there can a model answer by looking back (a 128-byte context often cuts off the opening turn)."""
    ctx = int(model.config.max_seq_len)
    hits = 0
    for it in items:
        room = max(0, ctx - len(_TOK.encode(it.answer)))
        visible = _TOK.decode(_TOK.encode(it.prompt)[-room:]) if room else ""
        hits += it.answer.strip() in visible
    return hits / len(items)


def evaluate_axis(model, axis: str, n: int = 200, seed: int = 0, k: int = 4) -> AxisResult:
    """Score one axis (see the module docstring).

    ``language`` is the mean of two sub-scores: ``bpb_score`` of the held-out prose bits per byte (evaluated on
    up to 16 x 16 windows of the model's context) and the cloze score. Its value and interval are the cloze
    accuracy's; the interval of the bpb sub-score is left out (tens of thousands of bytes make it far narrower
    than the cloze interval), so the axis interval is (bpb score + cloze interval) / 2.
    """
    _check_axis(axis)
    _check_args(n, k, seed)
    items = axis_items(axis, n, seed, k)
    if not items:
        raise ValueError(f"no {axis} items could be built")
    scored = score_items(model, items)
    extra = {"equal_length_share": _equal_length_share(items)}
    if axis == "dialogue":
        extra["answer_in_context"] = _answer_in_context(model, items)
    if axis == "code":
        extra.update(_code_greedy(model, items))
    else:
        extra["exact_match"] = _exact_match(model, items)
    result = _mc_result(axis, scored, k, extra)
    if axis != "language":
        return result
    from ..train import evaluate
    ev = evaluate(model, _prose_validation_set(), batch_size=16, seq_len=int(model.config.max_seq_len),
                  max_batches=16, domain="prose")
    b_score = bpb_score(ev["bpb"])
    cloze = result.score
    result.score = (b_score + cloze) / 2
    result.score_ci = ((b_score + result.score_ci[0]) / 2, (b_score + result.score_ci[1]) / 2)
    result.metric = "cloze accuracy"
    result.normalization = (f"mean of bpb score 10 * (8 - bpb) / 7 clipped to [0, 10] and cloze score "
                            f"{_MC_NORMALIZATION}")
    result.extra.update({"bpb": ev["bpb"], "bpb_score": b_score, "cloze_score": cloze, "bpb_tokens": ev["tokens"]})
    return result


def evaluate_suite(model, n: int = 200, seed: int = 0, k: int = 4, progress: bool = False) -> dict:
    """{axis: AxisResult} for all five axes, in the order of ``AXES``."""
    from tqdm.auto import tqdm
    _check_args(n, k, seed)
    return {axis: evaluate_axis(model, axis, n, seed, k) for axis in tqdm(AXES, desc="evals", disable=not progress)}


def results_rows(results) -> list[dict]:
    """One dict per axis for a markdown table: score and its interval (1 decimal), raw metric, chance, n."""
    rows = []
    for axis, r in results.items():
        rows.append({"axis": axis, "score": round(r.score, 1),
                     "95% CI": f"{r.score_ci[0]:.1f}-{r.score_ci[1]:.1f}",
                     "metric": r.metric, "value": round(r.value, 3),
                     "value 95% CI": f"{r.value_ci[0]:.3f}-{r.value_ci[1]:.3f}",
                     "chance": round(r.chance, 3), "n": r.n, "truncated": r.extra.get("truncated", 0)})
    return rows
