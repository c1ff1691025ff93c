"""The library, its tests, scripts and the book's pytest plugin follow pycodestyle (PEP 8) with 120-character lines."""
from pathlib import Path

import pycodestyle

REPO = Path(__file__).resolve().parents[1]


def test_pep8():
    folders = ("minimoe", "tests", "tests_browser", "scripts", "book")
    files = [str(p) for d in folders for p in sorted((REPO / d).rglob("*.py")) if ".ipynb_checkpoints" not in p.parts]
    # E203 (space before ":" in slices such as a[i : i + n]) is how slices with expressions are written here;
    # W503 and W504 contradict each other (pycodestyle ignores both by default). Violations are printed.
    style = pycodestyle.StyleGuide(max_line_length=120, ignore=["E203", "W503", "W504"])
    report = style.check_files(files)
    assert report.total_errors == 0, f"{report.total_errors} pycodestyle violations (printed above)"
