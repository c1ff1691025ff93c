"""Run one function on N processes with torch.distributed initialised, and fail loudly.

    from minimoe.parallel import launch
    results = launch.run(my_check, 2, arg)      # my_check(arg) on ranks 0 and 1; returns [result0, result1]

Each process gets the default process group (gloo on CPU, NCCL when every rank can have its own GPU) and one
intra-op thread, so N processes share a small CPU fairly. The function must be importable (defined at module
level in a module, not in a notebook cell), because each process is a fresh interpreter (the "spawn" start
method, the one that works the same on Linux, macOS and Windows and with CUDA).

If a rank raises, the others are stopped and RankError carries that rank's traceback. If a rank hangs (a
collective that its peers never join), the run stops after `timeout` seconds with a TimeoutError that names
the ranks that did not finish. There is no silent hang.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue as queue_lib
import socket
import time
import traceback

import torch
import torch.distributed as dist


class RankError(RuntimeError):
    """A rank of a multi-process run raised; the message carries its traceback."""

    def __init__(self, rank: int, trace: str):
        super().__init__(f"rank {rank} failed:\n{trace}")
        self.rank = rank


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
        results.put((rank, "ok", out))
    except BaseException:  # noqa: B036 - report everything, including KeyboardInterrupt, to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(fn, nproc: int, *args, backend: str = "auto", timeout: float = 120.0, **kwargs) -> list:
    """fn(*args, **kwargs) on ranks 0..nproc-1; returns the results in rank order.

    Raises RankError (the first rank that raised, with its traceback), TimeoutError (ranks still running after
    `timeout` seconds, e.g. blocked in a collective), or RuntimeError (a rank that died without a word, e.g.
    killed by the OS).
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
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < nproc:
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue_lib.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                                       "without reporting (killed, or out of memory?)") from None
                if time.monotonic() > deadline:
                    missing = [r for r in range(nproc) if r not in out]
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout:g} s "
                                       "(a collective that not every rank joined?)") from None
                continue
            if status == "error":
                raise RankError(rank, value)
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == nproc else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(nproc)]
