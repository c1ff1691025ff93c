"""book/conftest.py hands nbval's execution of a notebook to the book build. The record it writes must be the
one the build would have written by executing the notebook itself (jupyter-cache + nbclient, as myst-nb does):
same outputs, and state for every widget the outputs show."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("nbval")
jupyter_cache = pytest.importorskip("jupyter_cache")

CELLS = [
    "print('hello from the kernel')",
    "from IPython.display import Markdown, display\ndisplay(Markdown('**a table** | b'))",
    "import ipywidgets as w\nslider = w.IntSlider(value=3, description='k')\nslider",
    "6 * 7",
    "6 * 7;",
    "from ipywidgets import interact\n_ = interact(lambda k: print('twice', 2 * k), k=(0, 9))",
]


def _notebook(folder: Path, cells=CELLS) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells = [nbformat.v4.new_markdown_cell("# A page")] + [nbformat.v4.new_code_cell(c) for c in cells]
    path = folder / "page.ipynb"
    nbformat.write(nb, path)
    return path


def _nbval(folder: Path, cache: Path, **env) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "book" / "conftest.py", folder / "conftest.py")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           "--nbval-current-env", "page.ipynb"], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "MINIMOE_BOOK_CACHE": str(cache), **env}, timeout=300)


def _comparable(outputs):
    rows = []
    for out in outputs:
        if out.output_type == "stream":
            rows.append((out.name, out.text))
        else:
            data = dict(out.data)
            view = data.pop("application/vnd.jupyter.widget-view+json", None)
            rows.append((out.output_type, data.get("text/markdown") or data.get("text/plain"), view is not None))
    return rows


def test_nbval_run_lands_in_the_cache_as_the_build_would_store_it(tmp_path):
    from jupyter_cache import get_cache
    from jupyter_cache.executors.utils import single_nb_execution

    path = _notebook(tmp_path)
    result = _nbval(tmp_path, tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    cache = get_cache(str(tmp_path / "cache"))
    source = nbformat.read(path, as_version=4)
    record = cache.match_cache_notebook(source)       # what myst-nb looks up before executing
    _, ours = cache.merge_match_into_notebook(source)

    theirs = nbformat.read(path, as_version=4)        # what the build would have stored: nbclient's execution
    assert single_nb_execution(theirs, cwd=str(tmp_path), timeout=120, allow_errors=False).err is None
    for a, b in zip(ours.cells, theirs.cells):
        if a.cell_type == "code":
            assert _comparable(a.outputs) == _comparable(b.outputs)
    assert record.data["execution_seconds"] > 0
    state = ours.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    view = ours.cells[3].outputs[0].data["application/vnd.jupyter.widget-view+json"]
    assert state[view["model_id"]]["state"]["value"] == 3
    # interact() prints into an Output widget: the text belongs to the widget's state, not to the cell
    their_state = theirs.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]

    def captured(widgets):
        return [w["state"]["outputs"] for w in widgets.values() if w["model_name"] == "OutputModel"]
    assert captured(state) == captured(their_state) and "twice" in str(captured(state))
    assert all("twice" not in str(o) for o in ours.cells[6].outputs)
    assert ours.metadata["language_info"]["name"] == "python"
    assert ours.cells[5].outputs == [] and [c.execution_count for c in ours.cells[1:]] == list(range(1, 7))


def test_a_failing_notebook_is_not_cached_and_the_switch_turns_it_off(tmp_path):
    from jupyter_cache import get_cache

    bad = tmp_path / "bad"
    bad.mkdir()
    _notebook(bad, ["x = 1", "raise ValueError('broken')"])
    assert _nbval(bad, tmp_path / "c1").returncode != 0
    assert get_cache(str(tmp_path / "c1")).list_cache_records() == []
    good = tmp_path / "good"
    good.mkdir()
    _notebook(good, ["x = 1"])
    assert _nbval(good, tmp_path / "c2", MINIMOE_NBVAL_TO_BOOK="0").returncode == 0
    assert get_cache(str(tmp_path / "c2")).list_cache_records() == []
