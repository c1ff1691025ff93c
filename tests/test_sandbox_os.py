"""The sandbox holds below Python: attacks that never pass through Python's `open` (libc through ctypes, `os.open`
with a directory descriptor) cannot write outside the sandbox folder, whatever the audit hook sees or reports.

Each attack aims at a world-writable folder outside the sandbox (so file permissions alone would let it through)
and the test checks that folder afterwards, not the sandbox's report. The attacks run with the audit hook on and
off, under the default isolation and under the `unshare` fallback where it works here.
"""
import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from minimoe.evals import code, sandbox

REPO = Path(__file__).resolve().parents[1]
FAST = sandbox.Limits(timeout_s=10, cpu_s=5, memory_mb=256)


@pytest.fixture(params=["default", "unshare"])
def backend(request, monkeypatch):
    """'default': whatever the sandbox picked here; 'unshare': the fallback used where bubblewrap is missing."""
    if request.param == "unshare":
        if not sandbox._measure("unshare")["contained"]:
            pytest.skip("unshare cannot isolate on this platform")
        monkeypatch.setattr(sandbox, "_isolation", lambda: ("unshare", ""))
    return request.param


@pytest.fixture
def outside():
    """A folder outside the sandbox that anyone may write to, holding a file anyone may write and one anyone may
    read. /tmp is world-writable too, so user `nobody` can reach it: only the sandbox stands in the way."""
    path = Path(tempfile.mkdtemp(prefix="minimoe-outside-"))
    (path / "victim.txt").write_text("original\n")
    (path / "secret.txt").write_text("s3cret\n")
    os.chmod(path / "victim.txt", 0o666)
    os.chmod(path / "secret.txt", 0o644)
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _unchanged(folder: Path) -> bool:
    return (sorted(p.name for p in folder.iterdir()) == ["secret.txt", "victim.txt"]
            and (folder / "victim.txt").read_text() == "original\n")


LIBC_ATTACK = '''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for path, flags in [({new!r}, os.O_WRONLY | os.O_CREAT), ({victim!r}, os.O_WRONLY | os.O_APPEND)]:
    fd = libc.open(path.encode(), flags, 0o666)
    if fd < 0:
        print("refused", os.strerror(ctypes.get_errno()))
    else:
        libc.write(fd, b"pwned\\n", 6)
        libc.close(fd)
        print("wrote", path)
'''

DIR_FD_ATTACK = '''
import os
d = os.open({folder!r}, os.O_RDONLY | os.O_DIRECTORY)
for name, flags in [("escaped.txt", os.O_WRONLY | os.O_CREAT), ("victim.txt", os.O_WRONLY | os.O_APPEND)]:
    fd = os.open(name, flags, 0o666, dir_fd=d)
    os.write(fd, b"pwned\\n")
    os.close(fd)
    print("wrote", name)
'''


@pytest.mark.parametrize("hook", [True, False], ids=["hook", "no-hook"])
def test_libc_through_ctypes_cannot_write_outside(backend, outside, hook):
    source = LIBC_ATTACK.format(new=str(outside / "escaped.txt"), victim=str(outside / "victim.txt"))
    r = sandbox.run(source, sandbox.Limits(timeout_s=10, cpu_s=5, memory_mb=256, audit_hook=hook))
    assert _unchanged(outside), r
    assert "wrote" not in r.stdout


@pytest.mark.parametrize("hook", [True, False], ids=["hook", "no-hook"])
def test_a_directory_descriptor_cannot_write_outside(backend, outside, hook):
    """The audit hook sees `os.open('escaped.txt', dir_fd=...)` as a relative, harmless-looking path."""
    r = sandbox.run(DIR_FD_ATTACK.format(folder=str(outside)),
                    sandbox.Limits(timeout_s=10, cpu_s=5, memory_mb=256, audit_hook=hook))
    assert _unchanged(outside), r
    assert "wrote" not in r.stdout and not r.ok


def test_tmp_and_the_repository_are_not_writable(backend):
    """/tmp is writable by everyone on the host; the repository by its owner. Inside, both are out of reach."""
    tag = uuid.uuid4().hex
    targets = ["/tmp/minimoe-escaped-" + tag, str(REPO / f"escaped-{tag}.txt"), str(REPO / "tests" / f"x-{tag}.py")]
    source = "import os\nfor path in {targets!r}:\n    try:\n        open(path, 'w').write('pwned')\n" \
             "        print('wrote', path)\n    except OSError as e:\n        print('refused', e.errno)\n"
    r = sandbox.run(source.format(targets=targets), sandbox.Limits(timeout_s=10, audit_hook=False))
    try:
        assert not any(os.path.exists(t) for t in targets), r
        assert "wrote" not in r.stdout and r.stdout.count("refused") == 3
    finally:
        for t in targets:
            if os.path.exists(t):
                os.remove(t)


def test_host_files_are_absent_and_the_system_read_only(backend, outside):
    """Files user `nobody` could read on the host are absent inside: the repository, another folder under /tmp,
    /etc/passwd, /var. What Python needs (/usr) is there, read-only: writing fails with EROFS, not a permission
    error."""
    probes = [str(REPO / "README.md"), str(outside / "secret.txt"), "/etc/passwd", "/var"]
    source = ("import os\nfor path in {probes!r}:\n    print(path, os.path.exists(path))\n"
              "import json\nprint(open(json.__file__).read(10) != '')\n"
              "try:\n    open('/usr/minimoe-escaped', 'w')\nexcept OSError as e:\n    print('usr', e.errno)\n")
    r = sandbox.run(source.format(probes=probes), sandbox.Limits(timeout_s=10, audit_hook=False))
    assert r.ok, r
    lines = r.stdout.splitlines()
    assert lines[:len(probes)] == [f"{p} False" for p in probes]
    assert lines[len(probes):] == ["True", f"usr {errno.EROFS}"]
    assert "s3cret" not in r.stdout


def test_capabilities_are_measured():
    caps = sandbox.capabilities()
    assert caps["isolation"] in ("bubblewrap", "unshare") and caps["mount_namespace"] is True
    assert caps["network_namespace"] is True and caps["audit_hook"] == "reports only"


def test_without_namespaces_it_refuses_unless_told(monkeypatch, outside):
    monkeypatch.setattr(sandbox, "_isolation", lambda: (None, "no namespaces (probe patched by the test)"))
    with pytest.raises(sandbox.SandboxUnavailable) as refused:
        sandbox.run("print('ran')", FAST)
    message = str(refused.value)
    assert "no namespaces (probe patched by the test)" in message and "allow_unisolated=True" in message
    assert "bubblewrap" in message
    with pytest.raises(sandbox.SandboxUnavailable):  # the harness passes the refusal on, it does not score it
        code.run_tests("def add(a, b):\n    return a + b\n", "from solution import *\n\n\ndef test_a():\n"
                       "    assert add(1, 2) == 3\n")
    caps = sandbox.capabilities()
    assert caps["isolation"] is None and caps["mount_namespace"] is False and "no namespaces" in caps["missing"]
    with pytest.warns(RuntimeWarning, match="WITHOUT operating-system isolation"):
        r = sandbox.run("print('ran')", sandbox.Limits(timeout_s=10, allow_unisolated=True))
    assert r.ok and r.stdout == "ran\n" and r.isolation == "none"


# ---- reports and results travel on channels the program's output cannot bury --------------------------------


def test_a_stderr_flood_does_not_hide_a_block(outside):
    source = (f"import sys\nsys.stderr.write('x' * 300_000)\nsys.stderr.flush()\n"
              f"open({str(outside / 'after-flood.txt')!r}, 'w')\n")
    r = sandbox.run(source, FAST)
    assert r.status == "blocked" and r.blocked == [f"open for writing outside the sandbox: {outside}/after-flood.txt"]
    assert len(r.stderr) <= sandbox.OUTPUT_LIMIT and _unchanged(outside)


def test_a_program_cannot_report_a_block_by_printing_one():
    r = sandbox.run("import sys\nprint('SANDBOX-BLOCKED: os.system', file=sys.stderr)\nprint('SANDBOX-BLOCKED: x')",
                    FAST)
    assert r.ok and r.blocked == []


def test_results_travel_on_their_own_descriptor():
    r = sandbox.run(f"import os\nprint('on stdout')\nos.write({sandbox.RESULT_FD}, b'on the result channel')", FAST)
    assert r.ok and r.stdout == "on stdout\n" and r.results == "on the result channel"


def test_output_is_read_from_our_descriptor_not_from_a_path(outside):
    """Replacing .stdout with a link to a host file must not make the parent read that file."""
    source = f"import os\nos.remove('.stdout')\nos.symlink({str(outside / 'secret.txt')!r}, '.stdout')\n"
    r = sandbox.run(source, sandbox.Limits(timeout_s=10, audit_hook=False))
    assert "s3cret" not in r.stdout
