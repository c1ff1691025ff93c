"""pytest plugin for the nbval run over the book: each notebook runs once, and the book shows that run.

`make test` runs every notebook under nbval (does it execute?) and then builds the book, which would execute
every notebook a second time to render its pages. Instead, once nbval has run all of a notebook's code cells
without an error, this plugin stores that execution (outputs and the state of the notebook's widgets, so
progress bars and controls render, recorded by nbclient's own code) in Jupyter Book's execution cache,
`_build/.jupyter_cache`, through jupyter-cache's API: the very record the book build would have written after
executing the notebook itself. The build then finds the notebook cached and renders that run, so the page
shows what the test ran. A notebook with a failed or skipped cell is not stored; the book build executes it
again and reports it.

The cache is keyed on the code cells' sources, as for the build's own executions, and `make` empties it when
the library changes (the Makefile's $(EXEC_STAMP)). MINIMOE_NBVAL_TO_BOOK=0 turns the plugin off;
MINIMOE_BOOK_CACHE points it at another cache (tests/test_nbval_to_book.py uses both).
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import nbformat
import pytest

_DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "_build" / ".jupyter_cache"
BOOK_CACHE = Path(os.environ.get("MINIMOE_BOOK_CACHE", _DEFAULT_CACHE))


def _enabled() -> bool:
    return os.environ.get("MINIMOE_NBVAL_TO_BOOK", "1") != "0"


class _Recorder:
    """Watches nbval run one notebook and builds the executed notebook that nbclient would have built.

    nbval reads every message the kernel publishes for a cell; the recorder sees each of them too and hands
    it to nbclient's own `NotebookClient.process_message`, the code the book build executes notebooks with.
    So outputs, `clear_output`, display updates, Output widgets (which capture the outputs sent while they
    are active) and the widget state come out exactly as nbclient makes them."""

    def __init__(self, notebook):
        from nbclient import NotebookClient

        self.path = Path(str(notebook.fspath)).resolve()
        self.nb = nbformat.read(self.path, as_version=4)
        self.code = [i for i, cell in enumerate(self.nb.cells) if cell.cell_type == "code"]
        self.client = NotebookClient(self.nb, record_timing=False)
        self.client.reset_execution_trackers()
        self.client.kc = notebook.kernel.kc  # Output widgets answer the kernel, as a frontend would
        self.current, self.msg_id, self.ok, self.start = None, None, True, time.perf_counter()
        kernel, read = notebook.kernel, notebook.get_kernel_message

        def execute_cell_input(source, allow_stdin=None):
            # nbval executes with store_history=False, which IPython reads as "not a notebook cell": the
            # execution count stays put and a trailing ';' stops silencing a cell's value (IPython looks
            # for it in the history). Executed the way nbclient executes, the cells behave as they do in
            # the book and in Jupyter.
            self.msg_id = kernel.kc.execute(source, store_history=True, allow_stdin=allow_stdin,
                                            stop_on_error=False)
            return self.msg_id

        def get_kernel_message(timeout=None, stream="iopub"):
            msg = read(timeout=timeout, stream=stream)
            if stream == "iopub" and self.current is not None and \
                    msg["parent_header"].get("msg_id") == self.msg_id:
                self._process(msg)
            return msg

        kernel.execute_cell_input, notebook.get_kernel_message = execute_cell_input, get_kernel_message

    def start_cell(self, cell_num: int) -> None:
        """What nbclient's execute_cell does before it reads a cell's messages."""
        self.current = cell_num
        self.nb.cells[self.code[cell_num]].outputs = []
        self.client.clear_before_next_output = False

    def _process(self, msg):
        from nbclient.exceptions import CellExecutionComplete

        index = self.code[self.current]
        try:
            self.client.process_message(msg, self.nb.cells[index], index)
        except CellExecutionComplete:
            pass
        except Exception as err:  # the recording is lost, never the test: the book build executes instead
            self.ok, self.current = False, None
            warnings.warn(f"{self.path}: not handed to the book build ({type(err).__name__}: {err})")


_recorders: dict[str, _Recorder] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    recorder = _recorders.get(item.parent.nodeid) if hasattr(item, "cell_num") else None
    if recorder is not None and recorder.ok:
        recorder.start_cell(item.cell_num)
    yield
    if recorder is not None:
        recorder.current = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    notebook = item.parent
    if not _enabled() or not hasattr(item, "cell_num") or not hasattr(notebook, "nb"):
        return  # not an nbval cell
    if call.when == "setup" and item.cell_num == 0 and notebook.kernel is not None:
        _recorders[notebook.nodeid] = _Recorder(notebook)  # the kernel has started: watch it
    recorder = _recorders.get(notebook.nodeid)
    if recorder is None:
        return
    if report.failed or report.skipped:
        recorder.ok = False
    if call.when == "call" and item.cell_num == len(recorder.code) - 1:
        del _recorders[notebook.nodeid]
        if recorder.ok:
            try:
                _store(notebook, recorder)
            except Exception as err:  # never fail a test over the cache: the book build would execute instead
                warnings.warn(f"{recorder.path}: not handed to the book build ({type(err).__name__}: {err})")


def _store(notebook, recorder: _Recorder) -> None:
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    seconds = time.perf_counter() - recorder.start
    nb = recorder.nb
    recorder.client.set_widgets_metadata()
    info = notebook.kernel.kc.kernel_info(reply=True, timeout=120)  # where nbclient takes language_info from
    nb.metadata["language_info"] = info["content"]["language_info"]
    nbformat.validate(nb)
    cache = get_cache(str(BOOK_CACHE))
    cache.cache_notebook_bundle(CacheBundleIn(nb, str(recorder.path), data={"execution_seconds": seconds}),
                                check_validity=False, overwrite=True)
