"""Run one function on N processes with torch.distributed initialised, and fail loudly.

    from minimoe.parallel import launch
    results = launch.run(my_check, 2, arg)      # my_check(arg) on ranks 0 and 1; returns [result0, result1]

Each process gets the default process group (gloo on CPU, NCCL when every rank can have its own GPU) and one
intra-op thread, so N processes share a small CPU fairly. The function must be importable (defined at module
level in a module, not in a notebook cell), because each process is a fresh interpreter (the "spawn" start
method, the one that works the same on Linux, macOS and Windows and with CUDA).

If a rank raises, the others are stopped and RankError carries that rank's traceback. If a rank dies without
raising (os._exit, killed by the OS or out of memory), RankError names it with its exit code or signal, not
the peer that first noticed ("connection closed by peer"). If a rank hangs (a collective that its peers never
join), the run stops after `timeout` seconds with a TimeoutError that names the ranks that did not finish.
There is no silent hang.

Results travel as bytes (pickled in the rank, unpickled here, as the queue would anyway), not as shared memory:
a tensor shared by torch.multiprocessing lives only as long as the process that made it, and a rank exits as
soon as it has reported. So a result may hold any number of tensors of any size, as long as it pickles.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue as queue_lib
import signal
import socket
import time
import traceback

import torch
import torch.distributed as dist


# once a rank has failed, how long the others get to report or exit: the peer that noticed first is often not the
# rank at fault, and a rank that died without a word shows its exit code only once the OS has reaped it
GRACE_S = 2.0


class RankError(RuntimeError):
    """A rank of a multi-process run failed: it raised (the message carries its traceback), or it died without
    raising (`exitcode` is its exit code, or minus the signal that killed it, as multiprocessing reports it)."""

    def __init__(self, rank: int, trace: str, exitcode: int | None = None):
        super().__init__(f"rank {rank} failed:\n{trace}")
        self.rank, self.exitcode = rank, exitcode


def _died(rank: int, exitcode: int) -> RankError:
    if exitcode < 0:
        try:
            how = f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with exit code {exitcode}"
    return RankError(rank, f"the process {how} without raising or reporting a result (os._exit, killed by "
                           "the OS, out of memory, or it could not start: see its stderr)", exitcode)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(nproc: int) -> str:
    """NCCL when there is a GPU for every rank, gloo otherwise (gloo runs everywhere, NCCL only on GPUs)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= nproc and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def device() -> torch.device:
    """This rank's device: its own GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _worker(rank, nproc, port, backend, timeout, fn, args, kwargs, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=nproc,
                                timeout=datetime.timedelta(seconds=timeout))
        out = fn(*args, **kwargs)
        # plain pickle: tensors as bytes, not torch.multiprocessing's shared memory that vanishes with this process
        results.put((rank, "ok", pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)))
    except BaseException:  # noqa: B036 - report everything, including KeyboardInterrupt, to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(fn, nproc: int, *args, backend: str = "auto", timeout: float = 120.0, **kwargs) -> list:
    """fn(*args, **kwargs) on ranks 0..nproc-1; returns the results in rank order.

    Raises RankError (a rank that died without raising, named with its exit code or signal; else the first
    rank that raised, with its traceback), or TimeoutError (ranks still running after `timeout` seconds, e.g.
    blocked in a collective).
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    backend = default_backend(nproc) if backend == "auto" else backend
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, backend, timeout, fn, args, kwargs, results),
                         daemon=True) for r in range(nproc)]
    for p in procs:
        p.start()
    out, errors, deadline, give_up = {}, {}, time.monotonic() + timeout, None
    try:
        while len(out) + len(errors) < nproc:
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue_lib.Empty:
                # a rank that exited before reporting died without raising: it, not the peers whose collectives
                # it broke, is the one to name. Its exit is seen before this check, so any report it made is
                # already in the queue, which the loop has just found empty.
                silent = [r for r, p in enumerate(procs) if r not in out and r not in errors and p.exitcode is not None]
                if silent:
                    raise _died(silent[0], procs[silent[0]].exitcode) from None
                now = time.monotonic()
                if give_up is not None and now > give_up:
                    break
                if now > deadline:
                    missing = [r for r in range(nproc) if r not in out and r not in errors]
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout:g} s "
                                       "(a collective that not every rank joined?)") from None
                continue
            if status == "error":
                errors[rank] = value
                give_up = give_up or time.monotonic() + GRACE_S
            else:
                out[rank] = pickle.loads(value)
        if errors:
            rank, trace = next(iter(errors.items()))  # the first to arrive
            raise RankError(rank, trace)
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == nproc else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(nproc)]
