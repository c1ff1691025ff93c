"""Device choice and timing helpers shared by training, generation and benchmarks."""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
import time

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple's MPS, then the CPU; anything else is passed to torch.device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from e


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    Eager PyTorch allocates and frees every activation and gradient on every step. glibc serves blocks of
    32 MB and more with a fresh mmap and returns freed memory at the top of the heap to the OS, so each step
    pays page faults to re-touch the same memory: on a 2-core CPU this made a 10M-parameter training step up
    to a third slower. With mmap off and trimming off, the heap grows to the peak working set once and is
    reused, which is what jemalloc or tcmalloc (Intel's advice for PyTorch on CPUs) achieve. The cost is that
    the process keeps its peak memory. Process-wide and idempotent; a no-op off glibc Linux or when
    MINIMOE_MALLOC_TUNING=0. Returns whether the setting is active.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("MINIMOE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
        _ALLOCATOR_TUNED = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 40))
    except (OSError, AttributeError):  # musl, or no libc.so.6
        return False
    return _ALLOCATOR_TUNED


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock time measures work done rather than work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Timer:
    """Seconds between start() and stop(): CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            synchronize(self.device)
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self._t0
        return False


def median_seconds(fn, device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` calls after `warmup` untimed ones (CUDA events on a GPU)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        times.append(t.seconds)
    return statistics.median(times)


def device_name(device="cpu") -> str:
    """A readable name for where timings ran: the GPU's name, or the CPU's model and torch's thread count."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    name = name or platform.processor() or "CPU"
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'s' if threads != 1 else ''}"
