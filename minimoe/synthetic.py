"""Generated training data: three small "skill" domains that a byte-level model can learn on a CPU.

The built-in corpus (``minimoe.data``) has two domains, ``code`` and ``prose``. This module adds three more,
each produced by a generator that is deterministic from a seed:

* ``arithmetic`` - multi-step reasoning: expressions such as ``37 + 48 * 2 - 5`` solved step by step (respecting
  operator precedence), and comparison chains ("Ann is taller than Bo. ... Who is the tallest?");
* ``dialogue``   - multi-turn chats in which the user states facts (name, city, colour, a number of items), some
  small talk follows, maybe an update ("I bought 2 more pens"), and finally the user asks for one stated value;
* ``facts``      - key-value knowledge about invented kingdoms (names built from syllables, so no real corpus
  contains them), stated or asked in several templates, always with the same value for the same fact.

Every example is an :class:`Example`: a ``prompt`` ending in a cue, the ``answer`` span that follows it and the
full training ``text``. Training uses ``text``; an evaluation scores the model's continuation of ``prompt`` against
``answer``. ``key`` names the underlying problem and becomes ``Document.source``, so ``data.split_documents`` puts
every phrasing of one problem on the same side of the train/validation split.

Typical use::

    docs = synthetic_documents(n_per_domain=2000)              # list[Document], domains as above
    train, val = split_documents(docs)
    probe = held_out_examples("arithmetic", 200)               # validation-side examples, never trained on
"""

from __future__ import annotations

import numbers
import random
from dataclasses import dataclass

from .data import Document, _unit_hash


@dataclass(frozen=True)
class Example:
    """One generated problem: ``text`` starts with ``prompt + answer`` and ends with a newline."""

    domain: str  # "arithmetic" | "dialogue" | "facts"
    key: str  # canonical identity of the problem (phrasing-independent); Document.source is f"{domain}:{key}"
    prompt: str  # everything up to and including the cue before the answer
    answer: str  # the answer span, starting with a space, e.g. " 128"
    text: str  # prompt + answer + the rest of the example

    @property
    def question(self) -> str:
        """The prompt without any worked steps: up to the first "A:" cue (arithmetic, facts Q/A) or the last
        "Bot:" cue (dialogue). For free-generation evaluation, where the model must produce the steps itself."""
        if "\nA:" in self.prompt:
            return self.prompt[: self.prompt.index("\nA:") + 3]
        if self.domain == "dialogue":
            return self.prompt[: self.prompt.rindex("Bot:") + 4]
        return self.prompt


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return int(n)


def _rng(seed: int, domain: str) -> random.Random:
    """A private generator per (seed, domain): string seeds are hashed stably (SHA-512), never the global state."""
    return random.Random(f"{int(seed)}:{domain}")


def _example(domain: str, key: str, prompt: str, answer: str, rest: str) -> Example:
    return Example(domain, key, prompt, answer, prompt + answer + rest)


# Short ASCII first names shared by the arithmetic and dialogue domains.
_NAMES = ("Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ida", "Jo", "Kim", "Lou", "Max", "Ned", "Ola",
          "Pam", "Quin", "Ray", "Sue", "Tom", "Uma", "Val", "Wes", "Xena", "Yuri", "Zoe", "Mara", "Ivo", "Lena",
          "Otto", "Rita", "Sam", "Tess", "Vic", "Nina", "Omar", "Pia", "Rex", "Sol", "Tia")

# -----------------------------------------------------------------------------
# Arithmetic: multi-step reasoning


_RELATIONS = (  # (more, less, most, least)
    ("taller", "shorter", "tallest", "shortest"),
    ("older", "younger", "oldest", "youngest"),
    ("faster", "slower", "fastest", "slowest"),
    ("heavier", "lighter", "heaviest", "lightest"),
)


def _solve(nums: list[int], ops: list[str]) -> list[tuple[int, str, int, int]]:
    """The worked steps (a, op, b, result): every "*" left to right first, then "+"/"-" left to right."""
    nums, ops, steps = list(nums), list(ops), []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, op, b = nums[i], ops[i], nums[i + 1]
        r = a * b if op == "*" else a + b if op == "+" else a - b
        steps.append((a, op, b, r))
        nums[i: i + 2], ops[i: i + 1] = [r], []
    return steps


def _expression_example(rng: random.Random) -> Example:
    ops = [rng.choice("+-*") for _ in range(rng.randint(2, 4))]
    # Factors of a product stay in 2..9 so results stay a few digits long; other operands are 1..50.
    nums = [rng.randint(2, 9) if "*" in ops[max(i - 1, 0): i + 1] else rng.randint(1, 50) for i in range(len(ops) + 1)]
    expr = " ".join(f"{x} {op}" for x, op in zip(nums, ops)) + f" {nums[-1]}"
    steps = _solve(nums, ops)
    done = "".join(f" {a} {op} {b} = {r}." for a, op, b, r in steps[:-1])
    a, op, b, r = steps[-1]
    prompt = f"Q: {expr} = ?\nA:{done} {a} {op} {b} ="
    return _example("arithmetic", f"expr:{expr}", prompt, f" {r}", f". So the answer is {r}.\n")


def _comparison_example(rng: random.Random) -> Example:
    more, less, most, least = rng.choice(_RELATIONS)
    order = rng.sample(_NAMES, rng.randint(3, 5))  # order[0] is the most <relation>
    clues = [f"{a} is {more} than {b}." if rng.random() < 0.5 else f"{b} is {less} than {a}."
             for a, b in zip(order, order[1:])]
    rng.shuffle(clues)
    ask_most = rng.random() < 0.5
    ranked = order if ask_most else order[::-1]
    top, bottom = (most, least) if ask_most else (least, most)
    prompt = f"Q: {' '.join(clues)} Who is the {top}?\nA: From {top} to {bottom}:"
    rest = "".join(f", {x}" for x in ranked[1:]) + f". So the answer is {ranked[0]}.\n"
    key = f"cmp:{more}:{'>'.join(order)}:{'most' if ask_most else 'least'}"
    return _example("arithmetic", key, prompt, f" {ranked[0]}", rest)


def arithmetic_examples(n: int, seed: int = 0) -> list[Example]:
    """Multi-step reasoning problems, two kinds (about 2/3 and 1/3):

    * ``Q: 37 + 48 * 2 - 5 = ?\\nA: 48 * 2 = 96. 37 + 96 = 133. 133 - 5 = 128. So the answer is 128.`` - 2 to 4
      operations; the solution applies operator precedence one step at a time. ``prompt`` ends before the result of
      the last step (``... 133 - 5 =``) and ``answer`` is the final result (`` 128``), so scoring it needs the
      last computation, not a copy. ``key`` is the expression.
    * ``Q: Bo is shorter than Ann. Bo is taller than Cy. Who is the tallest?\\nA: From tallest to shortest: Ann, Bo,
      Cy. So the answer is Ann.`` - the answer is the first name of the sorted chain, which needs the clues chained
      together. ``key`` is the hidden order and the question, so reworded or reshuffled clues share it.
    """
    n = _check_n(n)
    rng = _rng(seed, "arithmetic")
    return [_expression_example(rng) if rng.random() < 2 / 3 else _comparison_example(rng) for _ in range(n)]


# -----------------------------------------------------------------------------
# Dialogue: state tracking over several turns


_CITIES = ("Oslo", "Lima", "Rome", "Cairo", "Paris", "Delhi", "Tokyo", "Quito", "Dakar", "Perth", "Seoul", "Bern",
           "Hanoi", "Riga", "Accra", "Doha", "Kyiv", "Lagos", "Minsk", "Sofia", "Turin", "Porto", "Cork", "Nice")
_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey", "teal")
_ITEMS = ("apples", "books", "cats", "coins", "pens", "plants", "shells", "stamps", "hats", "cups", "keys", "mugs")
_STATE = {  # slot -> (statement templates, update template, question, reply cue, reply end)
    "name": (("My name is {}.", "I'm {}.", "Call me {}."), "Actually, please call me {}.",
             "What is my name?", "Your name is", "."),
    "city": (("I live in {}.", "My home is in {}."), "I just moved to {}.",
             "Where do I live?", "You live in", "."),
    "colour": (("My favourite colour is {}.", "I love the colour {}."), "Now my favourite colour is {}.",
               "What is my favourite colour?", "Your favourite colour is", "."),
    "count": (("I have {}.", "I own {}."), None, "How many {} do I have?", "You have", " {}."),
}
_FILLER = (("What time is it?", "I can't see a clock, sorry."), ("Tell me a fun fact.", "Owls can't move their eyes."),
           ("Thanks!", "You're welcome."), ("Is it going to rain?", "I can't check the weather."),
           ("I like music.", "Music is great."), ("Do you sleep?", "No, I never sleep."),
           ("Say something nice.", "You are doing great."), ("I feel tired.", "Take a short break."),
           ("What is 2 plus 3?", "It is 5."), ("Do you like tea?", "Tea sounds nice."),
           ("Can you sing?", "Only in text."), ("What day is it?", "I'm not sure, sorry."))
_ACKS = ("Okay.", "Got it.", "Noted.", "I see.", "Good to know.")


def _dialogue_example(rng: random.Random) -> Example:
    slots = rng.sample(tuple(_STATE), rng.randint(2, 3))  # stated, in this order
    ask = rng.choice(slots)
    item = rng.choice(_ITEMS)
    value = {"name": rng.choice(_NAMES), "city": rng.choice(_CITIES), "colour": rng.choice(_COLOURS),
             "count": rng.randint(4, 9)}
    said = {s: f"{value[s]} {item}" if s == "count" else value[s] for s in slots}
    key = ";".join(f"{s}={said[s]}" for s in sorted(slots))
    opening = " ".join(rng.choice(_STATE[s][0]).format(said[s]) for s in slots)
    greet = f"Nice to meet you, {value['name']}." if "name" in slots else rng.choice(_ACKS)
    update = rng.random() < 0.5
    turns = [(f"Hi! {opening}", greet)] + rng.sample(_FILLER, rng.randint(2, 3 if update else 4))  # <= 400 chars

    if update:  # usually of the slot that will be asked about
        slot = ask if rng.random() < 0.75 else rng.choice(slots)
        if slot == "count":
            d = rng.randint(2, value["count"] - 2) if rng.random() < 0.5 else -rng.randint(2, value["count"] - 2)
            value["count"] += d
            said_update = f"I bought {d} more {item}." if d > 0 else f"I gave {-d} of my {item} away."
            key += f"|count{d:+d}"
        else:
            pool = {"name": _NAMES, "city": _CITIES, "colour": _COLOURS}[slot]
            value[slot] = rng.choice([v for v in pool if v != value[slot]])
            said_update = _STATE[slot][1].format(value[slot])
            key += f"|{slot}:={value[slot]}"
        turns.insert(rng.randint(2, len(turns)), (said_update, rng.choice(_ACKS)))

    _, _, question, cue, end = _STATE[ask]
    prompt = "".join(f"User: {u}\nBot: {b}\n" for u, b in turns) + f"User: {question.format(item)}\nBot: {cue}"
    return _example("dialogue", f"{key}|ask={ask}", prompt, f" {value[ask]}", end.format(item) + "\n")


def dialogue_examples(n: int, seed: int = 0) -> list[Example]:
    """Multi-turn chats that test memory of stated facts, in the format ``User: ...\\nBot: ...\\n``.

    The first user turn states 2 or 3 facts (name, city, favourite colour, a number of items); 2 to 4 small-talk
    exchanges follow (one possible filler mentions a distracting number); half of the dialogues update one fact
    midway ("I bought 3 more pens.", "I just moved to Lima.") and then have only 2 or 3 fillers, so every text stays
    under 400 bytes; the last user turn asks for one fact. ``prompt`` ends at the bot's cue (``Bot: You have``) and
    ``answer`` is the current value (`` 7``), after any update. ``key`` lists the stated facts, the update and the
    question, not the small talk or the wording.
    """
    n = _check_n(n)
    rng = _rng(seed, "dialogue")
    return [_dialogue_example(rng) for _ in range(n)]


# -----------------------------------------------------------------------------
# Facts: a consistent invented knowledge base

_DEFAULT_ENTITIES = 200
_SYLLABLES = ("zor", "vel", "tam", "ki", "pra", "lun", "dor", "mi", "shan", "ret", "ob", "qua", "nix", "bel", "tor",
              "ash", "ven", "gil", "rho", "mek", "sal", "fen", "ul", "bra", "kesh", "ty", "om", "dra", "lis", "gor")
_LAND_ENDS = ("ia", "or", "an", "is", "ea", "ar", "en", "os", "und", "eth")
_CITY_ENDS = ("th", "grad", "mere", "holm", "wick", "ford", "stad", "ton", "ais", "ique")
_ANIMALS = ("owl", "lynx", "heron", "bison", "otter", "falcon", "stag", "wolf", "crane", "boar", "hare", "eagle",
            "badger", "raven", "swan", "fox")
_FACT_TEMPLATES = {  # attribute -> (prompt, rest) templates; {e} is the entity. The answer is " " + value.
    "capital": (("The capital city of the kingdom of {e} is", ".\n"),
                ("Travellers to {e} usually arrive first in its capital,", ".\n"),
                ("Q: What is the capital of the kingdom of {e}?\nA:", "\n"),
                ("Q: Which city is the capital of {e}?\nA: The capital of {e} is", ".\n")),
    "founder": (("The kingdom of {e} was founded long ago by", ".\n"),
                ("Every child in {e} learns that the kingdom's founder was", ".\n"),
                ("Q: Who founded the kingdom of {e}?\nA:", "\n"),
                ("Q: Who was the founder of {e}?\nA: {e} was founded by", ".\n")),
    "year": (("The kingdom of {e} was founded in the year", ".\n"),
             ("{e} celebrates its founding, which took place in the year", ".\n"),
             ("Q: In which year was the kingdom of {e} founded?\nA:", "\n"),
             ("Q: When was {e} founded?\nA: {e} was founded in", ".\n")),
    "flag": (("The flag of the kingdom of {e} is mostly", ".\n"),
             ("On festival days the streets of {e} are hung with flags of", ".\n"),
             ("Q: What colour is the flag of {e}?\nA:", "\n"),
             ("Q: What is the main colour of the flag of {e}?\nA: It is", ".\n")),
    "rank": (("By population, the kingdom of {e} ranks", " among all the kingdoms.\n"),
             ("In the census of kingdoms, {e} is ranked", " by population.\n"),
             ("Q: Where does {e} rank by population?\nA:", "\n"),
             ("Q: What is the population rank of {e}?\nA: {e} ranks", ".\n")),
    "animal": (("The national animal of the kingdom of {e} is the", ".\n"),
               ("On the coat of arms of {e} you will find the", ".\n"),
               ("Q: What is the national animal of {e}?\nA: The", ".\n"),
               ("Q: Which animal is the symbol of {e}?\nA: The", ".\n")),
}


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def knowledge_base(seed: int = 0, n_entities: int | None = None) -> dict[str, dict[str, str]]:
    """The invented world behind the ``facts`` domain: {kingdom: {attribute: value}}, deterministic from the seed.

    Kingdoms, capitals and founders get made-up names (syllables + an ending, e.g. "Zorvia", "Kishanholm",
    "Tam Belret"); kingdoms and capitals are all distinct. Attributes: capital, founder, year (of founding, 1000-1899),
    flag (a colour), rank (population rank: a permutation of 1st..Nth), animal (the national animal).
    """
    n_entities = _DEFAULT_ENTITIES if n_entities is None else n_entities
    if isinstance(n_entities, bool) or not isinstance(n_entities, numbers.Integral) or not 1 <= n_entities <= 2000:
        raise ValueError(f"n_entities must be an int in [1, 2000], got {n_entities!r}")
    rng = _rng(seed, "facts-kb")

    def word(n_syl, ends):
        return ("".join(rng.choice(_SYLLABLES) for _ in range(n_syl)) + rng.choice(ends)).capitalize()

    lands, cities = set(), set()
    while len(lands) < n_entities:
        lands.add(word(rng.randint(1, 2), _LAND_ENDS))
    while len(cities) < n_entities:
        c = word(rng.randint(1, 2), _CITY_ENDS)
        if c not in lands:
            cities.add(c)
    lands, cities = sorted(lands), sorted(cities)  # sets have no stable order; sort, then shuffle with the rng
    rng.shuffle(lands)
    rng.shuffle(cities)
    ranks = rng.sample(range(1, n_entities + 1), n_entities)
    return {land: {"capital": city,
                   "founder": f"{word(1, ('',))} {word(2, ('',))}",
                   "year": str(rng.randint(1000, 1899)),
                   "flag": rng.choice(_COLOURS),
                   "rank": _ordinal(rank),
                   "animal": rng.choice(_ANIMALS)}
            for land, city, rank in zip(lands, cities, ranks)}


def facts_examples(n: int, seed: int = 0, n_entities: int | None = None) -> list[Example]:
    """One fact about an invented kingdom per example, in one of four templates per attribute (2 statements,
    2 question/answer), e.g. ``The capital city of the kingdom of Zorvia is Plenth.`` or
    ``Q: Who founded the kingdom of Zorvia?\\nA: Tam Belret``.

    Values come from :func:`knowledge_base` (same seed), so a fact has the same value in every example: the
    domain tests memorisation. ``key`` is the kingdom, so the split holds out whole kingdoms: validation measures
    the format and the prior, and recall is tested on training kingdoms. With the default 200 kingdoms each one
    appears about 10 times in 2,000 examples.
    """
    n = _check_n(n)
    kb = knowledge_base(seed, n_entities)
    lands, attrs = list(kb), list(_FACT_TEMPLATES)
    rng = _rng(seed, "facts")
    out = []
    for _ in range(n):
        land, attr = rng.choice(lands), rng.choice(attrs)
        prompt, rest = rng.choice(_FACT_TEMPLATES[attr])
        out.append(_example("facts", land, prompt.format(e=land), " " + kb[land][attr], rest))
    return out


# -----------------------------------------------------------------------------
# Documents and held-out examples


GENERATORS = {"arithmetic": arithmetic_examples, "dialogue": dialogue_examples, "facts": facts_examples}


def _check_domains(domains) -> list[str]:
    domains = [domains] if isinstance(domains, str) else list(domains)
    unknown = [d for d in domains if d not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown synthetic domain(s) {unknown}; known: {sorted(GENERATORS)}")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains listed twice: {domains}")
    return domains


def synthetic_documents(domains=("arithmetic", "dialogue", "facts"), n_per_domain: int = 2000,
                        seed: int = 0) -> list[Document]:
    """One Document per generated Example: doc_id "<domain>:<i>", source "<domain>:<key>".

    Every example of one problem shares its source, so ``data.split_documents`` never puts a problem on both sides.
    """
    out = []
    for domain in _check_domains(domains):
        for i, ex in enumerate(GENERATORS[domain](n_per_domain, seed)):
            out.append(Document(f"{domain}:{i}", domain, ex.text, f"{domain}:{ex.key}"))
    return out


def held_out_examples(domain: str, n: int, seed: int = 0, val_fraction: float = 0.05,
                      split_seed: int = 0) -> list[Example]:
    """The first ``n`` generated examples whose source ``data.split_documents(docs, val_fraction, split_seed)``
    sends to validation: problems a model trained on ``synthetic_documents(..., seed=seed)`` never saw.

    Generators are prefix-stable (the first k of ``gen(m, seed)`` are ``gen(k, seed)``), so generating more when
    too few are found keeps the result deterministic. Duplicates of a held-out problem are kept, as in training.
    """
    (domain,) = _check_domains([domain])
    n = _check_n(n)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    m = max(64, int(2 * n / val_fraction))
    for _ in range(8):
        examples = GENERATORS[domain](m, seed)
        found = [ex for ex in examples if _unit_hash(split_seed, f"{domain}:{ex.key}") < val_fraction]
        if len(found) >= n:
            return found[:n]
        m *= 2
    raise ValueError(f"only {len(found)} of {m} {domain!r} examples fall in the validation split "
                     f"(val_fraction={val_fraction}, split_seed={split_seed}); ask for fewer")
