"""Run untrusted Python (a model's generated code) in a separate, resource-limited, isolated process.

The containment is the operating system's; nothing in it depends on Python behaving:

1. **A mount namespace** (``bwrap``, bubblewrap; where it is missing, ``unshare`` with bind mounts and
   ``pivot_root``) in which the only writable place is a fresh temporary folder, the program's working directory.
   The system's programs and libraries (``/usr`` and the interpreter's own prefix) are there read-only; everything
   else on the host is absent: the repository, ``/home``, ``/root``, the rest of ``/tmp``, nearly all of ``/etc``.
   A write that never passes through Python's ``open`` (libc through ``ctypes``, ``os.open`` with ``dir_fd``) meets
   a read-only file system or a path that does not exist. With bubblewrap the program also gets its own process
   (pid) namespace and ``/proc``, and cannot create further user namespaces.
2. **A network namespace** with nothing in it but a loopback device (unless ``Limits(network=True)``).
3. **Resource limits** (``setrlimit``): CPU seconds, address space, file size, open files, no core dumps, and no new
   processes (``RLIMIT_NPROC`` = 0).
4. **Another user**: when we run as root, the program runs as ``nobody`` (root also ignores ``RLIMIT_NPROC``), with
   no capabilities and ``no_new_privs``.
5. **An empty environment**, ``python -I -S`` (no ``PYTHON*`` variables, no user or site packages: the standard
   library only), and a process group that is killed whole on timeout or when the program is done.

On top of these, **an audit hook** (PEP 578) is a *reporting* layer. It names what the program tried (sockets,
``fork``/``exec``/``subprocess``, signals, ``ctypes``, writes outside the folder, reads of ``/proc``), refuses it
early so the status says ``blocked`` rather than some ``OSError``, and reports each event on a pipe the parent reads
(``Result.blocked``), not on the program's stderr, so a program cannot bury a report under its own output or forge
one by printing it. PEP 578 is explicit that audit hooks are not a sandbox: nothing above relies on this one.

The program's stdout and stderr go to files in its folder, capped by the file-size limit and read back from the
parent's own descriptors; ``RESULT_FD`` is a third channel, a pipe for results (``Result.results``) that the
code-quality harness uses so that what the program prints cannot pass for what it computed.

Where the platform cannot isolate (no bubblewrap and no ``unshare``, or user namespaces switched off) ``run``
refuses, with ``SandboxUnavailable`` saying what is missing, unless the caller opts in with
``Limits(allow_unisolated=True)``; then it runs with layers 3-5 only, and warns. ``capabilities()`` reports which
layers this platform has, measured by a probe rather than assumed.

This is a teaching sandbox for code from small models and for the accidents such code makes (infinite loops, huge
lists, stray files); the kernel's attack surface is all there (no seccomp filter). For code from strangers at scale,
use a VM or a hardened runtime (gVisor, Firecracker, nsjail).
"""
from __future__ import annotations

import functools
import json
import math
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field

BLOCK_MARK = "SANDBOX-BLOCKED: "  # on stderr, only when the report channel itself was closed by the program
OUTPUT_LIMIT = 64_000  # characters of stdout / stderr kept in a Result
RESULT_FD = 3  # the program's result channel (a pipe to the parent)
RESULT_LIMIT = 1_000_000  # bytes of results kept
REPORT_LIMIT = 200  # blocked events kept
BACKENDS = ("bwrap", "unshare")  # in order of preference
_TOOLS_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


class SandboxUnavailable(RuntimeError):
    """The platform cannot isolate untrusted code and the caller did not opt in to running it anyway."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, then the process group is killed
    cpu_s: float = 10  # RLIMIT_CPU: SIGXCPU after this many CPU seconds
    memory_mb: int = 512  # RLIMIT_AS: allocations beyond it raise MemoryError
    file_mb: int = 8  # RLIMIT_FSIZE: the largest file the code may write (stdout included)
    open_files: int = 64  # RLIMIT_NOFILE
    network: bool = False  # True leaves the network namespace and sockets alone
    audit_hook: bool = True  # False only to test the operating-system layers on their own
    allow_unisolated: bool = False  # True runs even where no namespace isolation exists (with a warning)

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
    results: str = ""  # what the program wrote to RESULT_FD (the first RESULT_LIMIT bytes)
    isolation: str = ""  # "bwrap", "unshare" or "none"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# The program's first code, already inside the namespaces: move the result channel to RESULT_FD, set the limits,
# install the audit hook, then run the user's file. It runs as `python -I -S -c BOOTSTRAP <config json>` and takes
# its settings from argv, not the environment.
BOOTSTRAP = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
os.chdir(cfg["root"])
report, results = cfg["report_fd"], cfg["results_fd"]
if report == cfg["result_fd"]:
    report_copy = os.dup(report)
    os.close(report)
    report = report_copy
if results != cfg["result_fd"]:
    os.dup2(results, cfg["result_fd"], inheritable=False)
    os.close(results)
os.set_inheritable(report, False)
for name, (soft, hard) in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
sys.modules.pop("ctypes", None)
sys.modules.pop("_ctypes", None)
root = os.path.realpath(cfg["root"])
allow_net = cfg["network"]
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
    line = event.replace("\n", "\\n").encode() + b"\n"
    try:
        os.write(report, line)
    except OSError:  # the program closed our channel; say it where a person will see it
        os.write(2, cfg["mark"].encode() + line)
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

# The fallback without bubblewrap: in new mount (and network) namespaces, build a root on a tmpfs from read-only
# bind mounts and the one writable folder, pivot into it, drop the old root and every capability, then run Python.
# Filled in by _unshare_script; "$@" is the command. Uses only util-linux and coreutils.
_UNSHARE_SCRIPT = r'''set -eu
PATH={path}
new={new}
mount -t tmpfs -o mode=0755,nosuid,nodev minimoe-sandbox "$new"
ro() {{  # ro SOURCE: the same path inside, bound read-only
  if [ -d "$1" ]; then mkdir -p "$new$1"; else mkdir -p "$(dirname "$new$1")"; : > "$new$1"; fi
  mount --bind "$1" "$new$1"
  mount -o remount,bind,ro,nosuid,nodev "$new$1"
}}
{binds}
mkdir -p "$new"{root} && mount --bind {root} "$new"{root}
mkdir "$new/dev" && mount -t tmpfs -o mode=0755,nosuid,noexec minimoe-dev "$new/dev"
for d in null zero full random urandom; do : > "$new/dev/$d"; mount --bind "/dev/$d" "$new/dev/$d"; done
mount -o remount,ro,bind "$new/dev"
mkdir "$new/.old" "$new/proc" && mount --rbind /proc "$new/proc"  # umount reads /proc/self/mountinfo
cd "$new"
pivot_root . .old
cd /
umount -l /.old
umount -l /proc
rmdir /.old /proc
mount -o remount,ro,bind /
exec env -i setpriv {user} --no-new-privs --inh-caps=-all --bounding-set=-all -- "$@"
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


def _interpreter_dirs(exe: str, user: tuple[int, int] | None) -> list[str] | None:
    """The folders `exe` needs (its own and its prefixes), if `user` can run it with the standard library."""
    ids = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
    try:
        probe = subprocess.run([os.path.realpath(exe), "-I", "-S", "-c", "import json, resource, sys; "
                                "print(json.dumps([sys.executable, sys.base_prefix, sys.base_exec_prefix]))"],
                               cwd="/", env={}, capture_output=True, timeout=30, **ids)
        paths = json.loads(probe.stdout) if probe.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if not paths:
        return None
    return [os.path.dirname(os.path.realpath(paths[0]))] + [os.path.realpath(p) for p in paths[1:]]


@functools.lru_cache(maxsize=1)
def _identity() -> tuple[str, tuple[int, int] | None, tuple[str, ...]]:
    """(interpreter, user, folders the interpreter needs) for sandboxed runs. As root: `nobody` and the first
    interpreter it can run (ours may live under /root, which it cannot enter; the sandbox needs only the standard
    library). Otherwise ourselves. The interpreter is named by its real path, which exists inside the sandbox."""
    user = _nobody()
    candidates = [sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
    if user is not None:
        for exe in candidates:
            dirs = exe and _interpreter_dirs(exe, user)
            if dirs:
                return os.path.realpath(exe), user, tuple(dirs)
    exe = sys.executable
    return os.path.realpath(exe), None, tuple(_interpreter_dirs(exe, None) or [os.path.dirname(exe), sys.prefix])


def _layout(network: bool) -> list[tuple[str, ...]]:
    """What the program sees besides its folder: ("ro", path) read-only binds and ("link", target, path) links."""
    items, covered = [], []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            items.append(("link", os.readlink(top), top))
        elif os.path.isdir(top):
            items.append(("ro", top))
            covered.append(top)
    for path in _identity()[2]:
        real = os.path.realpath(path)
        if os.path.isdir(real) and not any(real == c or real.startswith(c.rstrip("/") + "/") for c in covered):
            items.append(("ro", real))
            covered.append(real)
    extra = ["/etc/ld.so.cache"] + (["/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf"] if network else [])
    return items + [("ro", path) for path in extra if os.path.exists(path)]


def _bwrap_command(tool: str, root: str, network: bool) -> list[str]:
    cmd = [tool, "--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--cap-drop", "ALL", "--clearenv"]
    if not network:
        cmd.append("--unshare-net")
    for item in _layout(network):
        cmd += ["--ro-bind", item[1], item[1]] if item[0] == "ro" else ["--symlink", item[1], item[2]]
    return cmd + ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--bind", root, root,
                  "--remount-ro", "/", "--chdir", root, "--"]


def _unshare_script(root: str, new: str, network: bool, user: tuple[int, int] | None) -> str:
    binds = []
    for item in _layout(network):
        if item[0] == "ro":
            binds.append(f"ro {shlex.quote(item[1])}")
        else:
            binds.append(f'ln -s {shlex.quote(item[1])} "$new"{shlex.quote(item[2])}')
    who = f"--reuid={user[0]} --regid={user[1]} --clear-groups" if user else ""
    return _UNSHARE_SCRIPT.format(path=_TOOLS_PATH, new=shlex.quote(new), binds="\n".join(binds),
                                  root=shlex.quote(root), user=who)


def _unshare_command(tool: str, network: bool) -> list[str]:
    cmd = [tool, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        cmd.append("--map-root-user")  # a user namespace; the program still ends up with no capabilities
    if not network:
        cmd.append("--net")
    return cmd


def _rlimits(limits: Limits) -> dict:
    mb = 1024 * 1024
    cpu = math.ceil(limits.cpu_s)  # SIGXCPU at the soft limit, SIGKILL one second later at the hard one
    soft_is_hard = {"RLIMIT_AS": int(limits.memory_mb * mb), "RLIMIT_FSIZE": int(limits.file_mb * mb),
                    "RLIMIT_NOFILE": int(limits.open_files), "RLIMIT_CORE": 0, "RLIMIT_NPROC": 0}
    return {"RLIMIT_CPU": (cpu, cpu + 1), **{k: (v, v) for k, v in soft_is_hard.items()}}


class _Drain(threading.Thread):
    """Read a pipe to its end, keeping the first `limit` bytes, so the writer never blocks on a full pipe."""

    def __init__(self, fd: int, limit: int):
        super().__init__(daemon=True)
        self.fd, self.limit, self.data = fd, limit, bytearray()

    def run(self):
        with open(self.fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                if len(self.data) < self.limit:
                    self.data += chunk[:self.limit - len(self.data)]


def _head(f) -> tuple[str, str]:
    """(the first OUTPUT_LIMIT characters, the last line) of an output file, read through our own descriptor."""
    f.seek(0)
    data = f.read(OUTPUT_LIMIT * 4)
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 4096))
    tail = f.read(4096).decode("utf-8", errors="replace").strip().splitlines()
    return data.decode("utf-8", errors="replace")[:OUTPUT_LIMIT], tail[-1] if tail else ""


def _classify(returncode: int | None, timed_out: bool, last: str, blocked: list[str]) -> tuple[str, str]:
    if timed_out:
        return "timeout", "ran past the wall-clock limit and was killed"
    if returncode == -signal.SIGXCPU:
        return "cpu", "ran past the CPU-time limit (SIGXCPU)"
    if returncode == -signal.SIGXFSZ:
        return "file size", "wrote more than the file-size limit (SIGXFSZ)"
    if returncode is not None and returncode < 0:
        try:
            return "killed", f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return "killed", f"killed by signal {-returncode}"
    if "File too large" in last:  # Python ignores SIGXFSZ, so the write fails with EFBIG instead
        return "file size", "wrote more than the file-size limit (File too large)"
    if "MemoryError" in last:
        return "memory", "allocated more than the memory limit (MemoryError)"
    if blocked:
        return "blocked", f"the sandbox refused: {blocked[0]}"
    if returncode == 0:
        return "ok", ""
    return "error", last or f"exit status {returncode}"


def _execute(source: str, limits: Limits, stdin: str, files: dict[str, str] | None, backend: str | None) -> Result:
    """Run `source` inside `backend` ("bwrap", "unshare", or None for no namespaces at all)."""
    exe, user, _ = _identity()
    root = tempfile.mkdtemp(prefix="minimoe-sandbox-")
    new = tempfile.mkdtemp(prefix="minimoe-sandbox-mnt-") if backend == "unshare" else None
    pipes = []
    try:
        main = os.path.join(root, "main.py")
        for name, text in {"main.py": source, **(files or {})}.items():
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
            with open(os.path.join(root, name), "w", encoding="utf-8") as f:
                f.write(text)
        if user is not None:
            for path in [root] + [os.path.join(root, n) for n in os.listdir(root)]:
                os.chown(path, *user)
        os.chmod(root, 0o700)
        results_r, results_w = os.pipe()
        report_r, report_w = os.pipe()
        drains = [_Drain(results_r, RESULT_LIMIT), _Drain(report_r, REPORT_LIMIT * 200)]
        for d in drains:
            d.start()  # each closes its end when the last writer is gone
        pipes = [results_w, report_w]
        cfg = {"rlimits": _rlimits(limits), "root": root, "main": main, "mark": BLOCK_MARK,
               "network": limits.network, "hook": limits.audit_hook, "result_fd": RESULT_FD,
               "results_fd": results_w, "report_fd": report_w}
        python = [exe, "-I", "-S", "-X", "utf8", "-c", BOOTSTRAP, json.dumps(cfg)]
        as_user = user
        if backend == "bwrap":
            cmd = _bwrap_command(shutil.which("bwrap", path=_TOOLS_PATH), root, limits.network) + python
        elif backend == "unshare":
            script = _unshare_script(root, new, limits.network, user)
            cmd = _unshare_command(shutil.which("unshare", path=_TOOLS_PATH), limits.network) + [
                "/bin/sh", "-c", script, "sh"] + python
            as_user = None  # it needs root (or a user namespace) for the mounts; setpriv drops to `user`
        else:
            cmd = python
        ids = {"user": as_user[0], "group": as_user[1], "extra_groups": []} if as_user else {}
        start = time.perf_counter()
        with open(os.path.join(root, ".stdout"), "w+b") as fo, open(os.path.join(root, ".stderr"), "w+b") as fe:
            if user is not None:
                os.fchown(fo.fileno(), *user)
                os.fchown(fe.fileno(), *user)
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=fo, stderr=fe, cwd=root, env={},
                                    start_new_session=True, close_fds=True, pass_fds=pipes, **ids)
            for fd in pipes:
                os.close(fd)
            pipes = []
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
            for d in drains:
                d.join(timeout=5)
            stdout, _ = _head(fo)
            stderr, last = _head(fe)
        returncode = proc.returncode
        if backend == "bwrap" and returncode - 128 in set(signal.Signals):  # bwrap says 128 + N for signal N
            returncode = -(returncode - 128)
        blocked = bytes(drains[1].data).decode("utf-8", errors="replace").splitlines()[:REPORT_LIMIT]
        status, reason = _classify(returncode, timed_out, last, blocked)
        return Result(status, returncode, stdout, stderr, seconds, blocked, reason,
                      bytes(drains[0].data).decode("utf-8", errors="replace"), backend or "none")
    finally:
        for fd in pipes:
            os.close(fd)
        shutil.rmtree(root, ignore_errors=True)
        if new:
            shutil.rmtree(new, ignore_errors=True)


# A probe of the layers, run with the audit hook off: can it write outside its folder, see a host file, reach a
# network interface other than loopback, see our namespaces?
_PROBE = '''
import json, os, socket
out = {{"wrote_outside": False, "sees_host": os.path.exists({visible!r})}}
try:
    os.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT, 0o666))
    out["wrote_outside"] = True
except OSError:
    pass
out["interfaces"] = sorted(name for _, name in socket.if_nameindex())
out["ns"] = {{k: os.readlink("/proc/self/ns/" + k) if os.path.exists("/proc/self/ns/" + k) else None
             for k in ("pid", "net", "mnt")}}
open("inside.txt", "w").write("ok")
print(json.dumps(out))
'''


def _our_namespace(kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def _measure(backend: str | None) -> dict:
    """Run the probe inside `backend` and say what held: {"contained": bool, "error": str, and one bool per layer}.
    The probe aims at a world-writable folder outside the sandbox, which user `nobody` could write to."""
    tool = shutil.which(backend, path=_TOOLS_PATH) if backend else "-"
    if tool is None:
        return {"contained": False, "error": f"{backend} is not installed"}
    outside = tempfile.mkdtemp(prefix="minimoe-sandbox-probe-")
    try:
        os.chmod(outside, 0o777)
        visible = os.path.join(outside, "visible")
        with open(visible, "w") as f:
            f.write("host")
        os.chmod(visible, 0o644)
        target = os.path.join(outside, "written")
        try:
            r = _execute(_PROBE.format(visible=visible, target=target), Limits(timeout_s=30, audit_hook=False),
                         "", None, backend)
        except OSError as e:
            return {"contained": False, "error": f"{backend} did not start: {e}"}
        if not r.ok:
            detail = (r.stderr.strip().splitlines() or [r.reason])[-1]
            return {"contained": False, "error": f"{backend} failed: {detail}"}
        try:
            seen = json.loads(r.stdout)
        except ValueError:
            return {"contained": False, "error": f"{backend} ran, but the probe's report is unreadable"}
        ours = sorted(name for _, name in socket.if_nameindex())
        layers = {"mount_namespace": not (seen["wrote_outside"] or os.path.exists(target) or seen["sees_host"]),
                  "network_namespace": (seen["interfaces"] != ours
                                        or seen["ns"]["net"] not in (None, _our_namespace("net"))),
                  "pid_namespace": seen["ns"]["pid"] not in (None, _our_namespace("pid"))}
        missing = [k for k in ("mount_namespace", "network_namespace") if not layers[k]]
        return {"contained": not missing, **layers,
                "error": f"{backend} ran but without {' and '.join(missing)}" if missing else ""}
    finally:
        shutil.rmtree(outside, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def _isolation() -> tuple[str | None, str]:
    """(the first backend whose probe was contained, "") or (None, what is missing on this platform)."""
    problems = []
    for backend in BACKENDS:
        measured = _measure(backend)
        if measured["contained"]:
            return backend, ""
        problems.append(measured["error"])
    return None, "; ".join(problems)


def capabilities() -> dict:
    """Which layers this platform has, measured by a probe run in the sandbox with the audit hook off:
    isolation (the tool: "bubblewrap", "unshare" or None, and then `missing`: why), mount_namespace,
    network_namespace, pid_namespace and other_user (bools), rlimits (always True), audit_hook ("reports only") and
    the interpreter the sandbox runs."""
    backend, missing = _isolation()
    measured = _measure(backend)
    return {"isolation": {"bwrap": "bubblewrap"}.get(backend, backend), **({"missing": missing} if missing else {}),
            "mount_namespace": measured.get("mount_namespace", False),
            "network_namespace": measured.get("network_namespace", False),
            "pid_namespace": measured.get("pid_namespace", False),
            "other_user": _identity()[1] is not None, "rlimits": True, "audit_hook": "reports only",
            "interpreter": _identity()[0]}


def run(source: str | bytes, limits: Limits = Limits(), stdin: str = "", files: dict[str, str] | None = None) -> Result:
    """Run `source` as a Python program in a sandbox; never raises for anything the program does.

    files: extra {name: text} written into the sandbox folder first (e.g. a test file the program imports).
    Raises SandboxUnavailable where the platform cannot isolate the program, unless
    `limits.allow_unisolated`.
    """
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as e:
            return Result("error", None, "", "", 0.0, reason=f"source is not valid UTF-8: {e}")
    if not isinstance(limits, Limits):
        raise ValueError(f"limits must be a sandbox.Limits, got {type(limits).__name__}")
    backend, missing = _isolation()
    if backend is None:
        if not limits.allow_unisolated:
            raise SandboxUnavailable(
                f"refusing to run untrusted code: this platform cannot isolate it ({missing}). Install bubblewrap "
                "(apt-get install bubblewrap) or allow user namespaces (sysctl kernel.unprivileged_userns_clone=1; "
                "on Ubuntu also kernel.apparmor_restrict_unprivileged_userns=0), or run as root. To run it anyway, "
                "with only resource limits, another user and the audit hook, pass "
                "sandbox.Limits(..., allow_unisolated=True).")
        warnings.warn(f"sandbox: running untrusted code WITHOUT operating-system isolation ({missing}); it can "
                      "write wherever its user can and reach the network", RuntimeWarning, stacklevel=2)
    return _execute(source, limits, stdin, files, backend)
