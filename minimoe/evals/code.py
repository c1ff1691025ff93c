"""A code-quality harness: the article's four columns (compile rate, time complexity, PEP 8, comments) measured.

For any Python source, ``evaluate_code`` reports

* **compiles** - ``compile()`` accepts it (nothing runs);
* **PEP 8** - the share of non-blank lines on which ``pycodestyle`` (the reference checker) finds no violation;
* **comment coverage** - the share of functions (``def`` and ``async def``, methods included) that have a docstring
  or at least one ``#`` comment in their body or on the line just above them;
* **tests** - small unit tests run against the source *in the sandbox* (``minimoe.evals.sandbox``): every
  ``test_*`` function of a test module that does ``from solution import *``, each check an ``assert`` with the
  expected value as a literal. The sandbox computes the values; this process compares them with the expected ones,
  which never enter the sandbox, so a program cannot print or forge its way to a pass (``split_tests``). A test
  that raises is a failure;
* **time complexity** - run time measured in the sandbox at doubling input sizes and fitted by least squares in
  log space to ``c * n``, ``c * n log n`` and ``c * n**2``; the smallest residual names the class.

Nothing the source does can crash the harness: undecodable bytes, empty source, a syntax error, a test that raises,
an infinite loop or a memory bomb each become a scored failure with a reason.
"""
from __future__ import annotations

import ast
import functools
import io
import json
import math
import operator
import tokenize
from dataclasses import asdict, dataclass, field

import pycodestyle

from . import sandbox

PEP8_MAX_LINE = 79  # plain pycodestyle's default, as the article's "PEP 8 compliance" implies
COMPLEXITY_CLASSES = {"O(n)": lambda n: n, "O(n log n)": lambda n: n * math.log2(n), "O(n^2)": lambda n: n * n}
COMPLEXITY_SIZES = (64, 128, 256, 512, 1024, 2048)


@dataclass
class CheckResult:
    ok: bool
    reason: str = ""


@dataclass
class Pep8Result:
    share: float  # non-blank lines with no violation / non-blank lines (0.0 for empty source)
    violations: list[str]  # "line:col CODE text"
    lines: int  # non-blank lines checked


def decode(source: str | bytes) -> tuple[str | None, str]:
    """(text, "") or (None, reason) for bytes that are not UTF-8 or for anything that is not source."""
    if isinstance(source, bytes):
        try:
            return source.decode("utf-8"), ""
        except UnicodeDecodeError as e:
            return None, f"source is not valid UTF-8 ({e.reason} at byte {e.start})"
    if not isinstance(source, str):
        return None, f"source must be str or bytes, got {type(source).__name__}"
    return source, ""


def check_compiles(source: str | bytes) -> CheckResult:
    """Does Python accept the source? Compiling runs nothing; an empty program does not count as code."""
    text, reason = decode(source)
    if text is None:
        return CheckResult(False, reason)
    if not text.strip():
        return CheckResult(False, "empty source")
    try:
        compile(text, "<generated>", "exec", dont_inherit=True)
    except SyntaxError as e:
        return CheckResult(False, f"{type(e).__name__} line {e.lineno}: {e.msg}")
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        return CheckResult(False, f"{type(e).__name__}: {e}")
    return CheckResult(True)


class _Collect(pycodestyle.BaseReport):
    def __init__(self, options):
        super().__init__(options)
        self.found = []

    def error(self, line_number, offset, text, check):
        code = super().error(line_number, offset, text, check)
        if code:
            self.found.append((line_number, offset + 1, text))
        return code


def pep8(source: str | bytes, max_line_length: int = PEP8_MAX_LINE, skip_lines: int = 0) -> Pep8Result:
    """pycodestyle's verdict, line by line, with its default checks (line length `max_line_length`).

    skip_lines: the first lines are given (a prompt), so only the lines after them are scored."""
    text, _ = decode(source)
    if text is None or not text.strip():
        return Pep8Result(0.0, [], 0)
    lines = text.splitlines(keepends=True)
    if not lines[-1].endswith("\n"):
        lines[-1] += "\n"  # W292 (no newline at end of file) is about the file, not the code we were given
    style = pycodestyle.StyleGuide(max_line_length=max_line_length, reporter=_Collect, quiet=True)
    checker = pycodestyle.Checker(lines=lines, options=style.options, report=style.options.report)
    checker.check_all()
    found = checker.report.found
    nonblank = {i for i, line in enumerate(lines, 1) if line.strip() and i > skip_lines}
    found = [f for f in found if f[0] > skip_lines]
    if not nonblank:
        return Pep8Result(0.0, [], 0)
    bad = {line for line, _, _ in found} & nonblank
    return Pep8Result(1 - len(bad) / len(nonblank), [f"{ln}:{col} {msg}" for ln, col, msg in found], len(nonblank))


def comment_coverage(source: str | bytes, skip_lines: int = 0) -> float | None:
    """Share of functions with a docstring or a comment (in the body or on the line above); None if the source
    does not parse or defines no function. Docstrings and comments in the first `skip_lines` (a prompt) do not
    count."""
    text, _ = decode(source)
    if text is None or not check_compiles(text).ok:
        return None
    functions = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not functions:
        return None
    try:
        comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                    if tok.type == tokenize.COMMENT and tok.start[0] > skip_lines}
    except (tokenize.TokenError, SyntaxError):
        comments = set()

    def documented(fn) -> bool:
        first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
        docstring = ast.get_docstring(fn) is not None and fn.body[0].lineno > skip_lines
        return docstring or any(first - 1 <= ln <= fn.end_lineno for ln in comments)

    return sum(map(documented, functions)) / len(functions)


# ---- running tests and timing, inside the sandbox -------------------------------------------------------------
#
# The program under test must not decide its own verdict. A test module is therefore split here, in the parent:
# each `assert CALL OP EXPECTED` of a test function becomes `_report(k, CALL)` in the copy that enters the sandbox,
# and EXPECTED (a literal) and OP stay here. Inside, the runner calls each test function; `_report` writes the
# value's repr to the sandbox's result channel (a pipe of its own, not stdout). Here the repr is read back with
# ast.literal_eval and compared. Whatever the solution prints, patches or writes to the channel, a test passes only
# if values equal to the expected ones came back, and those values never entered the sandbox.

_TEST_RUNNER = """
import json, os, sys, traceback, types
RESULTS = {result_fd}


def _send(row):
    os.write(RESULTS, (json.dumps(row) + "\\n").encode())


def _report(case, value):
    _send({{"case": case, "value": repr(value)}})


tests = types.ModuleType("tests")
tests._report = _report
sys.modules["tests"] = tests
try:
    with open("tests.py", encoding="utf-8") as f:
        exec(compile(f.read(), "tests.py", "exec"), vars(tests))
except BaseException as e:  # the solution (imported by the tests) or the tests themselves do not load
    _send({{"load_error": f"{{type(e).__name__}}: {{e}}"[:200]}})
    raise SystemExit(0)
for name in {names!r}:
    try:
        getattr(tests, name)()
    except BaseException as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        _send({{"test": name, "error": f"{{type(e).__name__}}: {{e}}"[:200],
               "where": f"{{where.filename.rsplit('/', 1)[-1]}}:{{where.lineno}}"}})
"""

_TIMER = """
import json, os, time
from solution import {func} as target
{make_input}
for n in {sizes}:
    best = float("inf")
    for _ in range({repeats}):
        calls, start = 0, time.perf_counter()
        while True:
            data = make_input(n)  # a fresh input per call: sorting a sorted list is another benchmark
            t0 = time.perf_counter()
            target(data)
            best = min(best, time.perf_counter() - t0)
            calls += 1
            if time.perf_counter() - start > {min_time}:
                break
    os.write({result_fd}, (json.dumps({{"n": n, "seconds": best}}) + "\\n").encode())
"""

_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Is: "is",
        ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}
_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
            ">=": operator.ge, "is": operator.is_, "is not": operator.is_not, "in": lambda a, b: a in b,
            "not in": lambda a, b: a not in b}
_VALUE_LIMIT = 100_000  # characters of one returned value's repr


@dataclass(frozen=True)
class Check:
    """One assert of a test function, as the parent judges it: `call` runs in the sandbox, the rest stays here."""
    test: str  # the test_* function
    line: int  # the assert's line in the test module
    call: str  # source of the expression evaluated in the sandbox
    op: str  # "==", "is", "in", ...; "true" or "false" for a bare `assert CALL` / `assert not CALL`
    expected: object = None  # a literal, never sent to the sandbox
    expected_left: bool = False  # `assert EXPECTED OP CALL`

    def judge(self, value) -> bool:
        if self.op in ("true", "false"):
            return bool(value) == (self.op == "true")
        compare = _COMPARE[self.op]
        return bool(compare(self.expected, value) if self.expected_left else compare(value, self.expected))

    def describe(self, value) -> str:
        if self.op in ("true", "false"):
            return f"{self.call} gave {value!r}, expected a {self.op} value"
        wanted = f"{self.expected!r} {self.op} it" if self.expected_left else f"{self.op} {self.expected!r}"
        return f"{self.call} gave {value!r}, expected {wanted}"


def _literal(node):
    """(True, value) if `node` is a literal (ast.literal_eval accepts it), else (False, None)."""
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _check(test: str, node: ast.Assert, text: str) -> Check:
    source = functools.partial(ast.get_source_segment, text)
    test_node = node.test
    if isinstance(test_node, ast.Compare) and len(test_node.ops) == 1 and type(test_node.ops[0]) in _OPS:
        op = _OPS[type(test_node.ops[0])]
        (left_literal, left), (right_literal, right) = _literal(test_node.left), _literal(test_node.comparators[0])
        if right_literal:
            return Check(test, node.lineno, source(test_node.left), op, right)
        if left_literal:
            return Check(test, node.lineno, source(test_node.comparators[0]), op, left, expected_left=True)
        raise ValueError(f"{test} line {node.lineno}: one side of `{op}` must be a literal (the expected value, "
                         "which stays out of the sandbox)")
    op = "true"
    if isinstance(test_node, ast.UnaryOp) and isinstance(test_node.op, ast.Not):
        op, test_node = "false", test_node.operand
    if isinstance(test_node, (ast.Compare, ast.BoolOp)):  # it would be compared inside, by the program's objects
        raise ValueError(f"{test} line {node.lineno}: assert one comparison with a literal side (no chains, "
                         "`and` or `or`), so that the comparison is made outside the sandbox")
    return Check(test, node.lineno, source(test_node), op)


def split_tests(tests: str) -> tuple[str, list[str], list[Check]]:
    """Split a test module into (the copy that enters the sandbox, its test_* names, the checks judged here).

    A test is a top-level `def test_*():` whose checks are top-level `assert` statements of its body, each
    `assert CALL OP EXPECTED` (OP one comparison, EXPECTED a literal on either side), `assert CALL` or
    `assert not CALL`; other statements (set-up) run in the sandbox as written. In the copy each assert becomes
    `_report(k, (CALL))`, on the same lines, so the expected values and assert messages never enter the sandbox.
    Raises ValueError for what the parent could not judge: no test, a test without a top-level assert, an assert
    nested in a block (whether it ran at all would be the program's word), no literal side."""
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"the tests define no test_* function (they do not parse: {e})") from None
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    if not functions:
        raise ValueError("the tests define no test_* function")
    checks, spans = [], []
    for fn in functions:
        top = [s for s in fn.body if isinstance(s, ast.Assert)]
        nested = [n for s in fn.body if not isinstance(s, ast.Assert) for n in ast.walk(s) if isinstance(n, ast.Assert)]
        if nested:
            raise ValueError(f"{fn.name} line {nested[0].lineno}: an assert inside a block or nested function; "
                             "write each check as a top-level assert of the test")
        if not top:
            raise ValueError(f"{fn.name} has no top-level assert the harness can judge")
        for node in top:
            checks.append(_check(fn.name, node, tests))
            spans.append((node, len(checks) - 1))
    lines = io.StringIO(tests, newline="").readlines()  # split where the parser does, ends kept

    def offset(lineno: int, col: int) -> int:  # ast columns count UTF-8 bytes
        return sum(map(len, lines[:lineno - 1])) + len(lines[lineno - 1].encode("utf-8")[:col].decode("utf-8"))

    sent = tests
    for node, k in reversed(spans):
        call = checks[k].call
        pad = "\n" * (node.end_lineno - node.lineno - len(io.StringIO(call, newline="").readlines()) + 1)
        start, end = offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)
        sent = sent[:start] + f"_report({k}, ({call}{pad}))" + sent[end:]  # later lines keep their numbers
    return sent, sorted(fn.name for fn in functions), checks


@dataclass
class TestReport:
    passed: int
    total: int
    failures: list[str] = field(default_factory=list)  # "test_name: reason"
    status: str = "ok"  # the sandbox's status of the run
    reason: str = ""  # why the run as a whole failed, if it did

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def _json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _test_names(tests: str) -> list[str]:
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError):
        return []
    return sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_"))


def _verdict(check: Check, rows: list[dict], k: int) -> str | None:
    """None if check k passed, else why not (None of it taken on the program's word)."""
    values = [r["value"] for r in rows if r.get("case") == k and "value" in r]
    if not values:
        return "not run"
    if len(values) > 1:
        return f"{check.call}: reported {len(values)} times (the result channel was tampered with)"
    text = values[0]
    if not isinstance(text, str) or len(text) > _VALUE_LIMIT:
        return f"{check.call}: an unreadable value came back"
    ok, value = _literal(text)
    if not ok:
        return f"{check.call} gave {text[:80]}, which is not a plain value (a literal)"
    try:
        if check.judge(value):
            return None
    except Exception as e:  # e.g. `<` between a list and an int
        return f"{check.call} gave {value!r:.80}, which cannot be compared: {type(e).__name__}: {e}"
    return "AssertionError: " + check.describe(value)[:300]


def run_tests(source: str, tests: str, limits: sandbox.Limits = sandbox.Limits(timeout_s=10)) -> TestReport:
    """Run the `test_*` functions of `tests` (which should `from solution import *`) against `source`; the
    checks are judged here, from the values the program returned (see `split_tests`). Where the platform cannot
    isolate the program, sandbox.SandboxUnavailable propagates: a refusal to run is not a score."""
    names = _test_names(tests)
    try:
        sent, names, checks = split_tests(tests)
    except ValueError as e:
        return TestReport(0, len(names), [f"{n}: {e}" for n in names], "error", str(e))
    runner = _TEST_RUNNER.format(result_fd=sandbox.RESULT_FD, names=names)
    result = sandbox.run(runner, limits, files={"solution.py": source, "tests.py": sent})
    rows = _json_lines(result.results)
    load = [r for r in rows if "load_error" in r]
    if load:
        reason = f"could not load: {load[0]['load_error']}"
        return TestReport(0, len(names), [f"{n}: {reason}" for n in names], result.status, reason)
    errors = {}
    for r in rows:
        if "test" in r and "error" in r:
            errors.setdefault(r["test"], f"{r['error']} ({r.get('where', '?')})")
    failures, passed, stopped = [], 0, False
    for name in names:
        verdicts = [(c, _verdict(c, rows, k)) for k, c in enumerate(checks) if c.test == name]
        if name not in errors and all(v is None for _, v in verdicts):
            passed += 1
            continue
        wrong = [(c, v) for c, v in verdicts if v not in (None, "not run")]
        if wrong:
            failures.append(f"{name}: {wrong[0][1]} (tests.py:{wrong[0][0].line})")
        elif name in errors:
            failures.append(f"{name}: {errors[name]}")
        else:  # the run stopped (timeout, memory, ...) before this test's checks
            stopped = True
            failures.append(f"{name}: not run ({result.reason or 'the program ended before it was reached'})")
    reason = (result.reason or "the program ended before every test was reached") if stopped else ""
    return TestReport(passed, len(names), failures, result.status, reason)


@dataclass
class ComplexityFit:
    label: str | None  # best of COMPLEXITY_CLASSES, None when it could not be measured
    sizes: list[int]
    seconds: list[float]
    residuals: dict[str, float]  # sum of squared log residuals per class (smaller = better fit)
    slope: float | None  # d log t / d log n, a model-free summary (1 linear, 2 quadratic)
    reason: str = ""


def fit_complexity(sizes, seconds) -> ComplexityFit:
    """Least squares in log space of t = c * f(n) for each class; the smallest residual wins."""
    sizes, seconds = [int(n) for n in sizes], [float(t) for t in seconds]
    if len(sizes) != len(seconds) or len(sizes) < 3:
        return ComplexityFit(None, sizes, seconds, {}, None, "need at least three (size, time) points")
    if min(sizes) < 2 or min(seconds) <= 0:
        return ComplexityFit(None, sizes, seconds, {}, None, "sizes must be >= 2 and times > 0")
    log_t = [math.log(t) for t in seconds]
    residuals = {}
    for label, f in COMPLEXITY_CLASSES.items():
        r = [lt - math.log(f(n)) for n, lt in zip(sizes, log_t)]
        c = sum(r) / len(r)
        residuals[label] = sum((x - c) ** 2 for x in r)
    log_n = [math.log(n) for n in sizes]
    mean_n, mean_t = sum(log_n) / len(log_n), sum(log_t) / len(log_t)
    slope = (sum((a - mean_n) * (b - mean_t) for a, b in zip(log_n, log_t))
             / sum((a - mean_n) ** 2 for a in log_n))
    return ComplexityFit(min(residuals, key=residuals.get), sizes, seconds, residuals, slope)


def measure_complexity(source: str, func: str, make_input: str, sizes=COMPLEXITY_SIZES, repeats: int = 3,
                       min_time: float = 0.02, limits: sandbox.Limits = sandbox.Limits(timeout_s=60, cpu_s=60)
                       ) -> ComplexityFit:
    """Time `func(make_input(n))` in the sandbox (best of `repeats`, each repeating calls for >= `min_time` s).

    make_input: source of a function `def make_input(n): ...` returning a fresh input of size n.
    """
    if not func.isidentifier() or "def make_input(" not in make_input:
        raise ValueError("func must be a name and make_input the source of `def make_input(n)`")
    program = _TIMER.format(func=func, make_input=make_input, sizes=list(sizes), repeats=int(repeats),
                            min_time=float(min_time), result_fd=sandbox.RESULT_FD)
    result = sandbox.run(program, limits, files={"solution.py": source})
    wanted = set(int(n) for n in sizes)
    rows, seen = [], set()
    for r in _json_lines(result.results):  # one row per size, in order; anything else is not the timer's
        if r.get("n") in wanted and r["n"] not in seen and isinstance(r.get("seconds"), (int, float)):
            seen.add(r["n"])
            rows.append(r)
    fit = fit_complexity([r["n"] for r in rows], [r["seconds"] for r in rows])
    if len(rows) < len(list(sizes)):
        fit.reason = f"timed {len(rows)} of {len(list(sizes))} sizes: {result.reason or result.status}"
    return fit


@dataclass
class CodeReport:
    compiles: bool
    compile_reason: str
    pep8: float  # share of non-blank lines without a violation (0 when it does not compile)
    pep8_violations: int
    comment_coverage: float | None
    tests: TestReport | None
    complexity: ComplexityFit | None

    @property
    def passed(self) -> bool:
        return self.tests is not None and self.tests.all_passed

    def to_dict(self) -> dict:
        return asdict(self)


def _adds_code(text: str, prompt_lines: int) -> bool:
    """Is there a statement that starts after the prompt's lines (not a blank line, not only a comment)?"""
    return any(getattr(node, "lineno", 0) > prompt_lines for node in ast.walk(ast.parse(text))
               if isinstance(node, ast.stmt))


def evaluate_code(source: str | bytes, tests: str | None = None, func: str | None = None,
                  make_input: str | None = None, sizes=COMPLEXITY_SIZES, prompt_lines: int = 0,
                  limits: sandbox.Limits = sandbox.Limits(timeout_s=10)) -> CodeReport:
    """All of the harness's metrics for one program. Tests and timing run only if it compiles; timing only if
    every test passed (the run time of a wrong answer is not the algorithm's).

    prompt_lines: the source starts with this many lines of a prompt (a completion task). Then a program counts
    as compiling only if the completion adds a statement (the prompt alone, a def with a docstring, compiles),
    and PEP 8 and comment coverage score only the completion's lines."""
    compiled = check_compiles(source)
    if compiled.ok and prompt_lines and not _adds_code(decode(source)[0], prompt_lines):
        compiled = CheckResult(False, "the completion adds no code")
    if not compiled.ok:
        return CodeReport(False, compiled.reason, 0.0, 0, None,
                          TestReport(0, len(_test_names(tests or "")), [], "error", compiled.reason)
                          if tests else None, None)
    text, _ = decode(source)
    style = pep8(text, skip_lines=prompt_lines)
    report = CodeReport(True, "", style.share, len(style.violations), comment_coverage(text, prompt_lines), None,
                        None)
    if tests:
        report.tests = run_tests(text, tests, limits)
    if func and make_input and report.passed:
        report.complexity = measure_complexity(text, func, make_input, sizes)
    return report
