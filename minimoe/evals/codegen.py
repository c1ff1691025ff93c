"""Code generation, scored by the harness: small function-writing tasks, reference programs that show each metric
working, sampling from our byte-level models, and the article's S3 table computed from the reports.

A task is a function header with a docstring (the prompt, HumanEval-style), unit tests, and for the sort task an
input generator for the complexity fit. Each test is one `assert CALL OP EXPECTED` with a literal EXPECTED: the
harness runs CALL in the sandbox and compares here (``code.split_tests``), so the expected values never reach the
program under test. A model's completion is cut at the first non-blank line that is not
indented (the function ended), so the program scored is the prompt plus the model's body.
"""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..data import ByteTokenizer
from . import code
from .suite import wilson_interval

_TOK = ByteTokenizer()


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str  # def line + docstring: what the model continues
    tests: str  # a test module: `from solution import *` and test_* functions, each `assert CALL == LITERAL`
    func: str
    make_input: str | None = None  # `def make_input(n)` for the complexity fit (only tasks where it means much)


def _task(name, signature, doc, checks, make_input=None) -> Task:
    tests = "from solution import *\n\n\n" + "".join(
        f"def test_{i}():\n    assert {check}\n\n\n" for i, check in enumerate(checks))
    return Task(name, f'def {signature}:\n    """{doc}"""\n', tests.rstrip() + "\n", signature.split("(")[0],
                make_input)


SORT_INPUT = "import random\n\n\ndef make_input(n):\n    return random.Random(n).sample(range(10 * n), n)\n"
SORT_TESTS = ["sort_items([3, 1, 2]) == [1, 2, 3]", "sort_items([]) == []", "sort_items([5, 5, 1]) == [1, 5, 5]",
              f"sort_items(list(range(20, 0, -1))) == {list(range(1, 21))}"]
TASKS = (
    _task("sort", "sort_items(items)", "Return a new list with the items in ascending order.", SORT_TESTS,
          SORT_INPUT),
    _task("add", "add(a, b)", "Return the sum of a and b.", ["add(2, 3) == 5", "add(-1, 1) == 0"]),
    _task("is_even", "is_even(n)", "Return True if n is even.", ["is_even(4) is True", "is_even(7) is False"]),
    _task("maximum", "maximum(items)", "Return the largest item.", ["maximum([1, 9, 3]) == 9", "maximum([-2]) == -2"]),
    _task("reverse", "reverse(text)", "Return the text reversed.", ["reverse('abc') == 'cba'", "reverse('') == ''"]),
    _task("count", "count(items, value)", "Return how many times value occurs in items.",
          ["count([1, 2, 1], 1) == 2", "count([], 3) == 0"]),
)
TASKS_BY_NAME = {t.name: t for t in TASKS}

# Reference programs written for the book: each makes one metric move. All define sort_items for TASKS[0].
REFERENCE_PROGRAMS = {
    "merge sort": '''def sort_items(items):
    """Return a new list with the items in ascending order (merge sort)."""
    if len(items) <= 1:
        return list(items)
    middle = len(items) // 2
    left, right = sort_items(items[:middle]), sort_items(items[middle:])
    merged, i, j = [], 0, 0
    while i < len(left) and j < len(right):  # take the smaller head each time
        if left[i] <= right[j]:
            merged.append(left[i])
            i += 1
        else:
            merged.append(right[j])
            j += 1
    return merged + left[i:] + right[j:]
''',
    "insertion sort": '''def sort_items(items):
    items = list(items)
    for i in range(1, len(items)):
        j = i
        while j > 0 and items[j-1] > items[j]:
            items[j-1], items[j] = items[j], items[j-1]; j -= 1
    return items
''',
    "wrong sort": '''def sort_items(items):
    """Return a new list with the items in ascending order."""
    return sorted(set(items))  # drops duplicates
''',
    "broken sort": '''def sort_items(items)
    """Return a new list with the items in ascending order."""
    return sorted(items)
''',
}


def complete_function(prompt: str, completion: bytes) -> bytes:
    """Prompt + completion up to the first non-blank line that starts at column 0 (the function has ended)."""
    lines = completion.split(b"\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line.strip() and not line[:1].isspace():
            break
        kept.append(line)
    return prompt.encode() + b"\n".join(kept).rstrip() + b"\n"


def sample_completions(model, prompt: str, n: int, temperature: float = 0.7, seed: int = 0,
                       max_new_tokens: int | None = None) -> list[bytes]:
    """`n` sampled continuations of `prompt` from a byte-level MiniLM, as raw bytes (maybe not valid UTF-8)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = _TOK.encode(prompt)
    room = int(model.config.max_seq_len) - len(ids)
    if room < 8:
        raise ValueError(f"the prompt ({len(ids)} bytes) leaves {room} of max_seq_len={model.config.max_seq_len}")
    new = room if max_new_tokens is None else min(int(max_new_tokens), room)
    device = next(model.parameters()).device
    x = torch.tensor([ids] * n, dtype=torch.long, device=device)
    with torch.no_grad():
        y = model.generate(x, new, temperature=temperature, seed=seed)[:, len(ids):].cpu().numpy()
    return [bytes(row[row < 256].astype(np.uint8)) for row in y]


def evaluate_model(model, tasks=TASKS, n: int = 8, temperature: float = 0.7, seed: int = 0,
                   complexity: bool = True) -> list[dict]:
    """Sample `n` completions per task and score each program with the harness; one row per sample."""
    rows = []
    for k, task in enumerate(tasks):
        for i, completion in enumerate(sample_completions(model, task.prompt, n, temperature, seed * 1000 + k)):
            source = complete_function(task.prompt, completion)
            report = code.evaluate_code(source, task.tests, task.func if complexity else None, task.make_input,
                                        prompt_lines=task.prompt.count("\n"))
            rows.append({"task": task.name, "sample": i, "source": source.decode("utf-8", errors="replace"),
                         "report": report})
    return rows


def evaluate_references(task: Task = TASKS[0], programs: dict | None = None) -> dict[str, code.CodeReport]:
    """The harness on the book's reference programs (all for the sort task)."""
    programs = REFERENCE_PROGRAMS if programs is None else programs
    return {name: code.evaluate_code(src, task.tests, task.func, task.make_input) for name, src in programs.items()}


def summarize(reports) -> dict:
    """The article's S3 columns over a list of CodeReports (plus the tests it names but does not report).

    compile rate: share that compiles (Wilson 95% interval); PEP 8: mean share of clean lines over the programs
    that compile; comments: mean coverage over the programs that compile and define a function; tests: share of
    programs that pass all their tests; complexity: the most common fitted class among programs that passed.
    """
    reports = list(reports)
    if not reports:
        raise ValueError("summarize() needs at least one report")
    ok = [r for r in reports if r.compiles]
    covered = [r.comment_coverage for r in ok if r.comment_coverage is not None]
    passed = [r for r in reports if r.passed]
    classes = Counter(r.complexity.label for r in passed if r.complexity and r.complexity.label)
    return {"n": len(reports), "compile_rate": len(ok) / len(reports),
            "compile_ci": wilson_interval(len(ok), len(reports)),
            "pep8": statistics.fmean(r.pep8 for r in ok) if ok else None,
            "comment_coverage": statistics.fmean(covered) if covered else None,
            "pass_rate": len(passed) / len(reports), "pass_ci": wilson_interval(len(passed), len(reports)),
            "complexity": classes.most_common(1)[0][0] if classes else None}


# The article's S3 table (section 4), cited as its claims: compile pass rate, time complexity, PEP 8, comments.
ARTICLE_S3 = {
    "DeepSeek": {"compile_rate": 0.92, "complexity": "O(n log n)", "pep8": 0.95, "comment_coverage": 0.80},
    "GPT-4": {"compile_rate": 0.89, "complexity": "O(n log n)", "pep8": 0.93, "comment_coverage": 0.75},
    "Claude": {"compile_rate": 0.85, "complexity": "O(n^2)", "pep8": 0.88, "comment_coverage": 0.60},
    "PaLM-2": {"compile_rate": 0.91, "complexity": "O(n log n)", "pep8": 0.90, "comment_coverage": 0.78},
}


def failure_reasons(reports) -> Counter:
    """Why programs did not compile, by kind ("IndentationError", "the completion adds no code", ...)."""
    return Counter(r.compile_reason.split(" line ")[0].split(":")[0].split(" (")[0]
                   for r in reports if not r.compiles)
