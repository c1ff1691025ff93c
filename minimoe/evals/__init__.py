"""Evaluation: the five-axis capability suite (chapter 3), the code-quality harness and its sandbox, and the
application scenarios (chapter 4).

* ``suite``     - multiple choice by likelihood on held-out items, five axes scored 0-10 with Wilson intervals;
* ``sandbox``   - run untrusted Python in a separate, resource-limited process;
* ``code``      - compile, PEP 8, comment coverage, unit tests and empirical time complexity of Python source;
* ``scenarios`` - long-text retrieval, dialogue latency and the scenario matrix.
"""
from .suite import *  # noqa: F401,F403  (the chapter 3 API stays importable as minimoe.evals.<name>)
from .suite import __all__ as _suite_all

__all__ = list(_suite_all)
from .code import (CodeReport, check_compiles, comment_coverage, evaluate_code, fit_complexity,  # noqa: E402
                   measure_complexity, pep8, run_tests)

__all__ += ["CodeReport", "check_compiles", "comment_coverage", "evaluate_code", "fit_complexity",
            "measure_complexity", "pep8", "run_tests"]
