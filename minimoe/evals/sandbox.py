"""Run untrusted Python (a model's generated code) in a separate, resource-limited process.

Layers, each of which would contain the attacks in ``tests/test_sandbox.py`` on its own for some of them:

1. **A separate process** in its own session, killed with its whole process group on timeout or when done; its
   stdout and stderr go to files in the sandbox folder (so a print loop fills the file-size limit, not our memory).
2. **Resource limits** (``setrlimit``): CPU seconds, address space, file size, open files, no core dumps, and no new
   processes (``RLIMIT_NPROC`` = 0).
3. **An empty environment and a fresh temporary folder** as the working directory; ``python -I -S``: no
   ``PYTHON*`` variables, no user or site packages (the standard library only).
4. **Another user**: when we run as root, the child runs as ``nobody``, which cannot write our files, read
   ``/proc/<our pid>/environ`` or signal us; root also ignores ``RLIMIT_NPROC``, ``nobody`` does not.
5. **No network**: a new, empty network namespace (``unshare``; needs root or unprivileged user namespaces).
6. **An audit hook** (PEP 578) installed before the code runs, which refuses sockets, ``fork``/``exec``/
   ``subprocess``/``os.system``, signals, ``ctypes``, writes outside the sandbox folder and reads of ``/proc``.
   Each refusal is reported on stderr as ``SANDBOX-BLOCKED: <event>`` and collected in ``Result.blocked``.

Which of layers 4 and 5 this platform allows is in ``capabilities()``. This is a teaching sandbox for code from
small models and for the accidents such code makes (infinite loops, huge lists, stray files). It is not a security
boundary against a determined attacker: an audit hook can be bypassed from Python with enough effort, and the
kernel's attack surface is all there. For that, use a container or a VM (gVisor, Firecracker, nsjail).
"""
from __future__ import annotations

import functools
import json
import math
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

BLOCK_MARK = "SANDBOX-BLOCKED: "
OUTPUT_LIMIT = 64_000  # characters of stdout / stderr kept in a Result


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, then the process group is killed
    cpu_s: float = 10  # RLIMIT_CPU: SIGXCPU after this many CPU seconds
    memory_mb: int = 512  # RLIMIT_AS: allocations beyond it raise MemoryError
    file_mb: int = 8  # RLIMIT_FSIZE: the largest file the code may write (stdout included)
    open_files: int = 64  # RLIMIT_NOFILE
    network: bool = False  # True leaves the network namespace and sockets alone
    audit_hook: bool = True  # False only to test the operating-system layers on their own

    def __post_init__(self):
        for name in ("timeout_s", "cpu_s", "memory_mb", "file_mb", "open_files"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive number, got {value!r}")


@dataclass
class Result:
    status: str  # "ok", "error", "timeout", "cpu", "memory", "file size", "blocked", "killed"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    blocked: list[str] = field(default_factory=list)  # audit events the hook refused, in order
    reason: str = ""  # one line saying why, when status != "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# The child's first code: set the limits, leave the network, install the audit hook, then run the user's file.
# It runs as `python -I -S -c BOOTSTRAP <config json>` and takes its settings from argv, not the environment.
BOOTSTRAP = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, (soft, hard) in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
if cfg["unshare_net"]:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    flags = 0x40000000 | (0 if os.geteuid() == 0 else 0x10000000)  # CLONE_NEWNET (| CLONE_NEWUSER)
    if libc.unshare(flags) != 0:
        os.write(2, b"sandbox: could not enter a new network namespace\n")
    del ctypes, libc
sys.modules.pop("ctypes", None)
sys.modules.pop("_ctypes", None)
root = os.path.realpath(cfg["root"])
allow_net = cfg["network"]
mark = cfg["mark"].encode()
DENY = {"os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
        "ctypes.cdata", "os.setuid", "os.chroot", "pty.spawn", "sys.remote_exec"}
NET = ("socket.", "ftplib.", "http.", "urllib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.")
WRITES = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown",
          "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    path = os.fsdecode(path)
    return os.path.realpath(path) == root or os.path.realpath(path).startswith(root + os.sep)

def refuse(event):
    os.write(2, mark + event.encode() + b"\n")
    raise PermissionError(f"sandbox: {event} is not allowed")

def hook(event, args):
    if event in DENY or (not allow_net and event.startswith(NET)):
        refuse(event)
    if event == "import" and args[0] in ("ctypes", "_ctypes"):
        refuse("import " + args[0])
    if event == "open" and args[0] is not None:
        path, mode, flags = args
        writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
        if writing and not inside(path):
            refuse(f"open for writing outside the sandbox: {os.fsdecode(path)}")
        if not isinstance(path, int) and os.path.realpath(os.fsdecode(path)).startswith(("/proc/", "/sys/")):
            refuse(f"open {os.fsdecode(path)}")
    if event in WRITES and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        refuse(f"{event} outside the sandbox")

with open(cfg["main"], encoding="utf-8") as f:
    source = f.read()
code = compile(source, "<sandboxed>", "exec")
sys.argv = ["<sandboxed>"]
sys.path.insert(0, root)  # files written beside the program can be imported
if cfg["hook"]:
    sys.addaudithook(hook)
del json, resource, f
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


def _nobody() -> tuple[int, int] | None:
    """(uid, gid) of `nobody` when we are root (and so should not run untrusted code as ourselves), else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _runs_as(exe: str, user: tuple[int, int]) -> bool:
    try:
        probe = subprocess.run([exe, "-I", "-S", "-c", "import json, resource"], user=user[0], group=user[1],
                               extra_groups=[], cwd="/", env={}, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


@functools.lru_cache(maxsize=1)
def _identity() -> tuple[str, tuple[int, int] | None]:
    """(interpreter, user) for sandboxed runs. As root: `nobody` and the first interpreter it can run (ours may
    live under /root, which it cannot enter; the sandbox needs only the standard library). Otherwise ourselves."""
    user = _nobody()
    if user is not None:
        for exe in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
            if exe and _runs_as(exe, user):
                return exe, user
    return sys.executable, None


@functools.lru_cache(maxsize=1)
def capabilities() -> dict:
    """Which isolation layers work here: rlimits, other_user, network_namespace, audit_hook (bools) and the
    interpreter the sandbox runs."""
    probe = run("import socket\nprint('reached')", Limits(timeout_s=20), _probe=True)
    exe, user = _identity()
    return {"rlimits": True, "other_user": user is not None, "interpreter": exe,
            "network_namespace": "could not enter a new network namespace" not in probe.stderr,
            "audit_hook": sys.version_info >= (3, 8)}


def _rlimits(limits: Limits) -> dict:
    mb = 1024 * 1024
    cpu = math.ceil(limits.cpu_s)  # SIGXCPU at the soft limit, SIGKILL one second later at the hard one
    soft_is_hard = {"RLIMIT_AS": int(limits.memory_mb * mb), "RLIMIT_FSIZE": int(limits.file_mb * mb),
                    "RLIMIT_NOFILE": int(limits.open_files), "RLIMIT_CORE": 0, "RLIMIT_NPROC": 0}
    return {"RLIMIT_CPU": (cpu, cpu + 1), **{k: (v, v) for k, v in soft_is_hard.items()}}


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(OUTPUT_LIMIT * 4)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")[:OUTPUT_LIMIT]


def _classify(returncode: int | None, timed_out: bool, stderr: str, blocked: list[str]) -> tuple[str, str]:
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if timed_out:
        return "timeout", "ran past the wall-clock limit and was killed"
    if returncode == -signal.SIGXCPU:
        return "cpu", "ran past the CPU-time limit (SIGXCPU)"
    if returncode == -signal.SIGXFSZ:
        return "file size", "wrote more than the file-size limit (SIGXFSZ)"
    if returncode is not None and returncode < 0:
        return "killed", f"killed by signal {signal.Signals(-returncode).name}"
    if "File too large" in last:  # Python ignores SIGXFSZ, so the write fails with EFBIG instead
        return "file size", "wrote more than the file-size limit (File too large)"
    if "MemoryError" in last:
        return "memory", "allocated more than the memory limit (MemoryError)"
    if blocked:
        return "blocked", f"the sandbox refused: {blocked[0]}"
    if returncode == 0:
        return "ok", ""
    return "error", last or f"exit status {returncode}"


def run(source: str | bytes, limits: Limits = Limits(), stdin: str = "", files: dict[str, str] | None = None,
        _probe: bool = False) -> Result:
    """Run `source` as a Python program in a sandbox; never raises for anything the program does.

    files: extra {name: text} written into the sandbox folder first (e.g. a test file the program imports).
    """
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as e:
            return Result("error", None, "", "", 0.0, reason=f"source is not valid UTF-8: {e}")
    if not isinstance(limits, Limits):
        raise ValueError(f"limits must be a sandbox.Limits, got {type(limits).__name__}")
    exe, user = _identity()
    root = tempfile.mkdtemp(prefix="minimoe-sandbox-")
    try:
        main = os.path.join(root, "main.py")
        for name, text in {"main.py": source, **(files or {})}.items():
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
            with open(os.path.join(root, name), "w", encoding="utf-8") as f:
                f.write(text)
        out, err = os.path.join(root, ".stdout"), os.path.join(root, ".stderr")
        if user is not None:
            for path in [root] + [os.path.join(root, n) for n in os.listdir(root)]:
                os.chown(path, *user)
        os.chmod(root, 0o700)
        cfg = {"rlimits": _rlimits(limits), "root": root, "main": main, "mark": BLOCK_MARK,
               "network": limits.network, "hook": limits.audit_hook, "unshare_net": not limits.network or _probe}
        cmd = [exe, "-I", "-S", "-X", "utf8", "-c", BOOTSTRAP, json.dumps(cfg)]
        start = time.perf_counter()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            if user is not None:
                os.chown(out, *user)
                os.chown(err, *user)
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=fo, stderr=fe, cwd=root, env={},
                                    start_new_session=True, close_fds=True,
                                    user=user[0] if user else None, group=user[1] if user else None,
                                    extra_groups=[] if user else None)
            timed_out = False
            try:
                proc.communicate(stdin.encode("utf-8"), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it left behind
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.perf_counter() - start
        stdout, stderr = _read(out), _read(err)
        blocked = [line[len(BLOCK_MARK):] for line in stderr.splitlines() if line.startswith(BLOCK_MARK)]
        status, reason = _classify(proc.returncode, timed_out, stderr, blocked)
        return Result(status, proc.returncode, stdout, stderr, seconds, blocked, reason)
    finally:
        shutil.rmtree(root, ignore_errors=True)
