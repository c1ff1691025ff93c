"""The code-quality harness: each metric on programs whose answer we know, and bad input as scored failures."""
import math
import random

import pycodestyle
import pytest

from minimoe.evals import code, codegen

SORT = codegen.TASKS_BY_NAME["sort"]


def test_check_compiles_reports_reasons():
    assert code.check_compiles("x = 1\n").ok
    assert code.check_compiles(b"x = 1\n").ok
    for bad, reason in [(b"\xff\xfe", "UTF-8"), ("", "empty"), ("   \n", "empty"), ("def f(:\n", "SyntaxError"),
                        ("x = 1\0", "null"), (42, "str or bytes")]:
        result = code.check_compiles(bad)
        assert not result.ok and reason.lower() in result.reason.lower()


def test_pep8_matches_pycodestyle(tmp_path):
    source = "import os,sys\ndef f(a,b):\n    return a+b\nx=1\n"
    path = tmp_path / "s.py"
    path.write_text(source)
    reference = pycodestyle.Checker(str(path), quiet=True).check_all()  # the library's own count of violations
    ours = code.pep8(source)
    assert len(ours.violations) == reference == 6
    assert ours.lines == 4 and ours.share == 0.25  # "a+b" (E226) is in pycodestyle's default ignore list
    assert code.pep8("x = 1\n").share == 1.0
    assert code.pep8("x = 1\ny=2\n").share == 0.5
    assert code.pep8("x = 1\ny=2\n", skip_lines=1).share == 0.0 and code.pep8("").lines == 0


def test_comment_coverage_counts_functions():
    assert code.comment_coverage('def f():\n    """Doc."""\n') == 1.0
    assert code.comment_coverage("def f():\n    return 1  # one\n\n\ndef g():\n    return 2\n") == 0.5
    assert code.comment_coverage("# above\ndef f():\n    return 1\n") == 1.0
    assert code.comment_coverage("class A:\n    def m(self):\n        pass\n") == 0.0
    assert code.comment_coverage("x = 1  # no function\n") is None
    assert code.comment_coverage("def f(:\n") is None
    assert code.comment_coverage('def f():\n    """Given."""\n    return 1\n', skip_lines=2) == 0.0


def test_run_tests_scores_failures_with_reasons():
    ok = code.run_tests("def add(a, b):\n    return a + b\n", codegen.TASKS_BY_NAME["add"].tests)
    assert (ok.passed, ok.total, ok.all_passed) == (2, 2, True)
    wrong = code.run_tests("def add(a, b):\n    return 5\n", codegen.TASKS_BY_NAME["add"].tests)
    assert wrong.passed == 1 and "AssertionError" in wrong.failures[0]
    raising_test = "from solution import *\n\ndef test_a():\n    assert add(1, 1) == 2\n\ndef test_b():\n" \
                   "    assert add(1, 1) / 0 == 1\n"
    r = code.run_tests("def add(a, b):\n    return a + b\n", raising_test)
    assert r.passed == 1 and "ZeroDivisionError" in r.failures[0]
    no_load = code.run_tests("raise RuntimeError('boom')\n", SORT.tests)
    assert no_load.passed == 0 and no_load.total == 4 and "boom" in no_load.reason
    hang = code.run_tests("def sort_items(x):\n    while True:\n        pass\n", SORT.tests,
                          code.sandbox.Limits(timeout_s=2))
    assert hang.passed == 0 and hang.status == "timeout" and all("not run" in f for f in hang.failures[1:])
    assert code.run_tests("x = 1\n", "not python (").reason.startswith("the tests define no")


def _times(f, sizes, noise=0.0, seed=0):
    rng = random.Random(seed)
    return [1e-7 * f(n) * (1 + rng.uniform(-noise, noise)) for n in sizes]


@pytest.mark.parametrize("label", sorted(code.COMPLEXITY_CLASSES))
def test_fit_complexity_recovers_the_class_under_noise(label):
    sizes = code.COMPLEXITY_SIZES
    for seed in range(5):
        fit = code.fit_complexity(sizes, _times(code.COMPLEXITY_CLASSES[label], sizes, noise=0.1, seed=seed))
        assert fit.label == label
    exact = code.fit_complexity(sizes, _times(code.COMPLEXITY_CLASSES[label], sizes))
    assert exact.residuals[label] < 1e-20
    expected_slope = {"O(n)": 1.0, "O(n^2)": 2.0}.get(label)
    if expected_slope:
        assert math.isclose(exact.slope, expected_slope)
    assert code.fit_complexity([1, 2], [1.0, 2.0]).label is None


def test_reference_programs_move_each_metric():
    reports = codegen.evaluate_references()
    names = ("merge sort", "insertion sort", "wrong sort", "broken sort")
    merge, insertion, wrong, broken = (reports[k] for k in names)
    assert merge.compiles and merge.passed and merge.pep8 == 1.0 and merge.comment_coverage == 1.0
    assert insertion.compiles and insertion.passed and insertion.pep8 < 1.0 and insertion.comment_coverage == 0.0
    assert wrong.compiles and not wrong.passed and wrong.complexity is None  # no timing of a wrong answer
    assert not broken.compiles and "SyntaxError" in broken.compile_reason
    # timing: quadratic is unmistakable; n log n against n is a close call on real clocks, so only "not n^2"
    assert insertion.complexity.label == "O(n^2)" and insertion.complexity.slope > 1.6
    assert merge.complexity.label in ("O(n log n)", "O(n)") and merge.complexity.slope < 1.5


def test_completion_is_cut_where_the_function_ends():
    prompt = codegen.TASKS_BY_NAME["add"].prompt
    out = codegen.complete_function(prompt, b"    return a + b\n\nprint('top level')\n")
    assert out.endswith(b"return a + b\n") and b"print" not in out
    report = code.evaluate_code(codegen.complete_function(prompt, b"\n\nx = 1\n"), prompt_lines=2)
    assert not report.compiles and report.compile_reason == "the completion adds no code"
    report = code.evaluate_code(out, codegen.TASKS_BY_NAME["add"].tests, prompt_lines=2)
    assert report.compiles and report.passed and report.comment_coverage == 0.0  # the docstring is the prompt's


def test_summarize_follows_its_definitions():
    reports = codegen.evaluate_references()
    s = codegen.summarize(reports.values())
    assert s["n"] == 4 and s["compile_rate"] == 0.75 and s["pass_rate"] == 0.5
    assert s["comment_coverage"] == pytest.approx((1 + 0 + 1) / 3)
    with pytest.raises(ValueError):
        codegen.summarize([])


def test_model_samples_are_scored_without_crashing():
    import torch
    from minimoe import MiniLM, ModelConfig
    torch.manual_seed(0)
    model = MiniLM(ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=128)).eval()
    rows = codegen.evaluate_model(model, codegen.TASKS[:2], n=3, seed=0)
    assert len(rows) == 6 and all(isinstance(r["report"], code.CodeReport) for r in rows)
    again = codegen.evaluate_model(model, codegen.TASKS[:2], n=3, seed=0)
    assert [r["source"] for r in rows] == [r["source"] for r in again]  # seeded sampling
    with pytest.raises(ValueError, match="n must be"):
        codegen.sample_completions(model, "def f():\n", 0)


# ---- the parent decides: a wrong solution cannot forge its verdict -------------------------------------------

FORGERIES = {
    "prints passing lines and exits": '''import json, os
for i in range(4):
    print(json.dumps({"test": f"test_{i}", "ok": True}), flush=True)
    print(f"PASS test_{i}", flush=True)
os._exit(0)
''',
    "writes junk to the result channel and exits": '''import os
junk = b'{"case": 0, "value": "junk"}\\n{"case": 1, "value": "__import__(\\'os\\')"}\\n{"case": 2, "value": 7}\\n' \\
       b'{"test": "test_3", "ok": true}\\nPASS\\n\\xff\\x00'
for fd in range(3, 20):
    try:
        os.write(fd, junk)
    except OSError:
        pass
os._exit(0)
''',
    "writes the right answers to the result channel, then lets the tests run": '''import os
for k, value in enumerate([[1, 2, 3], [], [1, 5, 5], list(range(1, 21))]):
    os.write(3, f'{{"case": {k}, "value": "{value!r}"}}\\n'.encode())


def sort_items(items):
    return None
''',
    "returns an object equal to everything": '''class Anything:
    def __eq__(self, other):
        return True

    def __repr__(self):
        return "Anything()"


def sort_items(items):
    return Anything()
''',
    "monkeypatches builtins and the runner's tools": '''import builtins, json, sys, traceback
builtins.repr = lambda value: "True"
json.dumps = lambda row, **kw: '{"test": "test_0", "ok": true}'
traceback.extract_tb = lambda tb: []
builtins.AssertionError = type("NeverRaised", (Exception,), {})


def sort_items(items):
    return None
''',
    "reads the expected values from the test file": '''import re


def sort_items(items):
    for name in ("tests.py", "../tests.py"):
        try:
            text = open(name).read()
        except OSError:
            continue
        for args, expected in re.findall(r"sort_items\\((.*)\\) == (.*)", text):
            if args == repr(items):
                return eval(expected)
    return None
''',
    "exits before the tests run": "raise SystemExit(0)\n",
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_wrong_solution_cannot_forge_passing(name):
    report = code.run_tests(FORGERIES[name], SORT.tests)
    assert report.passed == 0 and report.total == 4 and not report.all_passed, report
    assert len(report.failures) == 4


def test_expected_values_stay_in_the_parent():
    """What enters the sandbox holds the calls, never the expected values or the assert messages."""
    tests = ("from solution import *\n\n\ndef test_a():\n    data = [3, 1, 2]\n"
             "    assert sort_items(data) == [1, 2, 3], 'X'\n")
    sent, names, checks = code.split_tests(tests)
    assert names == ["test_a"] and "[1, 2, 3]" not in sent and "'X'" not in sent and "[3, 1, 2]" in sent
    assert [(c.test, c.call, c.op, c.expected) for c in checks] == [("test_a", "sort_items(data)", "==", [1, 2, 3])]
    assert len(sent.splitlines()) == len(tests.splitlines())  # line numbers in tracebacks still match


@pytest.mark.parametrize("tests, reason", [
    ("def test_a():\n    x = 1\n", "no top-level assert"),
    ("def test_a():\n    for i in range(3):\n        assert f(i) == i\n", "inside"),
    ("def test_a():\n    assert f(1) == g(1)\n", "literal"),
    ("def test_a():\n    assert f([1]) == [1] and True\n", "outside the sandbox"),
    ("def test_a():\n    assert not 0 < f(1) < 2\n", "no chains"),
])
def test_checks_the_parent_cannot_judge_are_refused(tests, reason):
    report = code.run_tests("def f(x):\n    return x\n", tests)
    assert report.total == 1 and report.passed == 0 and report.status == "error" and reason in report.reason


def test_comparisons_are_made_here_with_python_semantics():
    tests = ("from solution import *\n\n\ndef test_is():\n    assert is_even(4) is True\n\n\n"
             "def test_not():\n    assert not is_even(7)\n\n\n"
             "def test_lt():\n    assert abs(half(1) - 0.5) < 1e-9\n\n\n"
             "def test_in():\n    assert 2 in evens(7)\n\n\ndef test_left():\n    assert 0.5 == half(1)\n")
    right = "def is_even(n):\n    return n % 2 == 0\n\n\ndef half(x):\n    return x / 2\n\n\ndef evens(n):\n" \
            "    return [i for i in range(n) if i % 2 == 0]\n"
    report = code.run_tests(right, tests)
    assert (report.passed, report.total) == (5, 5), report
    wrong = "def is_even(n):\n    return 1\n\n\ndef half(x):\n    return x\n\n\ndef evens(n):\n    return [3]\n"
    report = code.run_tests(wrong, tests)
    assert report.passed == 0 and any("gave 1, expected is True" in f for f in report.failures), report
