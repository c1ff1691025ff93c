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


def matmul_peak(dtype: torch.dtype, device, sizes=(1024, 2048), repeats: int = 10) -> float:
    """Best FLOP/s of an n x n @ n x n matmul over `sizes` and `repeats` (2 n^3 FLOPs each)."""
    device = resolve_device(device)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up: first call pays for thread-pool start and kernel selection
        for _ in range(repeats):
            with Timer(device) as t:
                a @ b
            best = max(best, 2 * n ** 3 / t.seconds)
    return best


# Dense (no sparsity) peak tensor throughput from the vendors' datasheets, FLOP/s, by (name fragment, dtype).
DATASHEET_PEAK_FLOPS = {
    ("H200", "bf16"): 989.4e12, ("H200", "fp32"): 66.9e12,   # SXM; tf32 tensor cores would be 494.7e12
    ("H100", "bf16"): 989.4e12, ("H100", "fp32"): 66.9e12,   # SXM
    ("A100", "bf16"): 312e12, ("A100", "fp32"): 19.5e12,
}
_PEAK_CACHE: dict = {}


def peak_flops(device="cpu", precision: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for model-FLOPs utilization.

    A GPU named in DATASHEET_PEAK_FLOPS gets its datasheet peak, as MFU is defined in the PaLM paper.
    Anything else gets the best of a few large square matmuls measured here, in that precision, with torch's
    current thread count: an achievable peak, so MFU against it is an upper bound on the datasheet MFU.
    Measured once per process and device.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device = resolve_device(device)
    name = device_name(device)
    if device.type == "cuda":
        for (fragment, dtype), value in DATASHEET_PEAK_FLOPS.items():
            if fragment in name and dtype == precision:
                return value, f"datasheet ({fragment}, {precision}, dense)"
    key = (name, precision)
    if key not in _PEAK_CACHE:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        _PEAK_CACHE[key] = matmul_peak(dtype, device, sizes=(4096,) if device.type == "cuda" else (1024,),
                                       repeats=10)
    return _PEAK_CACHE[key], f"measured ({precision} matmul on {name})"
