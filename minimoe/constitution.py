"""Constitutional self-correction: generate, critique against written principles, revise, then fine-tune.

Constitutional AI (Bai et al., 2022, arXiv:2212.08073) is a training method, not a part of the network. Its
supervised stage samples a response, has the model critique it against a principle from a short written list
(the constitution), has it revise the response, repeats, and fine-tunes the model on the final revisions; a
second stage (RL from AI feedback) trains on the model's own preference labels. The article's "ethics layer"
(claim A1) therefore lives in training data and, at inference, in a loop around the model. This module builds
that loop around any generator and the supervised stage after it:

    Principle      a name, a plain-language statement, and a critic: (response, prompt) -> violations
    Constitution   an ordered set of principles, loadable from a JSON (or YAML) file
    SelfCorrector  generate -> critique -> revise until clean, `max_rounds` or `time_budget_s`; full trace
    fine_tune      the supervised stage: train a MiniLM on the (prompt, final revision) pairs

Our critics are programs (a compiler, an AST walk, pycodestyle, regular expressions) or a scoring model's
likelihood: a byte-level model of 64-256 units cannot read a critique written in English, so "revise" here is
resampling, and chapter 4 measures how much of the effect is plain rejection sampling.

    gen = MiniLMGenerator(zoo.load("dense-tiny").model, stop="\\n")
    fix = SelfCorrector(gen, Constitution.builtin("code"), strategy="critique", max_rounds=4)
    result = fix("def mean(values):\\n    return ", seed=0)
    result.output, result.passed, result.rounds          # final response, clean?, the trace
"""
from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .data import ByteTokenizer

BUILTIN_DIR = Path(__file__).parent / "constitutions"  # code.json, arithmetic.json


# ---- principles and their critics --------------------------------------------------------------------------
@dataclass(frozen=True)
class Violation:
    """One finding of a principle's critic. span: the characters of the response at fault (None = all of it)."""

    principle: str
    message: str
    span: tuple[int, int] | None = None
    error: bool = False  # the critic itself failed: a failed check, not a finding about the response


Critic = Callable[[str, str], Iterable]  # (response, prompt) -> messages: str or (str, span)


@dataclass(frozen=True)
class Principle:
    """A rule of the constitution: `statement` says it in words, `critic` checks it in code (or with a model)."""

    name: str
    statement: str
    critic: Critic
    kind: str = "rule"  # "rule" (a program) or "model" (a scoring model or classifier)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a principle needs a non-empty name, got {self.name!r}")
        if not callable(self.critic):
            raise ValueError(f"principle {self.name!r}: critic must be callable, got {type(self.critic).__name__}")
        if self.kind not in ("rule", "model"):
            raise ValueError(f"principle {self.name!r}: kind must be 'rule' or 'model', got {self.kind!r}")

    def check(self, response: str, prompt: str = "") -> list[Violation]:
        """The critic's findings as Violations. A critic that raises gives one failed check, never an exception."""
        try:
            found = list(self.critic(response, prompt) or ())
            out = []
            for item in found:
                message, span = (item, None) if isinstance(item, str) else item
                out.append(Violation(self.name, str(message), None if span is None else (int(span[0]), int(span[1]))))
            return out
        except Exception as e:  # noqa: BLE001 - any bug in a critic is reported, the loop goes on
            return [Violation(self.name, f"check failed: {type(e).__name__}: {e}", error=True)]


def _line_start(text: str, line: int) -> int:
    """Character offset where 1-based `line` of `text` starts (len(text) past the end)."""
    pos = 0
    for _ in range(line - 1):
        nl = text.find("\n", pos)
        if nl < 0:
            return len(text)
        pos = nl + 1
    return pos


def _response_span(source: str, offset: int, response: str) -> tuple[int, int]:
    """A span from source offset `offset` to the end, in response coordinates (source = prompt + response)."""
    start = min(max(offset - (len(source) - len(response)), 0), len(response))
    return start, len(response)


def compiles(include_prompt: bool = True) -> Critic:
    """The program compiles (prompt + response when the response completes the prompt). Runs nothing."""
    def critic(response, prompt):
        from .evals.code import check_compiles  # the chapter 4 harness; imported when first used
        source = prompt + response if include_prompt else response
        r = check_compiles(source)
        if r.ok:
            return []
        m = re.search(r"line (\d+)", r.reason)
        offset = _line_start(source, int(m.group(1))) if m else len(source) - len(response)
        return [(r.reason, _response_span(source, offset, response))]
    return critic


DANGEROUS_CALLS = ("eval", "exec", "os.system", "subprocess")


def _dotted(node) -> str | None:
    """"os.system" for the call target os.system; None for anything that is not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def no_dangerous_calls(names: Sequence[str] = DANGEROUS_CALLS, include_prompt: bool = True) -> Critic:
    """No call of, or import from, the named functions and modules ("subprocess" covers subprocess.run).

    Walks the syntax tree (nothing runs) and reports only what lies in the response. Code that does not parse
    is searched as text instead. Like any list of names it can be evaded (getattr, __import__); it states a
    rule, it is not a sandbox (minimoe.evals.sandbox is).
    """
    names = tuple(names)

    def banned(dotted: str) -> bool:
        return any(dotted == n or dotted.startswith(n + ".") for n in names)

    def critic(response, prompt):
        source = prompt + response if include_prompt else response
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            found = []
            for n in names:
                for m in re.finditer(rf"(?<![\w.]){re.escape(n)}\b", response):
                    found.append((f"uses {n} (found as text: the code does not parse)", (m.start(), len(response))))
            return found
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                hits = [_dotted(node.func)]
            elif isinstance(node, ast.Import):
                hits = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                hits = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            start = _line_start(source, node.lineno)
            line = source[start:].split("\n", 1)[0]
            offset = start + len(line.encode()[:node.col_offset].decode(errors="ignore"))  # col_offset is in bytes
            if offset < len(source) - len(response):
                continue  # in the prompt: not the response's doing
            for h in hits:
                if h and banned(h):
                    found.append((f"{'imports' if not isinstance(node, ast.Call) else 'calls'} {h}",
                                  _response_span(source, offset, response)))
        return found
    return critic


def pep8_clean(max_line_length: int = 79) -> Critic:
    """pycodestyle (through the chapter 4 harness) finds nothing on the response's lines."""
    def critic(response, prompt):
        from .evals.code import pep8
        source = prompt + response
        r = pep8(source, max_line_length=max_line_length, skip_lines=prompt.count("\n"))
        found = []
        for v in r.violations:  # "line:col CODE message"
            line, col = (int(x) for x in v.split(" ", 1)[0].split(":"))
            found.append((v, _response_span(source, _line_start(source, line) + col - 1, response)))
        return found
    return critic


def banned_terms(terms: Sequence[str], case_sensitive: bool = False) -> Critic:
    """None of the words or phrases appears as a whole word."""
    flags = 0 if case_sensitive else re.IGNORECASE

    def critic(response, prompt):
        return [(f"uses the banned term {m.group(0)!r}", (m.start(), m.end()))
                for t in terms for m in re.finditer(rf"\b{re.escape(t)}\b", response, flags)]
    return critic


def max_length(chars: int | None = None, lines: int | None = None) -> Critic:
    """At most `chars` characters and `lines` lines (a final newline does not start a line)."""
    if chars is None and lines is None:
        raise ValueError("max_length needs chars or lines")

    def critic(response, prompt):
        found = []
        if chars is not None and len(response) > chars:
            found.append((f"{len(response)} characters, more than {chars}", (chars, len(response))))
        n = len(response.rstrip("\n").split("\n")) if response.strip() else 0
        if lines is not None and n > lines:
            found.append((f"{n} lines, more than {lines}", (_line_start(response, lines + 1), len(response))))
        return found
    return critic


def required_format(pattern: str, description: str) -> Critic:
    """The response (stripped) matches the regular expression `pattern` (re.search); `description` says it."""
    compiled = re.compile(pattern)

    def critic(response, prompt):
        return [] if compiled.search(response.strip()) else [f"not in the required format: {description}"]
    return critic


def grounded(pattern: str = r"\b[A-Z][a-z]+\b", ignore: Sequence[str] = ()) -> Critic:
    """Every match of `pattern` in the response (by default: capitalised words, i.e. names) occurs in the prompt."""
    compiled, ignore = re.compile(pattern), set(ignore)

    def critic(response, prompt):
        return [(f"{m.group(0)!r} is not in the prompt", (m.start(), len(response)))
                for m in compiled.finditer(response) if m.group(0) not in ignore and m.group(0) not in prompt]
    return critic


@torch.inference_mode()
def bits_per_byte(model, response: str, prompt: str = "") -> float:
    """A scoring MiniLM's surprise at `response` after `prompt`: -log2 p(response bytes | prompt) per byte."""
    tok = ByteTokenizer()
    head, tail = [tok.eos_id] + tok.encode(prompt), tok.encode(response)
    if not tail:
        return 0.0
    ids = (head + tail)[-model.config.max_seq_len - 1:]  # keep the response, drop the prompt's start if needed
    x = torch.tensor([ids[:-1]], device=model.device)
    logp = torch.log_softmax(model(x).logits[0].float(), dim=-1)
    n = min(len(tail), len(ids) - 1)
    targets = torch.tensor(ids[-n:], device=model.device)
    nats = -logp[-n:].gather(1, targets[:, None]).sum()
    return float(nats) / torch.log(torch.tensor(2.0)).item() / n


def score_critic(score: Callable[[str, str], float], threshold: float, what: str) -> Critic:
    """A model-based critic: a violation when score(response, prompt) > threshold (a classifier's probability of
    a violation, a scoring model's bits per byte, ...)."""
    def critic(response, prompt):
        s = float(score(response, prompt))
        return [f"{what} is {s:.2f}, above {threshold:g}"] if s > threshold else []
    return critic


def likelihood_critic(model, max_bits_per_byte: float) -> Critic:
    """A scoring model judges the response implausible when its bits per byte exceed the threshold."""
    return score_critic(lambda r, p: bits_per_byte(model, r, p), max_bits_per_byte, "the scoring model's bits/byte")


# Critics a constitution file may name, with keyword arguments from the file.
CRITICS: dict[str, Callable[..., Critic]] = {
    "compiles": compiles, "no_dangerous_calls": no_dangerous_calls, "pep8": pep8_clean,
    "banned_terms": banned_terms, "max_length": max_length, "required_format": required_format,
    "grounded": grounded,
}


# ---- the constitution ---------------------------------------------------------------------------------------
class Constitution:
    """An ordered set of principles. critique() asks every principle's critic, in order."""

    def __init__(self, principles: Iterable[Principle], name: str = "constitution"):
        self.principles = tuple(principles)
        self.name = name
        self.source = None
        if not self.principles:
            raise ValueError("a constitution needs at least one principle")
        for p in self.principles:
            if not isinstance(p, Principle):
                raise ValueError(f"a constitution holds Principle objects, got {type(p).__name__}")
        names = [p.name for p in self.principles]
        if len(set(names)) != len(names):
            raise ValueError(f"principle names must be unique, got {names}")

    def critique(self, response: str, prompt: str = "") -> list[Violation]:
        return [v for p in self.principles for v in p.check(response, prompt)]

    def __len__(self) -> int:
        return len(self.principles)

    def __iter__(self):
        return iter(self.principles)

    def __repr__(self) -> str:
        return f"Constitution({self.name!r}, {[p.name for p in self.principles]})"

    def describe(self) -> str:
        """The principles as a numbered Markdown list of their statements."""
        return "\n".join(f"{i}. **{p.name}** ({p.kind}): {p.statement}" for i, p in enumerate(self, 1))

    @classmethod
    def from_dict(cls, d: dict, critics: dict[str, Callable[..., Critic]] | None = None) -> "Constitution":
        """{"name": ..., "principles": [{"name", "statement", "critic": a CRITICS name, "args": {...}}, ...]}.

        critics: more named critic factories (e.g. a model-based critic closed over its model)."""
        known = {**CRITICS, **(critics or {})}
        if not isinstance(d, dict) or not isinstance(d.get("principles"), list):
            raise ValueError("a constitution is a mapping with a list under 'principles'")
        principles = []
        for i, p in enumerate(d["principles"]):
            if not isinstance(p, dict) or not {"name", "statement", "critic"} <= set(p):
                raise ValueError(f"principle {i}: needs 'name', 'statement' and 'critic', got {p!r}")
            if p["critic"] not in known:
                raise ValueError(f"principle {p['name']!r}: unknown critic {p['critic']!r}; known: {', '.join(known)}")
            critic = known[p["critic"]](**p.get("args", {}))
            kind = p.get("kind", "rule" if p["critic"] in CRITICS else "model")
            principles.append(Principle(p["name"], p["statement"], critic, kind))
        out = cls(principles, name=d.get("name", "constitution"))
        out.source = d  # what it was built from, for fingerprint()
        return out

    @classmethod
    def from_file(cls, path: str | Path, critics: dict | None = None) -> "Constitution":
        """Load a .json file, or a .yaml/.yml file when PyYAML is installed."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml); JSON needs nothing") from e
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return cls.from_dict(data, critics)

    @classmethod
    def builtin(cls, name: str) -> "Constitution":
        """The book's constitutions: "code" and "arithmetic" (minimoe/constitutions/<name>.json)."""
        path = BUILTIN_DIR / f"{name}.json"
        if not path.exists():
            have = sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))
            raise ValueError(f"no built-in constitution {name!r}; have {have}")
        return cls.from_file(path)


# ---- generators: one protocol for a MiniLM and a transformers model ------------------------------------------
class MiniLMGenerator:
    """generate_text(prompt, max_new_tokens, temperature, seed) -> (text, new tokens) for a byte-level MiniLM.

    As minimoe.sample does, the prompt follows an <|eos|> (a document starts here). `stop` (e.g. "\\n") ends the
    response after its first occurrence; a one-byte stop also ends generation early. A prompt too long for the
    context keeps its end.
    """

    def __init__(self, model, stop: str | None = None):
        self.model, self.stop, self.tok = model, stop, ByteTokenizer()
        stop_ids = self.tok.encode(stop) if stop else []
        self._eos = stop_ids[0] if len(stop_ids) == 1 else self.tok.eos_id

    def fits(self, prompt: str, max_new_tokens: int) -> bool:
        return 1 + len(prompt.encode()) + max_new_tokens <= self.model.config.max_seq_len

    def generate_text(self, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                      seed: int = 0) -> tuple[str, int]:
        ctx = self.model.config.max_seq_len
        new = max(1, min(max_new_tokens, ctx - 1))
        ids = ([self.tok.eos_id] + self.tok.encode(prompt))[-(ctx - new):]
        x = torch.tensor([ids], device=self.model.device)
        out = self.model.generate(x, new, temperature=temperature, seed=seed, eos_id=self._eos)[0, len(ids):].tolist()
        text = out[:out.index(self.tok.eos_id)] if self.tok.eos_id in out else out  # the document ended there
        return _cut(self.tok.decode(text), self.stop), len(out)  # every generated token is a cost


class HFGenerator:
    """The same protocol for a `transformers` causal LM and its tokenizer (anything with encode / decode)."""

    def __init__(self, model, tokenizer, stop: str | None = None):
        self.model, self.tokenizer, self.stop = model, tokenizer, stop

    def fits(self, prompt: str, max_new_tokens: int) -> bool:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return limit is None or len(self.tokenizer.encode(prompt)) + max_new_tokens <= limit

    @torch.inference_mode()
    def generate_text(self, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                      seed: int = 0) -> tuple[str, int]:
        ids = torch.tensor([list(self.tokenizer.encode(prompt))], device=self.model.device)
        sampling = dict(do_sample=True, temperature=temperature, top_k=None, top_p=None) if temperature > 0 else \
            dict(do_sample=False)
        with torch.random.fork_rng(devices=[]):  # transformers samples from the global generator
            torch.manual_seed(seed)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      pad_token_id=0, **sampling)
        new = out[0, ids.shape[1]:].tolist()
        return _cut(self.tokenizer.decode(new), self.stop), len(new)


def _cut(text: str, stop: str | None) -> str:
    """text up to and including the first `stop`."""
    if stop and stop in text:
        return text[:text.index(stop) + len(stop)]
    return text


def as_generator(obj, tokenizer=None, stop: str | None = None):
    """Anything with generate_text as is; a MiniLM; or a transformers model with its tokenizer."""
    from .model import MiniLM
    if hasattr(obj, "generate_text"):
        return obj
    if isinstance(obj, MiniLM):
        return MiniLMGenerator(obj, stop=stop)
    if hasattr(obj, "generate"):
        if tokenizer is None:
            raise TypeError(f"a {type(obj).__name__} needs its tokenizer: as_generator(model, tokenizer)")
        return HFGenerator(obj, tokenizer, stop=stop)
    raise TypeError(f"{type(obj).__name__} has neither generate_text nor generate")


# ---- the loop: generate -> critique -> revise ----------------------------------------------------------------
STRATEGIES = {
    "critique": "resample with the critique written above the prompt",
    "resample": "resample from the prompt alone (the control: plain rejection sampling)",
    "span": "keep the response up to its first fault and resample only the rest",
    "best_of_n": "draw n responses a round and keep the one with the fewest violations",
}


def default_critique(violations: Sequence[Violation]) -> str:
    """The critique as comment lines above the prompt: '# principle: message'."""
    return "".join(f"# {v.principle}: {v.message}\n" for v in violations)


def brief_critique(violations: Sequence[Violation]) -> str:
    """The principles' names only, '# revise: format, short', for models with a short context."""
    return f"# revise: {', '.join(dict.fromkeys(v.principle for v in violations))}\n"


@dataclass
class Round:
    index: int
    prompt: str                  # exactly what the generator was given (critique or kept prefix included)
    output: str                  # the round's response (best_of_n: its best candidate)
    violations: list[Violation]  # of `output`, failed checks included
    tokens: int                  # new tokens generated in the round, all candidates
    seconds: float               # generation and critique
    candidates: int = 1

    @property
    def findings(self) -> list[Violation]:
        """Violations the critics found (failed checks excluded)."""
        return [v for v in self.violations if not v.error]


@dataclass
class Correction:
    """What SelfCorrector returns: the chosen output and the full trace, whatever happened."""

    prompt: str
    rounds: list[Round]
    stopped: str                 # "clean", "failed_checks", "max_rounds", "time_budget" or "error"
    error: str = ""              # the generator's exception, when stopped == "error"
    chosen: int = -1             # the round whose output is returned

    @property
    def output(self) -> str:
        return self.rounds[self.chosen].output if self.rounds else ""

    @property
    def violations(self) -> list[Violation]:
        return self.rounds[self.chosen].violations if self.rounds else []

    @property
    def passed(self) -> bool:
        """Every check ran and found nothing."""
        return bool(self.rounds) and not self.violations

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.rounds)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rounds)


def _mix(seed: int, k: int) -> int:
    """A sampling seed for draw k of a run seeded `seed` (distinct, deterministic, within int64)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:7], "little")


class SelfCorrector:
    """Generate, critique against a constitution, revise, until no violation, `max_rounds` rounds or the time
    budget. max_rounds counts every round, the first generation included (max_rounds=1: generate and critique).

    Round r of "critique", "resample" and "span" draws with the same seed, and best_of_n's n candidates of round
    r use the draws r*n .. r*n+n-1: so "critique" differs from "resample" only by the critique in the prompt,
    and best_of_n(n=k, max_rounds=1) sees exactly the k draws resample(max_rounds=k) may use.
    No new generation starts once `time_budget_s` has passed (one already running is not interrupted). The
    output is that of the round with the fewest violations (the earliest among equals).
    """

    def __init__(self, generator, constitution: Constitution, strategy: str = "critique", max_rounds: int = 3,
                 n: int = 4, max_new_tokens: int = 64, temperature: float = 0.8, time_budget_s: float | None = None,
                 critique_format: Callable[[Sequence[Violation]], str] = default_critique, tokenizer=None,
                 stop: str | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
            raise ValueError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if time_budget_s is not None and not time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 or None, got {time_budget_s!r}")
        if not isinstance(constitution, Constitution):
            raise ValueError(f"constitution must be a Constitution, got {type(constitution).__name__}")
        self.generator = as_generator(generator, tokenizer=tokenizer, stop=stop)
        self.constitution, self.strategy, self.max_rounds, self.n = constitution, strategy, max_rounds, n
        self.max_new_tokens, self.temperature, self.time_budget_s = max_new_tokens, temperature, time_budget_s
        self.critique_format = critique_format

    def __call__(self, prompt: str, seed: int = 0) -> Correction:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        t0 = time.perf_counter()
        rounds, stopped, error = [], "max_rounds", ""

        def out_of_time() -> bool:
            return self.time_budget_s is not None and time.perf_counter() - t0 >= self.time_budget_s

        for r in range(self.max_rounds):
            if r and out_of_time():
                stopped = "time_budget"
                break
            try:
                rounds.append(self._round(r, prompt, rounds[-1] if rounds else None, seed, out_of_time))
            except Exception as e:  # noqa: BLE001 - a failing generator ends the run; the trace survives
                stopped, error = "error", f"{type(e).__name__}: {e}"
                break
            if not rounds[-1].findings:  # clean, or only failed checks: revising cannot repair a critic
                stopped = "clean" if not rounds[-1].violations else "failed_checks"
                break
        chosen = min(range(len(rounds)), key=lambda i: (len(rounds[i].findings), i)) if rounds else -1
        return Correction(prompt, rounds, stopped, error, chosen)

    def _draw(self, prompt: str, max_new: int, seed: int) -> tuple[str, int]:
        text, n_tokens = self.generator.generate_text(prompt, max_new, self.temperature, seed)
        return str(text), int(n_tokens)

    def _round(self, r: int, prompt: str, last: Round | None, seed: int, out_of_time) -> Round:
        t = time.perf_counter()
        head, keep, max_new = "", "", self.max_new_tokens
        if last is not None and self.strategy == "critique":
            head = self._fitting_critique(last.findings, prompt)
        elif last is not None and self.strategy == "span":
            start = min((v.span[0] if v.span else 0) for v in last.findings)
            keep = last.output[:start]
            max_new = max(1, max_new - len(keep.encode()))  # the same total length (in bytes)
        given = head + prompt + keep
        if self.strategy == "best_of_n":
            candidates, tokens = [], 0
            for j in range(self.n):
                if j and out_of_time():
                    break
                text, n_tokens = self._draw(given, max_new, _mix(seed, r * self.n + j))
                tokens += n_tokens
                candidates.append((text, self.constitution.critique(text, prompt)))
            # fewest findings first, then fewest failed checks; the earliest draw among equals
            text, violations = min(candidates, key=lambda c: (sum(not v.error for v in c[1]), len(c[1])))
            return Round(r, given, text, violations, tokens, time.perf_counter() - t, len(candidates))
        text, tokens = self._draw(given, max_new, _mix(seed, r))
        output = keep + text
        return Round(r, given, output, self.constitution.critique(output, prompt), tokens, time.perf_counter() - t)

    def _fitting_critique(self, findings: list[Violation], prompt: str) -> str:
        """The critique of all findings, else of the first one, else none: whatever fits the context."""
        fits = getattr(self.generator, "fits", lambda text, new: True)
        for critique in (self.critique_format(findings), self.critique_format(findings[:1])):
            if fits(critique + prompt, self.max_new_tokens):
                return critique
        return ""


# ---- the supervised stage: fine-tune on the revisions --------------------------------------------------------
def collect_revisions(corrector: SelfCorrector, prompts: Sequence[str], seed: int = 0,
                      clean_only: bool = True) -> list[tuple[str, str]]:
    """(prompt, final output) pairs from running the corrector on each prompt; only clean ones by default."""
    pairs = []
    for i, p in enumerate(prompts):
        c = corrector(p, seed=_mix(seed, i))
        if c.rounds and (c.passed or not clean_only):
            pairs.append((p, c.output))
    return pairs


def fine_tune(model, pairs: Sequence[tuple[str, str]], steps: int = 40, lr: float = 1e-3, batch_size: int = 8,
              seq_len: int | None = None, seed: int = 0, cache_dir: str | Path | None = None,
              progress: bool = False):
    """A copy of the MiniLM `model` trained for `steps` steps on the texts prompt + response (minimoe.train's loop:
    AdamW, warm-up + cosine). Documents are joined by <|eos|> as in pre-training, so the model learns to answer
    these prompts the way the revisions do. With cache_dir, the result is cached there under a hash of the base
    weights, the pairs and the settings, and a second call loads it.
    """
    import copy

    from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from .data import Document, TokenDataset
    from .train import TrainConfig, train
    if not pairs:
        raise ValueError("fine_tune needs at least one (prompt, response) pair")
    data = TokenDataset([Document(f"revision:{i}", "revisions", p + r, f"revision:{i}")
                         for i, (p, r) in enumerate(pairs)])
    seq_len = min(seq_len or model.config.max_seq_len, data.n_tokens() - 1)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=max(1, steps // 10),
                      eval_every=steps, eval_batches=1, seed=seed, device=model.device.type)
    folder = lock = None
    if cache_dir is not None:
        h = hashlib.sha256(json.dumps({"pairs": list(map(list, pairs)), "train": cfg.to_dict()}).encode())
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        folder = Path(cache_dir) / f"finetuned-{h.hexdigest()[:16]}"
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.parent / f".{folder.name}.lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer per result, across processes
    try:
        if folder is not None:
            try:
                return load_checkpoint(folder, device=model.device).eval()
            except CheckpointError:
                pass
        result = train(model.config, cfg, data=(data, data), model=copy.deepcopy(model), progress=progress)
        if folder is not None:
            save_checkpoint(folder, result.model, trainer_state={"history": result.history, "pairs": len(pairs)})
        return result.model.eval()
    finally:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
