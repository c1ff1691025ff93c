"""The article's four application scenarios (its section 4 "scenario matrix"), each reduced to a number our models
produce, and a "best fit" derived from those numbers instead of asserted.

* long text         - retrieval: a fact stated once in a chat, asked for after filler turns; accuracy against the
                      context length and the fact's depth, up to and past each model's context window;
* real-time dialogue - per-reply latency (p50 / p95) at batch 1: prefill the chat, then decode the reply;
* code generation   - the harness's pass rate on the function-writing tasks (``codegen``);
* knowledge reasoning - the capability suite's knowledge and reasoning axes (chapter 3).

``best_fit`` names a model for a scenario only when its result is better than every other model's by more than the
uncertainty (non-overlapping 95% intervals for accuracies, the seed-to-seed range for latency); otherwise the row is
a tie, and it says so.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch

from .. import synthetic
from ..data import ByteTokenizer
from ..device import synchronize
from .suite import Item, _make_item, _pick_distractors, score_items, wilson_interval

_TOK = ByteTokenizer()
_SLOTS = {  # slot -> (statement, question, cue, pool): the chat domain's own phrasing, so the format is familiar
    "city": ("I live in {}.", "Where do I live?", "You live in", synthetic._CITIES),
    "colour": ("My favourite colour is {}.", "What is my favourite colour?", "Your favourite colour is",
               synthetic._COLOURS),
    "name": ("My name is {}.", "What is my name?", "Your name is", synthetic._NAMES),
}


def _turn(user: str, bot: str) -> str:
    return f"User: {user}\nBot: {bot}\n"


def retrieval_items(n: int, fillers: int, depth: float, k: int = 4, seed: int = 0) -> list[Item]:
    """Chats with one fact and `fillers` small-talk turns; the fact sits at `depth` (0 = first turn, 1 = just
    before the question). The model must continue the bot's cue with the stated value among `k` candidates.

    The values and filler turns are the chat domain's, but every chat is generated here from its own seed, so no
    chat is a training document (the facts are arbitrary: they cannot be memorised, only read from the context).
    """
    if n < 1 or fillers < 0 or not 0.0 <= depth <= 1.0 or k < 2:
        raise ValueError(f"need n >= 1, fillers >= 0, 0 <= depth <= 1 and k >= 2; got {n}, {fillers}, {depth}, {k}")
    rng = random.Random(f"retrieval:{seed}:{fillers}:{depth}")
    items = []
    for i in range(n):
        slot = rng.choice(sorted(_SLOTS))
        statement, question, cue, pool = _SLOTS[slot]
        value = rng.choice(pool)
        turns = [_turn(q, a) for q, a in rng.sample(synthetic._FILLER, fillers)]
        turns.insert(round(depth * fillers), _turn(statement.format(value), rng.choice(synthetic._ACKS)))
        prompt = "".join(turns) + f"User: {question}\nBot: {cue}"
        wrong = _pick_distractors(value, pool, k - 1, rng)
        items.append(_make_item(prompt, " " + value, [" " + w for w in wrong], rng, f"retrieval:{slot}:{i}"))
    return items


def retrieval_grid(model, fillers=(0, 1, 2, 3, 4), depths=(0.0, 0.5, 1.0), n: int = 100, k: int = 4,
                   seed: int = 0) -> list[dict]:
    """Accuracy per (number of filler turns, depth), with the mean prompt length in bytes and how many prompts did
    not fit the model's context (left-truncated: the fact may be cut off)."""
    rows = []
    for f in fillers:
        for d in sorted({round(d * f) / f if f else 0.0 for d in depths}):  # distinct positions only
            items = retrieval_items(n, f, d, k, seed)
            scored = score_items(model, items)
            correct = sum(scored["correct"])
            length = statistics.fmean(len(_TOK.encode(it.prompt)) for it in items)
            rows.append({"fillers": f, "depth": d, "context_bytes": length,
                         "accuracy": correct / n, "ci": wilson_interval(correct, n), "n": n,
                         "truncated": scored["truncated"], "chance": 1 / k})
    return rows


def reply_latencies(models: dict, n_replies: int = 20, reply_tokens: int = 24, fillers: int = 2, seed: int = 0,
                    warmup: int = 2) -> dict[str, dict]:
    """Wall-clock time of each reply at batch 1: one chat prompt prefilled, then `reply_tokens` greedy tokens with
    the KV cache; p50 / p95 over `n_replies` chats (after `warmup` untimed ones), in milliseconds.

    models: {name: model}. The models take turns on every chat (round robin), so a burst of load from elsewhere on
    the machine slows them all alike instead of whichever model happened to be timed at that moment."""
    if n_replies < 1 or reply_tokens < 1:
        raise ValueError("n_replies and reply_tokens must be >= 1")
    items = retrieval_items(n_replies + warmup, fillers, 0.5, seed=seed)
    times = {name: [] for name in models}
    with torch.inference_mode():
        for i, it in enumerate(items):
            for name, model in models.items():
                device = next(model.parameters()).device
                room = int(model.config.max_seq_len) - reply_tokens
                x = torch.tensor([_TOK.encode(it.prompt)[-room:]], device=device)
                synchronize(device)
                start = time.perf_counter()
                model.generate(x, reply_tokens, temperature=0.0)
                synchronize(device)
                if i >= warmup:
                    times[name].append(1000 * (time.perf_counter() - start))
    out = {}
    for name, model in models.items():
        t = times[name]
        room = int(model.config.max_seq_len) - reply_tokens
        q = statistics.quantiles(t, n=20, method="inclusive") if len(t) > 1 else t * 19
        out[name] = {"p50_ms": statistics.median(t), "p95_ms": q[18], "n": len(t), "reply_tokens": reply_tokens,
                     "prompt_bytes": statistics.fmean(min(len(_TOK.encode(it.prompt)), room) for it in items),
                     "device": str(next(model.parameters()).device)}
    return out


def reply_latency(model, **kwargs) -> dict:
    """reply_latencies for one model."""
    return reply_latencies({"model": model}, **kwargs)["model"]


@dataclass
class Measure:
    """One model's number for one scenario, with an interval: (low, high) for an accuracy or a seed range."""

    value: float
    low: float
    high: float
    higher_is_better: bool = True


def best_fit(measures: dict[str, Measure]) -> str:
    """The model whose interval lies entirely on the better side of every other model's interval, else "tie"."""
    if not measures:
        raise ValueError("best_fit needs at least one model")
    for name, m in measures.items():
        others = [o for o in measures.values() if o is not m]
        if m.higher_is_better and all(m.low > o.high for o in others):
            return name
        if not m.higher_is_better and all(m.high < o.low for o in others):
            return name
    return "tie"


# ---- the matrix: every scenario measured on every model (all seeds of each), then a best fit per row ------------

SCENARIOS = {  # name -> (metric, higher is better)
    "long text": ("retrieval accuracy within the context window", True),
    "real-time dialogue": ("reply latency p50 (ms), batch 1", False),
    "code generation": ("unit-test pass rate of sampled functions", True),
    "knowledge reasoning": ("accuracy on the suite's knowledge + reasoning items", True),
}
ARTICLE_FITS = ("DeepSeek", "Claude", "GPT-4")  # the article's figure names these; its arrows did not survive


def _pooled(successes: int, n: int) -> Measure:
    low, high = wilson_interval(successes, n)
    return Measure(successes / n, low, high)


def measure_model(name: str, fillers=(0, 1, 2, 4), depths=(0.0, 1.0), n_retrieval: int = 60, n_code: int = 4,
                  model=None) -> dict:
    """What the matrix needs from one zoo model (one seed), except latency, which is timed for all models at once.
    model: the zoo model `name`, if already loaded."""
    from .. import studies, zoo
    from . import codegen
    if model is None:
        model = zoo.load(name, progress=False).model.eval()
    grid = retrieval_grid(model, fillers, depths, n=n_retrieval)
    code_rows = codegen.evaluate_model(model, n=n_code, complexity=False)
    suite = studies.suite_scores(name)
    qa = [suite[a] for a in ("knowledge", "reasoning")]
    return {"name": name, "context": int(model.config.max_seq_len), "retrieval": grid,
            "code": codegen.summarize(r["report"] for r in code_rows),
            "qa_correct": sum(round(a.value * a.n) for a in qa), "qa_n": sum(a.n for a in qa)}


def scenario_matrix(models: dict[str, list[str]], progress: bool = True, n_replies: int = 10, **kwargs) -> dict:
    """Measure every seed of every model ({label: [zoo names]}), pool the seeds, and pick a best fit per scenario.

    Returns {"measured": {label: [per-seed dicts]}, "measures": {scenario: {label: Measure}},
    "rows": [{"scenario", "metric", <label>: "value [low, high]", "best fit"}]}.
    """
    from tqdm.auto import tqdm

    from .. import zoo
    names = [(label, name) for label, group in models.items() for name in group]
    loaded = {name: zoo.load(name, progress=False).model.eval() for _, name in names}
    measured = {label: [] for label in models}
    for label, name in tqdm(names, desc="scenario matrix", disable=not progress):
        measured[label].append(measure_model(name, model=loaded[name], **kwargs))
    latency = reply_latencies(loaded, n_replies)
    for runs in measured.values():
        for run in runs:
            run["latency"] = latency[run["name"]]
    measures = {s: {} for s in SCENARIOS}
    for label, runs in measured.items():
        inside = [r for run in runs for r in run["retrieval"] if r["truncated"] == 0]
        measures["long text"][label] = _pooled(sum(round(r["accuracy"] * r["n"]) for r in inside),
                                               sum(r["n"] for r in inside))
        p50 = [run["latency"]["p50_ms"] for run in runs]
        measures["real-time dialogue"][label] = Measure(statistics.fmean(p50), min(p50), max(p50), False)
        measures["code generation"][label] = _pooled(sum(round(run["code"]["pass_rate"] * run["code"]["n"])
                                                         for run in runs), sum(run["code"]["n"] for run in runs))
        measures["knowledge reasoning"][label] = _pooled(sum(run["qa_correct"] for run in runs),
                                                         sum(run["qa_n"] for run in runs))
    rows = []
    for scenario, (metric, _) in SCENARIOS.items():
        row = {"scenario": scenario, "metric": metric}
        for label, m in measures[scenario].items():
            fmt = "{:.0f}" if scenario == "real-time dialogue" else "{:.2f}"
            row[label] = f"{fmt.format(m.value)} [{fmt.format(m.low)}, {fmt.format(m.high)}]"
        row["best fit"] = best_fit(measures[scenario])
        rows.append(row)
    return {"measured": measured, "measures": measures, "rows": rows}
