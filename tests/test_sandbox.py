"""The sandbox contains each attack, reports it, and leaves the host and this test process alive."""
import os
import sys

import pytest

from minimoe.evals import sandbox

FAST = sandbox.Limits(timeout_s=3, cpu_s=3, memory_mb=256)
CAPS = sandbox.capabilities()


def test_plain_program_runs_and_gets_stdin():
    r = sandbox.run("import sys\nprint(sum(map(int, sys.stdin.read().split())))", FAST, stdin="1 2 3")
    assert (r.status, r.stdout, r.blocked) == ("ok", "6\n", [])


@pytest.mark.parametrize("source, status", [
    ("while True:\n    pass", "timeout"),
    ("import time\ntime.sleep(60)", "timeout"),
])
def test_infinite_loop_is_killed(source, status):
    limits = sandbox.Limits(timeout_s=2, cpu_s=30)  # the wall clock, not the CPU limit, stops these
    r = sandbox.run(source, limits)
    assert r.status == status and r.seconds < limits.timeout_s + 2


def test_memory_bomb_is_stopped():
    r = sandbox.run("x = bytearray(8 * 1024 ** 3)\nprint('allocated')", FAST)
    assert r.status == "memory" and "allocated" not in r.stdout


def test_fork_bomb_is_stopped():
    r = sandbox.run("import os\nwhile True:\n    os.fork()", FAST)
    assert r.status == "blocked" and r.blocked[0] == "os.fork"


def test_subprocess_and_shell_are_stopped():
    r = sandbox.run("import subprocess\nsubprocess.run(['true'])", FAST)
    assert r.status == "blocked" and r.blocked == ["subprocess.Popen"]
    r = sandbox.run("import os\nos.system('true')", FAST)
    assert r.status == "blocked" and r.blocked == ["os.system"]


def test_writing_outside_the_sandbox_is_stopped(tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # even a folder anyone may write to
    r = sandbox.run(f"open({str(target)!r}, 'w').write('x')", FAST)
    assert r.status == "blocked" and not target.exists()
    r = sandbox.run(f"import os\nos.rename('main.py', {str(target)!r})", FAST)
    assert r.status == "blocked" and not target.exists()


def test_writing_inside_the_sandbox_works():
    r = sandbox.run("open('out.txt', 'w').write('hello')\nprint(open('out.txt').read())", FAST)
    assert (r.status, r.stdout) == ("ok", "hello\n")


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("MINIMOE_TEST_SECRET", "hunter2")
    r = sandbox.run("import os\nprint(dict(os.environ))", FAST)
    assert r.ok and "hunter2" not in r.stdout and "MINIMOE_TEST_SECRET" not in r.stdout
    r = sandbox.run(f"print(open('/proc/{os.getpid()}/environ').read())", FAST)
    assert r.status == "blocked" and "hunter2" not in r.stdout


def test_network_is_stopped():
    r = sandbox.run("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\nprint('connected')", FAST)
    assert r.status == "blocked" and r.blocked[0].startswith("socket.") and "connected" not in r.stdout


def test_signals_and_ctypes_are_stopped():
    r = sandbox.run(f"import os\nos.kill({os.getpid()}, 9)", FAST)
    assert r.status == "blocked" and r.blocked == ["os.kill"]
    r = sandbox.run("import ctypes", FAST)
    assert r.status == "blocked" and r.blocked == ["import ctypes"]


def test_output_and_files_are_bounded():
    r = sandbox.run("while True:\n    print('x' * 1000)", sandbox.Limits(timeout_s=5, file_mb=1))
    assert r.status == "file size" and len(r.stdout) <= sandbox.OUTPUT_LIMIT


def test_the_host_survives_all_of_it():
    """After every attack above, this process is alive, and so is its parent."""
    assert os.getppid() > 1 and sys.stdout is not None
    assert sandbox.run("print('still here')", FAST).stdout == "still here\n"


def test_bad_input_is_a_result_not_a_crash():
    r = sandbox.run(b"\xff\xfe print(1)", FAST)
    assert r.status == "error" and "UTF-8" in r.reason
    r = sandbox.run("def f(:\n", FAST)
    assert r.status == "error" and "SyntaxError" in r.reason
    with pytest.raises(ValueError, match="timeout_s"):
        sandbox.Limits(timeout_s=0)
    with pytest.raises(ValueError, match="plain names"):
        sandbox.run("pass", FAST, files={"../x.py": ""})


# ---- the operating-system layers on their own (audit hook off) --------------------------------------------------
OS_ONLY = sandbox.Limits(timeout_s=3, cpu_s=2, memory_mb=256, audit_hook=False)


def test_rlimits_alone_stop_memory_and_cpu():
    assert sandbox.run("x = bytearray(8 * 1024 ** 3)", OS_ONLY).status == "memory"
    r = sandbox.run("while True:\n    pass", sandbox.Limits(timeout_s=10, cpu_s=1, audit_hook=False))
    assert r.status == "cpu"


@pytest.mark.skipif(os.geteuid() == 0 and not CAPS["other_user"], reason="root ignores RLIMIT_NPROC")
def test_process_limit_alone_stops_fork():
    r = sandbox.run("import os\ntry:\n    os.fork()\nexcept OSError as e:\n    print(type(e).__name__)", OS_ONLY)
    assert r.ok and r.stdout.strip() == "BlockingIOError"


@pytest.mark.skipif(not CAPS["network_namespace"], reason="no network namespaces on this platform")
def test_network_namespace_alone_has_no_route():
    r = sandbox.run("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
                    "    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)", OS_ONLY)
    assert r.ok and r.stdout.startswith("refused")


@pytest.mark.skipif(not CAPS["other_user"], reason="not root: the sandbox cannot switch users")
def test_other_user_alone_cannot_read_our_environment(monkeypatch):
    """Without namespaces (opted in) our /proc is visible, but `nobody` may not read our environment."""
    monkeypatch.setattr(sandbox, "_isolation", lambda: (None, "namespaces switched off by the test"))
    with pytest.warns(RuntimeWarning):
        r = sandbox.run(f"open('/proc/{os.getpid()}/environ').read()",
                        sandbox.Limits(timeout_s=3, audit_hook=False, allow_unisolated=True))
    assert r.status == "error" and "PermissionError" in r.reason


@pytest.mark.skipif(not CAPS["pid_namespace"], reason="no pid namespace on this platform")
def test_pid_namespace_alone_hides_our_processes():
    r = sandbox.run(f"import os\nprint(os.path.exists('/proc/{os.getpid()}'), os.getpid() < 10)", OS_ONLY)
    assert (r.status, r.stdout) == ("ok", "False True\n")
