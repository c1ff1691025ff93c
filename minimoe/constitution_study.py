"""Chapter 4's measurement of the constitutional loop: task items and their checks, summaries over seeds, paired
comparisons, and studies of the revision strategies and of fine-tuning on revisions, cached as JSON.

The loop itself (principles, critics, the SelfCorrector, fine_tune) is ``minimoe.constitution``; this module only
measures it, on the book's two tasks: completing Python functions (``code_items``) and answering two-operator
arithmetic in a fixed format (``arithmetic_items``).
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .constitution import STRATEGIES, Constitution, Correction, SelfCorrector, _mix, fine_tune


# ---- measurement ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskItem:
    prompt: str
    answer: str = ""  # what the task check compares with; never shown to a critic


def run_items(corrector: SelfCorrector, items: Sequence[TaskItem], seed: int = 0) -> list[Correction]:
    """The corrector on every item; item i is run with a seed derived from (seed, i)."""
    return [corrector(item.prompt, seed=_mix(seed, i)) for i, item in enumerate(items)]


def summarize(results: Sequence[Correction], items: Sequence[TaskItem] | None = None,
              passed: Callable[[TaskItem, str], bool] | None = None) -> dict:
    """Rates and costs of a list of runs, for the first round's response and for the returned output.

    violation_rate: share of outputs with at least one finding (failed checks are counted apart, in
    failed_checks); pass_rate: share passing the task check `passed(item, output)`, which no critic sees.
    Costs: mean new tokens and seconds per run and, over all revision rounds (rounds after the first),
    mean tokens and seconds per revision round.
    """
    if not results:
        raise ValueError("summarize needs at least one result")

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    first = [c.rounds[0] for c in results if c.rounds]
    revisions = [r for c in results for r in c.rounds[1:]]
    names = [p for c in results for r in c.rounds for p in (v.principle for v in r.violations)]
    out = {
        "runs": len(results),
        "violation_rate_first": mean([bool(r.findings) for r in first]),
        "violation_rate": mean([any(not v.error for v in c.violations) for c in results]),
        "failed_checks": sum(any(v.error for v in c.violations) for c in results),
        "by_principle_first": {p: mean([any(v.principle == p for v in r.findings) for r in first])
                               for p in dict.fromkeys(names)},
        "by_principle": {p: mean([any(v.principle == p and not v.error for v in c.violations) for c in results])
                         for p in dict.fromkeys(names)},
        "tokens_first": mean([r.tokens for r in first]), "tokens": mean([c.tokens for c in results]),
        "seconds_first": mean([r.seconds for r in first]), "seconds": mean([c.seconds for c in results]),
        "rounds": mean([len(c.rounds) for c in results]), "revision_rounds": len(revisions),
        "tokens_per_revision": mean([r.tokens for r in revisions]),
        "seconds_per_revision": mean([r.seconds for r in revisions]),
        "stopped": {s: sum(c.stopped == s for c in results)
                    for s in ("clean", "failed_checks", "max_rounds", "time_budget", "error")},
    }
    out["extra_tokens"] = out["tokens"] - out["tokens_first"]
    out["extra_seconds"] = out["seconds"] - out["seconds_first"]
    if passed is not None:
        if items is None or len(items) != len(results):
            raise ValueError("a task check needs the items, one per result")
        out["pass_rate_first"] = mean([passed(i, c.rounds[0].output) for i, c in zip(items, results) if c.rounds])
        out["pass_rate"] = mean([passed(i, c.output) for i, c in zip(items, results)])
    return out


def compare_paired(a: Sequence[float], b: Sequence[float], names: tuple[str, str] = ("a", "b")) -> dict:
    """minimoe.report.compare_seeds for paired runs, where seed i of `a` and of `b` share the model, the prompts and
    the sampling seeds (with and without the loop; before and after fine-tuning). The per-seed difference a - b
    counts only when its mean is larger than its seed-to-seed spread (max - min); otherwise "tie". Needs >= 3 seeds.
    Returns the means, "diff" (mean difference), "spread", "verdict" and "lower_in" (seeds where a < b)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b) or len(a) < 3:
        raise ValueError(f"compare at least three paired seeds, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    diff, spread = sum(d) / len(d), max(d) - min(d)
    verdict = "tie" if abs(diff) <= spread else f"{names[0] if diff < 0 else names[1]} lower"
    return {"mean_a": sum(a) / len(a), "mean_b": sum(b) / len(b), "diff": diff, "spread": spread,
            "verdict": verdict, "lower_in": sum(x < 0 for x in d)}


# ---- studies over seeds (chapter 4), cached as JSON ------------------------------------------------------------
def fingerprint(*parts) -> str:
    """A hash of models (their weights), constitutions (what they were built from), JSON-able data and this
    module's and the code harness's source, so a cached study is redone when any of them changes."""
    h = hashlib.sha256()
    for f in (Path(__file__), Path(__file__).parent / "constitution.py", Path(__file__).parent / "evals" / "code.py"):
        h.update(f.read_bytes() if f.exists() else b"")

    def add(x):
        if isinstance(x, torch.nn.Module):
            for name, t in sorted(x.state_dict().items()):
                h.update(name.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Constitution):
            add(x.source if x.source is not None else [(p.name, p.statement, p.kind) for p in x])
        elif isinstance(x, (list, tuple)):
            for y in x:
                add(y)
        elif isinstance(x, TaskItem):
            add([x.prompt, x.answer])
        elif callable(x):
            h.update(f"{getattr(x, '__module__', '')}.{getattr(x, '__qualname__', repr(x))}".encode())
        else:
            h.update(json.dumps(x, sort_keys=True, default=repr).encode())
    for p in parts:
        add(p)
    return h.hexdigest()[:16]


def _cached(path: Path | None, compute: Callable[[], dict]) -> dict:
    if path is not None and path.exists():
        return json.loads(path.read_text())
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(value)}")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)
    return value


def _warm_up(models: Sequence, constitution: Constitution, items: Sequence[TaskItem], kw: dict) -> None:
    """One untimed draw and critique per model, so first-call costs (imports, kernel set-up) stay out of timings."""
    for m in models:
        SelfCorrector(m, constitution, "resample", 1, **kw)(items[0].prompt, seed=-1)


def strategy_study(models: Sequence, constitution: Constitution, items: Sequence[TaskItem],
                   passed: Callable[[TaskItem, str], bool] | None = None, strategies: Sequence[str] = tuple(STRATEGIES),
                   max_rounds: int = 4, cache_dir: str | Path | None = None, **kw) -> dict[str, list[dict]]:
    """{strategy: [summarize(...) for each seed]}: seed i runs models[i] (pass one model several times to vary only
    the sampling seed). best_of_n runs one round of max_rounds draws, the most any other strategy may draw.
    kw: SelfCorrector settings (stop, max_new_tokens, temperature, critique_format)."""
    def compute():
        _warm_up(models, constitution, items, kw)
        out = {}
        for strategy in strategies:
            rounds, n = (1, max_rounds) if strategy == "best_of_n" else (max_rounds, 1)
            runs = [run_items(SelfCorrector(m, constitution, strategy, rounds, n=n, **kw), items, seed)
                    for seed, m in enumerate(models)]
            out[strategy] = [summarize(r, items, passed) for r in runs]
        return out
    key = fingerprint("strategies", list(models), constitution, list(items), passed, list(strategies), max_rounds,
                      sorted(kw.items()))
    return _cached(None if cache_dir is None else Path(cache_dir) / f"strategies-{key}.json", compute)


def finetune_study(models: Sequence, constitution: Constitution, collect: Sequence[TaskItem],
                   items: Sequence[TaskItem], passed: Callable[[TaskItem, str], bool] | None = None,
                   strategy: str = "resample", max_rounds: int = 4, steps: int = 40, lr: float = 1e-3,
                   batch_size: int = 8, seq_len: int | None = None, control: bool = True,
                   cache_dir: str | Path | None = None, **kw) -> dict:
    """The supervised stage, per seed i: run the corrector on the `collect` prompts with models[i], fine-tune
    models[i] on the clean (prompt, final output) pairs, and measure the tuned model on `items` with no wrapper
    (one draw, critiqued only). With `control`, the same training on the first drafts of the same prompts,
    unfiltered, tells what the revisions add over in-domain text alone.
    A seed with no clean pair keeps its base model (pairs[i] == 0 says so).
    Returns {"pairs": [n per seed], "revisions": [summary per seed], "drafts": [...] or [], "samples": [...]}."""
    def compute():
        _warm_up(models, constitution, items, kw)
        out = {"pairs": [], "revisions": [], "drafts": [], "samples": []}
        for seed, model in enumerate(models):
            fix = SelfCorrector(model, constitution, strategy, max_rounds, **kw)
            runs = run_items(fix, collect, seed=seed)
            clean = [(it, c) for it, c in zip(collect, runs) if c.passed]
            out["pairs"].append(len(clean))
            sets = [("revisions", [(it.prompt, c.output) for it, c in clean])]
            if control:
                sets.append(("drafts", [(it.prompt, c.rounds[0].output) for it, c in clean]))
            for label, pairs in sets:
                # no clean pair: nothing to learn from, so this seed's "fine-tuned" model is the base model itself,
                # measured as it is (a weak model can fail every prompt; the paired comparison stays defined)
                tuned = fine_tune(model, pairs, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed,
                                  cache_dir=cache_dir) if pairs else model
                plain = SelfCorrector(tuned, constitution, "resample", 1, **kw)
                results = run_items(plain, items, seed=seed)
                out[label].append(summarize(results, items, passed))
                if label == "revisions":
                    out["samples"].append([c.output for c in results])
        return out
    # "finetune-2": a seed without pairs is measured (it was None before); older cached studies are not read
    key = fingerprint("finetune-2", list(models), constitution, list(collect), list(items), passed, strategy,
                      max_rounds, steps, lr, batch_size, seq_len, control, sorted(kw.items()))
    return _cached(None if cache_dir is None else Path(cache_dir) / f"finetune-{key}.json", compute)


# ---- the book's two tasks (chapter 4) -----------------------------------------------------------------------
def arithmetic_items(n: int, start: int = 0, max_ops: int = 2) -> list[TaskItem]:
    """Held-out expression questions of minimoe.synthetic's arithmetic domain with at most `max_ops` operators,
    e.g. "Q: 9 + 7 * 5 = ?\nA:"; the model writes the steps and "So the answer is 44.". answer = the value."""
    from .synthetic import held_out_examples
    m = 8 * (start + n) + 64
    while True:
        found = [e for e in held_out_examples("arithmetic", m)
                 if e.key.startswith("expr:") and len(e.key[5:].split()) // 2 <= max_ops]
        if len(found) >= start + n or m > 1 << 15:
            break
        m *= 2
    if len(found) < start + n:
        raise ValueError(f"only {len(found)} held-out expressions with at most {max_ops} operators")
    return [TaskItem(e.question, e.answer.strip()) for e in found[start:start + n]]


def arithmetic_passed(item: TaskItem, response: str) -> bool:
    """The response concludes "So the answer is <the right value>."."""
    m = re.search(r"So the answer is (-?\d+)\.", response)
    return bool(m) and m.group(1) == item.answer


# (name, parameters, docstring) of small functions whose body the code model completes after "return "
CODE_FUNCTIONS = (
    ("mean", "values", "Return the arithmetic mean of values."),
    ("is_even", "n", "Return True if n is even."),
    ("clamp", "x, lo, hi", "Return x limited to the range [lo, hi]."),
    ("first", "items", "Return the first item of items."),
    ("last", "items", "Return the last item of items."),
    ("square", "x", "Return x squared."),
    ("is_empty", "items", "Return True if items has no elements."),
    ("join_words", "words", "Return the words joined by single spaces."),
    ("count_lines", "text", "Return the number of lines in text."),
    ("to_upper", "name", "Return name in upper case."),
    ("add", "a, b", "Return the sum of a and b."),
    ("area", "width, height", "Return the area of a rectangle."),
    ("reverse", "items", "Return a reversed copy of the list items."),
    ("has_key", "mapping, key", "Return True if key is in mapping."),
    ("strip_all", "lines", "Return the lines without surrounding whitespace."),
    ("maximum", "values", "Return the largest of values."),
    ("is_blank", "line", "Return True if line holds only whitespace."),
    ("double", "x", "Return twice x."),
    ("get_name", "self", "Return the name of this object."),
    ("size", "self", "Return the number of items held."),
    ("basename", "path", "Return the final component of path."),
    ("split_words", "text", "Return the words of text."),
    ("unique", "items", "Return the distinct items, in a set."),
    ("negate", "flag", "Return the opposite of flag."),
    ("total", "prices", "Return the sum of prices."),
    ("average", "a, b", "Return the mean of a and b."),
    ("starts_with_a", "word", "Return True if word starts with 'a'."),
    ("lower_keys", "d", "Return a copy of d with lower-case keys."),
    ("pairs", "d", "Return the (key, value) pairs of d as a list."),
    ("get", "d, key, default=None", "Return d[key], or default if key is missing."),
    ("encode", "text", "Return text encoded as UTF-8 bytes."),
    ("is_positive", "x", "Return True if x is greater than zero."),
    ("cube", "x", "Return x to the power of three."),
    ("second", "items", "Return the second item of items."),
    ("length", "seq", "Return the number of elements in seq."),
    ("copy_list", "items", "Return a shallow copy of items."),
    ("half", "n", "Return n divided by two."),
    ("swap", "a, b", "Return b and a as a tuple."),
    ("is_digit", "char", "Return True if char is a decimal digit."),
    ("repeat", "text, times", "Return text repeated times times."),
)


def code_items(n: int, start: int = 0) -> list[TaskItem]:
    """Function headers with a docstring, ending at "return ": the model writes the returned expression.
    answer = the parameter names, comma-separated."""
    if start + n > len(CODE_FUNCTIONS):
        raise ValueError(f"there are {len(CODE_FUNCTIONS)} code prompts, asked for {start} + {n}")
    out = []
    for name, params, doc in CODE_FUNCTIONS[start:start + n]:
        names = [p.split("=")[0].strip() for p in params.split(",")]
        out.append(TaskItem(f'def {name}({params}):\n    """{doc}"""\n    return ', ",".join(names)))
    return out


def code_passed(item: TaskItem, response: str) -> bool:
    """The completed function compiles, its return expression uses a parameter, and every name it reads is a
    parameter or a builtin (so it cannot fail with NameError). No critic checks the last two."""
    import builtins

    from .evals.code import check_compiles
    params = [p for p in item.answer.split(",") if p]
    if not check_compiles(item.prompt + response).ok:
        return False
    names = {n.id for n in ast.walk(ast.parse(item.prompt + response)) if isinstance(n, ast.Name)}
    return bool(names & set(params)) and names <= set(params) | set(dir(builtins))
