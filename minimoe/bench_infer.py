"""Inference benchmarks: the article's listing P2 run as written, each of its defects measured, and a correct
benchmark that reports what the article's table P3 reports (throughput, first-token latency, memory).

The listing P2 times `model.generate(input_ids, max_length=2048)` once, with time.time() and no device
synchronisation, on a 4096-token prompt of random ids in [0, 100), and divides every token of the output,
prompt included, by the latency. `article_benchmark` runs that method on our models; `article_defects`
measures what each of its choices does to the number it prints.

`benchmark` is the correct method. A generation has two phases with different costs:

    prefill   one forward over the whole prompt, filling the KV cache, ending with the first new token.
              Its time is the time to first token (TTFT), what a user waits before anything appears.
    decode    one forward of one token per sequence for every later token, reading the cache.
              decode throughput = batch * (new_tokens - 1) / decode time: only generated tokens count.

Both are timed separately in the same run (`device.Timer`: CUDA events on a GPU, perf_counter after a
synchronisation elsewhere), after a warm-up, as the median of several repeats with their min and max. The
prompt is held-out text, and the tokens the timed loop produces are checked against `model.generate`'s
greedy output, so the timed code computes what generation computes.

`reference_goals` is the benchmark's own reference run on the 6-layer, 384-wide model of `bench.BENCH_MODEL`:
what the KV cache, batching, bf16 weights and latent attention (MLA) buy at decode time, each as a ratio of
two numbers measured in the same process, against a stated goal.
"""
from __future__ import annotations

import copy
import math
import statistics
import sys
import time

import numpy as np
import torch

from .attention import CausalSelfAttention, MultiHeadLatentAttention, kv_cache_bytes_per_token
from .bench import BENCH_MODEL, bench_decode
from .config import ModelConfig
from .data import ByteTokenizer
from .device import Timer, device_name, resolve_device, synchronize, tune_cpu_allocator
from .model import Cache, MiniLM
from .report import markdown_table

try:
    import resource  # Unix only: the fallback peak-memory reading
except ImportError:  # pragma: no cover - Windows
    resource = None

# The listing's own numbers: benchmark(model, input_length=4096, batch_size=8) calls generate(max_length=2048).
ARTICLE_INPUT_LENGTH = 4096
ARTICLE_MAX_LENGTH = 2048
ARTICLE_BATCH_SIZE = 8
ARTICLE_ID_RANGE = 100  # torch.randint(0, 100, ...): ids 0..99, bytes NUL..'c' for a byte-level model

# What transformers' generate does when max_length <= the prompt's length (checked against transformers 5.x).
HF_MAX_LENGTH_NOTE = ("transformers 5 raises ValueError('Input length of input_ids is N, but `max_length` is set "
                      "to M ...') when max_length <= the prompt length; older releases only logged that as a "
                      "warning. Either way the listing cannot measure 2048 generated tokens after a 4096-token "
                      "prompt: max_length counts the prompt (max_new_tokens does not).")

# Goals of `reference_goals`: name -> (goal, ">=" or "<=").
REFERENCE_GOALS = {
    "kv_cache_speedup_b1": (7.0, ">="),
    "kv_cache_speedup_b8": (25.0, ">="),
    "decode_throughput_b8_over_b1": (3.5, ">="),
    "mla_over_mha_cache_bytes": (0.25, "<="),
}


# -----------------------------------------------------------------------------
# Input checks


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_sizes(model: MiniLM, batch_size, prompt_len, new_tokens) -> None:
    """One clear ValueError, naming the field, for a size the model cannot run."""
    _check_int("batch_size", batch_size, 1)
    _check_int("prompt_len", prompt_len, 1)
    _check_int("new_tokens", new_tokens, 1)
    context = model.config.max_seq_len
    if prompt_len > context:
        raise ValueError(f"prompt_len={prompt_len} is longer than the model's context (max_seq_len={context})")
    if prompt_len + new_tokens > context:
        raise ValueError(f"new_tokens={new_tokens} after a prompt of {prompt_len} needs {prompt_len + new_tokens} "
                         f"positions, more than the model's context (max_seq_len={context})")


# -----------------------------------------------------------------------------
# Prompts


def _held_out_stream() -> tuple[np.ndarray, str]:
    """Token ids of the stdlib corpus's validation split (code, then prose), and a description."""
    from .data import builtin_splits  # loads ~/.cache/minimoe/data (0.1 s) or builds it (seconds) on first use
    _, val = builtin_splits()
    stream = np.concatenate([val.streams[d] for d in val.domains])
    return stream, f"held-out stdlib text ({', '.join(val.domains)}; {len(stream):,} tokens)"


def text_prompts(batch_size: int, prompt_len: int, vocab_size: int = 260, seed: int = 0,
                 text: str | None = None) -> tuple[torch.Tensor, str]:
    """([batch_size, prompt_len] token ids, where they come from): windows of real text at seeded offsets.

    `text` (a string, encoded as UTF-8 bytes) is the source when given; otherwise the held-out (validation)
    split of the built-in stdlib corpus, which no zoo model trained on. If that corpus cannot be loaded, or
    its ids do not fit the vocabulary, the prompt falls back to uniform random bytes 0-255 and says so.
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("prompt_len", prompt_len, 1)
    rng = np.random.default_rng(seed)
    if text is not None:
        stream = ByteTokenizer().encode_array(text)
        source = f"given text ({len(stream):,} bytes)"
        if len(stream) < prompt_len:
            raise ValueError(f"text has {len(stream)} bytes, fewer than prompt_len={prompt_len}")
    else:
        try:
            stream, source = _held_out_stream()
        except (OSError, ValueError) as e:
            stream, source = None, f"random bytes 0-255 (held-out text unavailable: {e})"
        if stream is not None and (len(stream) < prompt_len or int(stream.max()) >= vocab_size):
            stream, source = None, "random bytes 0-255 (held-out text does not fit this model)"
        if stream is None:
            high = min(256, vocab_size)
            ids = torch.from_numpy(rng.integers(0, high, size=(batch_size, prompt_len)))
            return ids.long(), source
    starts = rng.integers(0, len(stream) - prompt_len + 1, size=batch_size)
    ids = np.stack([stream[s : s + prompt_len] for s in starts]).astype(np.int64)
    return torch.from_numpy(ids), source


def article_prompt(batch_size: int, input_length: int, seed: int = 0) -> torch.Tensor:
    """The listing's input: ids uniform in [0, 100), i.e. the bytes NUL..'c' for a byte-level model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ARTICLE_ID_RANGE, (batch_size, input_length), generator=g)


# -----------------------------------------------------------------------------
# Memory


def _proc_status_kb(field: str) -> int | None:
    """A "kB" field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS: Linux >= 4.0, writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


def _ru_maxrss_bytes() -> int | None:
    """The process's lifetime peak RSS from getrusage: kilobytes on Linux, bytes on macOS (None on Windows)."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak memory while the block runs. Sets `peak_bytes`, `run_bytes` and `method` on exit.

    CUDA: `peak_bytes` = torch.cuda.max_memory_allocated after reset_peak_memory_stats, i.e. the most bytes
    held by tensors at once (weights included); `run_bytes` = that peak minus what tensors held before the
    block. Exact, and independent of what the caching allocator keeps reserved.

    CPU (Linux): `peak_bytes` = the process's peak resident set (VmHWM) during the block, after resetting the
    mark to the current RSS; `run_bytes` = that peak minus the RSS before the block: the resident memory the
    run had to add. This counts the whole process (Python, torch, the weights) in `peak_bytes`, an upper bound
    on what the model needs; and memory the allocator kept from earlier work is reused without growth (more so
    after `tune_cpu_allocator`, which keeps freed memory), so `run_bytes` is a lower bound on the run's working
    set. Without clear_refs, getrusage's ru_maxrss is the fallback: a lifetime peak that never decreases, so its
    growth is 0 whenever an earlier peak was higher. Other devices: not measured (None).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = self.run_bytes = None
        self.method = "not measured"

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            self._hwm = _reset_peak_rss()
            rss = _proc_status_kb("VmRSS")
            self._hwm = self._hwm and rss is not None
            self._before = rss * 1024 if self._hwm else _ru_maxrss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated (tensors, weights included)"
        elif self.device.type == "cpu":
            if self._hwm:
                self.peak_bytes = _proc_status_kb("VmHWM") * 1024
                self.method = "peak RSS of the process (VmHWM, reset before the run)"
            else:
                self.peak_bytes = _ru_maxrss_bytes()
                self.method = "ru_maxrss (lifetime peak RSS; growth is a lower bound)"
        if self.peak_bytes is not None and self._before is not None:
            self.run_bytes = max(self.peak_bytes - self._before, 0)
        return False


# -----------------------------------------------------------------------------
# The article's listing, and its defects


def article_benchmark(model: MiniLM, input_length: int | None = None, batch_size: int = ARTICLE_BATCH_SIZE,
                      max_length: int | None = None, seed: int = 0) -> dict:
    """The listing P2 as written, as far as our models allow.

    Our contexts are 128-256 tokens, not 4096, so the listing's lengths are scaled down by one factor
    `scale`: by default to fit its prompt and the 2048 tokens it presumably meant to generate into the
    context, input_length = 4096 * scale and max_length = 2048 * scale with scale = max_seq_len / 6144; a
    given input_length alone sets scale = input_length / 4096. max_length means what it means in transformers,
    the total length, prompt included, so the run generates max(0, max_length - input_length) tokens; as the
    listing is written (max_length < input_length) that is none. Then, as in the listing: ids uniform in
    [0, 100), one warm-up call, one call timed with time.time() and no synchronisation, and

        throughput = batch * (prompt + generated tokens) / latency

    which is what the listing would print (without generation, the prompt divided by the time of a call
    that did nothing). Returns every measured and derived number.
    """
    context = model.config.max_seq_len
    _check_int("batch_size", batch_size, 1)
    if input_length is None:
        scale = context / (ARTICLE_INPUT_LENGTH + ARTICLE_MAX_LENGTH)
        input_length = max(1, round(ARTICLE_INPUT_LENGTH * scale))
    else:
        _check_int("input_length", input_length, 1)
        scale = input_length / ARTICLE_INPUT_LENGTH
    if max_length is None:
        max_length = max(1, round(ARTICLE_MAX_LENGTH * scale))
    _check_int("max_length", max_length, 1)
    if input_length > context:
        raise ValueError(f"input_length={input_length} is longer than the model's context (max_seq_len={context})")
    if max_length > context:
        raise ValueError(f"max_length={max_length} is longer than the model's context (max_seq_len={context})")
    new_tokens = max(0, max_length - input_length)
    ids = article_prompt(batch_size, input_length, seed).to(model.device)

    model.generate(ids, new_tokens)  # the listing's warm-up
    start = time.time()  # the listing's clock: wall time, and no synchronisation before or after
    output = model.generate(ids, new_tokens)
    latency = time.time() - start
    generated = output.shape[1] - input_length
    counted = batch_size * (input_length + generated)
    return {
        "batch_size": batch_size, "input_length": input_length, "max_length": max_length,
        "scale": scale, "article_input_length": ARTICLE_INPUT_LENGTH, "article_max_length": ARTICLE_MAX_LENGTH,
        "context": context, "generated": generated, "generated_tokens": batch_size * generated,
        "tokens_counted": counted, "latency_s": latency,
        "throughput_tokens_per_s": counted / latency if latency > 0 else math.inf,
        "generated_tokens_per_s": batch_size * generated / latency if latency > 0 else math.inf,
        "synchronized": False, "timed_runs": 1, "id_range": (0, ARTICLE_ID_RANGE),
        "nothing_generated": generated == 0, "transformers_note": HF_MAX_LENGTH_NOTE,
        "device": device_name(model.device),
    }


def article_defects(model: MiniLM, batch_size: int = ARTICLE_BATCH_SIZE, prompt_len: int | None = None,
                    new_tokens: int | None = None, runs: int = 10, seed: int = 0, text: str | None = None) -> dict:
    """Measure what each of the listing's choices does to the number it prints.

    Defaults keep the listing's proportions, a prompt twice as long as the generation, in our context:
    prompt_len = 2/3 and new_tokens = 1/3 of max_seq_len. The prompt is the listing's (ids in [0, 100)).

    1. "prompt_counting": one unsynchronised run, as the listing times it; its throughput counted the
       listing's way (prompt + generated) and counted by generated tokens only. Their ratio is the inflation,
       (prompt + generated) / generated whatever the latency. The `correct_*` numbers come from `benchmark`
       at the same sizes (on real text: held-out stdlib text, or `text`); `listing_over_correct` divides the
       listing's number by the correct decode throughput.
    2. "single_run": `runs` single unsynchronised time.time() timings (after one warm-up) against the median
       of `runs` synchronised ones (device.Timer): min, max, max/min, coefficient of variation, and how far a
       single timing can land from the median. On a CPU, kernels run synchronously, so the missing
       synchronisation costs nothing there and the spread is the run-to-run noise one timing cannot show; on a
       GPU, time.time() after generate also misses queued work that has not run yet.
    3. "max_length": `article_benchmark` as written (max_length < input_length): nothing is generated.
    4. "token_ids": note only: ids 0-99 are bytes NUL..'c', a third of them control characters, not language.
    """
    context = model.config.max_seq_len
    prompt_len = context * 2 // 3 if prompt_len is None else prompt_len
    if new_tokens is None:  # the rest of the context, once prompt_len is known to fit
        _check_sizes(model, batch_size, prompt_len, 1)
        new_tokens = context - prompt_len
    _check_sizes(model, batch_size, prompt_len, new_tokens)
    _check_int("runs", runs, 2)
    device = model.device
    ids = article_prompt(batch_size, prompt_len, seed).to(device)

    model.generate(ids, new_tokens)  # warm-up
    singles = []
    for _ in range(runs):  # the listing's clock, repeated
        start = time.time()
        output = model.generate(ids, new_tokens)
        singles.append(time.time() - start)
    generated = output.shape[1] - prompt_len
    synced = []
    for _ in range(runs):
        with Timer(device) as t:
            model.generate(ids, new_tokens)
        synced.append(t.seconds)
    median = statistics.median(synced)

    first = singles[0]
    listing = batch_size * (prompt_len + generated) / first
    generated_only = batch_size * generated / first
    correct = benchmark(model, batch_size, prompt_len, new_tokens, repeats=3, seed=seed, text=text)
    prompt_counting = {
        "latency_s": first, "listing_tokens_per_s": listing, "generated_tokens_per_s": generated_only,
        "inflation": listing / generated_only, "expected_inflation": (prompt_len + generated) / generated,
        "correct_decode_tokens_per_s": correct["decode_tokens_per_s"], "correct_ttft_ms": correct["ttft_ms"],
        "listing_over_correct": listing / correct["decode_tokens_per_s"] if correct["decode_tokens_per_s"] else None,
    }
    mean = statistics.fmean(singles)
    single_run = {
        "runs": runs, "single_s": singles, "min_s": min(singles), "max_s": max(singles),
        "max_over_min": max(singles) / min(singles), "cv": statistics.stdev(singles) / mean,
        "synced_median_s": median, "synced_min_s": min(synced), "synced_max_s": max(synced),
        "worst_single_vs_median": max(abs(s - median) for s in singles) / median,
        "listing_tokens_per_s_range": (batch_size * (prompt_len + generated) / max(singles),
                                       batch_size * (prompt_len + generated) / min(singles)),
    }
    as_written = article_benchmark(model, batch_size=batch_size, seed=seed)
    tokens = ids.flatten().cpu()
    control = ((tokens < 32) | (tokens == 127)).float().mean().item()
    token_ids = {
        "control_fraction": control,
        "sample": ByteTokenizer().decode(ids[0, :48]),
        "note": ("Ids 0-99 are the bytes NUL..'c' for a byte-level model: about a third are control characters "
                 "and the rest a random jumble, not language. A dense model's decode step costs the same for "
                 "any ids (the same matmuls over the same shapes), so the speed is unaffected; a Mixture-of-"
                 "Experts routes by token, so its expert load would differ from real text (generation itself is "
                 "dropless whatever the capacity factor: capacity applies in training only), and only real text "
                 "shows what the model generates."),
    }
    return {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prompt_counting": prompt_counting, "single_run": single_run,
            "max_length": {"generated": as_written["generated"], "input_length": as_written["input_length"],
                           "max_length": as_written["max_length"],
                           "listing_tokens_per_s": as_written["throughput_tokens_per_s"],
                           "latency_s": as_written["latency_s"], "note": HF_MAX_LENGTH_NOTE},
            "token_ids": token_ids, "device": device_name(device)}


# -----------------------------------------------------------------------------
# The correct benchmark


@torch.inference_mode()
def _timed_greedy(model: MiniLM, prompt: torch.Tensor, new_tokens: int,
                  task_ids) -> tuple[torch.Tensor, float, float, int]:
    """Greedy generation with the KV cache, the prefill and the decode steps timed apart.

    The same computation as `MiniLM.generate(prompt, new_tokens)` with temperature 0: a cache sized for the
    whole sequence, one forward over the prompt whose last logits give the first token (timed, with the
    cache's allocation, as the time to first token), then one forward per further token (timed together).
    Returns (prompt + new tokens, prefill seconds, decode seconds, KV cache bytes at the end).
    """
    device = model.device
    with Timer(device) as prefill:
        cache = Cache(model, prompt.shape[0], prompt.shape[1] + new_tokens)
        logits = model(prompt, cache=cache, task_ids=task_ids, _checked=True).logits[:, -1, :].float()
        token = logits.argmax(dim=-1)
    tokens = [token]
    with Timer(device) as decode:
        for _ in range(new_tokens - 1):
            logits = model(token[:, None], cache=cache, task_ids=task_ids, _checked=True).logits[:, -1, :].float()
            token = logits.argmax(dim=-1)
            tokens.append(token)
    return torch.cat([prompt, torch.stack(tokens, dim=1)], dim=1), prefill.seconds, decode.seconds, cache.nbytes()


def benchmark(model: MiniLM, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 128, repeats: int = 5,
              warmup: int = 1, seed: int = 0, text: str | None = None) -> dict:
    """Time to first token, decode throughput and peak memory of greedy generation, measured correctly.

    The prompt is real text (`text_prompts`: held-out stdlib text unless `text` is given). After `warmup`
    untimed runs, each of `repeats` runs times its prefill (TTFT) and its decode steps apart with
    device.Timer; medians are reported with min and max. Only generated tokens count:
    decode_tokens_per_s = batch * (new_tokens - 1) / decode time (the first token belongs to the prefill),
    and e2e_tokens_per_s = batch * new_tokens / (TTFT + decode time). Peak memory is `PeakMemory` over the
    warm-up and timed runs (exact on CUDA; bounds on a CPU, see its docstring). `matches_generate` says the
    timed loop's tokens equal `model.generate`'s greedy output in every run. With new_tokens = 1 there is no
    decode step and the decode fields are None.
    """
    _check_sizes(model, batch_size, prompt_len, new_tokens)
    _check_int("repeats", repeats, 1)
    _check_int("warmup", warmup, 0)
    device = model.device
    if device.type == "cpu":
        tune_cpu_allocator()
    prompt, source = text_prompts(batch_size, prompt_len, model.config.vocab_size, seed, text)
    prompt = prompt.to(device)
    task_ids = model._check_task_ids(None, prompt)
    was_training = model.training
    model.eval()
    reference = model.generate(prompt, new_tokens)  # greedy, with the cache: what the timed loop must produce
    prefill, decode, matches = [], [], True
    with PeakMemory(device) as memory:
        for i in range(warmup + repeats):
            output, prefill_s, decode_s, kv_bytes = _timed_greedy(model, prompt, new_tokens, task_ids)
            matches = matches and bool(torch.equal(output, reference))
            if i >= warmup:
                prefill.append(prefill_s)
                decode.append(decode_s)
    model.train(was_training)

    steps = new_tokens - 1
    decode_tokens = batch_size * steps
    prefill_s, decode_s = statistics.median(prefill), statistics.median(decode)
    weights = model.embed.weight
    row = {
        "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "prompt_source": source,
        "ttft_ms": prefill_s * 1e3, "ttft_ms_min": min(prefill) * 1e3, "ttft_ms_max": max(prefill) * 1e3,
        "prefill_tokens_per_s": batch_size * prompt_len / prefill_s,
        "decode_tokens": decode_tokens, "generated_tokens": batch_size * new_tokens,
        "decode_s": decode_s if steps else None,
        "decode_ms_per_step": decode_s * 1e3 / steps if steps else None,
        "decode_tokens_per_s": decode_tokens / decode_s if steps else None,
        "decode_tokens_per_s_min": decode_tokens / max(decode) if steps else None,
        "decode_tokens_per_s_max": decode_tokens / min(decode) if steps else None,
        "e2e_tokens_per_s": batch_size * new_tokens / (prefill_s + decode_s),
        "matches_generate": matches,
        "kv_cache_bytes": kv_bytes,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "peak_mem_bytes": memory.peak_bytes, "run_mem_bytes": memory.run_bytes, "mem_method": memory.method,
        "dtype": str(weights.dtype).replace("torch.", ""), "device": device_name(device),
        "note": "",
    }
    return row


def sweep(model: MiniLM, batch_sizes=(1, 2, 4, 8), prompt_lens=(16, 32, 64, 96), new_tokens=(32,), repeats: int = 3,
          warmup: int = 1, seed: int = 0, text: str | None = None) -> list[dict]:
    """`benchmark` over a grid; a combination longer than the context becomes a row marked skipped, with a note."""
    context = model.config.max_seq_len
    rows = []
    for n in new_tokens:
        for p in prompt_lens:
            for b in batch_sizes:
                if p + n > context:
                    rows.append({"batch_size": b, "prompt_len": p, "new_tokens": n, "skipped": True,
                                 "note": f"skipped: {p} + {n} tokens exceed the context ({context})"})
                    continue
                row = benchmark(model, b, p, n, repeats=repeats, warmup=warmup, seed=seed, text=text)
                rows.append({**row, "skipped": False})
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rows_table(rows: list[dict]) -> str:
    """Markdown table of `benchmark` / `sweep` rows (skipped rows keep their sizes and note)."""
    columns = {"batch_size": "batch:", "prompt_len": "prompt:", "new_tokens": "new:", "ttft": "TTFT ms:",
               "decode": "decode tok/s:", "spread": "decode min-max:", "step": "ms/step:",
               "mem": "peak mem MB:", "run_mem": "run mem MB:", "kv": "KV cache KB:", "ok": "= generate",
               "note": "note"}
    table = []
    for row in rows:
        measured = not row.get("skipped") and "ttft_ms" in row
        mb = 2.0 ** 20
        table.append({
            "batch_size": str(row["batch_size"]), "prompt_len": str(row["prompt_len"]),
            "new_tokens": str(row["new_tokens"]),
            "ttft": _fmt(row["ttft_ms"], ".2f") if measured else "-",
            "decode": _fmt(row["decode_tokens_per_s"], ",.0f") if measured else "-",
            "spread": (f"{_fmt(row['decode_tokens_per_s_min'], ',.0f')}-{_fmt(row['decode_tokens_per_s_max'], ',.0f')}"
                       if measured and row["decode_tokens_per_s"] else "-"),
            "step": _fmt(row["decode_ms_per_step"], ".2f") if measured else "-",
            "mem": _fmt(row["peak_mem_bytes"] / mb, ",.1f") if measured and row["peak_mem_bytes"] else "-",
            "run_mem": (_fmt(row["run_mem_bytes"] / mb, ",.1f")
                        if measured and row["run_mem_bytes"] is not None else "-"),
            "kv": _fmt(row["kv_cache_bytes"] / 1024, ",.1f") if measured else "-",
            "ok": ("yes" if row["matches_generate"] else "NO") if measured else "-",
            "note": row.get("note", ""),
        })
    return markdown_table(table, columns)


# -----------------------------------------------------------------------------
# The reference run and its goals


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """KV cache bytes one token occupies in all layers, read off the attention's own cache class.

    Builds one layer of cfg's attention, asks it for a one-position cache and counts that position's bytes
    (`nbytes`), times n_layers: a check on the formula of `attention.kv_cache_bytes_per_token`.
    """
    cls = MultiHeadLatentAttention if cfg.attention == "mla" else CausalSelfAttention
    cache = cls(cfg).new_cache(1, 1, "cpu", dtype)
    cache.length = 1
    return cache.nbytes() * cfg.n_layers


def mla_config(cfg: ModelConfig) -> ModelConfig:
    """cfg with latent attention instead of MHA, at equal d_model and n_heads, MLA sizes at their defaults."""
    fields = cfg.to_dict()
    fields.update(attention="mla", n_kv_heads=None, qk_norm=False, q_lora_rank=None, kv_lora_rank=None,
                  qk_nope_head_dim=None, qk_rope_head_dim=None, v_head_dim=None)
    return ModelConfig.from_dict(fields)


def _goal_row(name: str, measured: float | None, detail: str, key: str | None = None) -> dict:
    """One ratio against its goal in REFERENCE_GOALS (looked up by `key`, default the name; none: goal None)."""
    goal, op = REFERENCE_GOALS.get(key or name, (None, None))
    met = None if goal is None or measured is None else (measured >= goal if op == ">=" else measured <= goal)
    return {"name": name, "measured": measured, "goal": goal, "op": op, "met": met, "detail": detail}


def reference_goals(device="cpu", repeats: int = 3, config: ModelConfig | None = None, prompt_len: int = 128,
                    new_tokens: int = 128, large_batch: int = 8, seed: int = 0, text: str | None = None) -> dict:
    """The benchmark's reference run: what the KV cache, batching, bf16 and MLA buy at decode time.

    On `config` (default bench.BENCH_MODEL: 6 layers, 384 wide, random weights, which time like trained ones),
    prompt_len and new_tokens (128 each), at batch 1 and `large_batch` (8):

        kv_cache_speedup_b1 / _b8      uncached / cached greedy generation time (bench.bench_decode)
        decode_throughput_b8_over_b1   decode tokens/s at batch 8 / at batch 1 (`benchmark`, prefill excluded)
        bf16_over_fp32_decode_b1       decode tokens/s with bf16 weights / fp32 at batch 1 (no goal: on a CPU it
                                       depends on bf16 matmul support; on a GPU it roughly halves the bytes read)
        mla_over_mha_cache_bytes       KV cache bytes per token, MLA / MHA at equal d_model and n_heads

    Every ratio divides two numbers measured in this process, one after the other; a busy machine can still
    move one more than the other, so each row keeps both numbers. Returns {"rows": [{name, measured, goal,
    op, met, detail}], "all_met", "details", ...}; rows without a goal have goal and met None. The goals are
    stated for batch 8; another `large_batch` is checked against them too, and its rows are named by it.
    """
    device = resolve_device(device)
    config = config or BENCH_MODEL
    _check_int("large_batch", large_batch, 2)
    torch.manual_seed(seed)
    model = MiniLM(config).to(device).eval()
    _check_sizes(model, large_batch, prompt_len, new_tokens)
    details = {}
    rows = []
    for b, key in ((1, "kv_cache_speedup_b1"), (large_batch, "kv_cache_speedup_b8")):
        d = bench_decode(model, b, prompt_len, new_tokens, repeats=repeats, seed=seed)
        details[f"bench_decode_b{b}"] = d
        rows.append(_goal_row(f"kv_cache_speedup_b{b}", d["speedup"],
                              f"uncached {d['uncached_s']:.3f} s / cached {d['cached_s']:.3f} s"
                              f"{'' if d['same_tokens'] else ' (tokens differ!)'}", key))
    small = benchmark(model, 1, prompt_len, new_tokens, repeats=repeats, seed=seed, text=text)
    large = benchmark(model, large_batch, prompt_len, new_tokens, repeats=repeats, seed=seed, text=text)
    details["benchmark_b1"], details[f"benchmark_b{large_batch}"] = small, large
    ratio = large["decode_tokens_per_s"] / small["decode_tokens_per_s"] if small["decode_tokens_per_s"] else None
    rows.append(_goal_row(f"decode_throughput_b{large_batch}_over_b1", ratio,
                          f"{large['decode_tokens_per_s']:,.0f} / {small['decode_tokens_per_s']:,.0f} tokens/s"
                          if ratio else "no decode step", "decode_throughput_b8_over_b1"))
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16 = benchmark(bf16_model, 1, prompt_len, new_tokens, repeats=repeats, seed=seed, text=text)
    del bf16_model
    details["benchmark_b1_bf16"] = bf16
    ratio = bf16["decode_tokens_per_s"] / small["decode_tokens_per_s"] if small["decode_tokens_per_s"] else None
    rows.append(_goal_row("bf16_over_fp32_decode_b1", ratio,
                          f"{bf16['decode_tokens_per_s']:,.0f} / {small['decode_tokens_per_s']:,.0f} tokens/s"
                          if ratio else "no decode step"))
    mla = mla_config(config)
    mha_bytes, mla_bytes = kv_cache_bytes_per_token(config), kv_cache_bytes_per_token(mla)
    details["cache_bytes"] = {"mha_formula": mha_bytes, "mla_formula": mla_bytes,
                              "mha_cache_class": cache_bytes_per_token(config),
                              "mla_cache_class": cache_bytes_per_token(mla),
                              "kv_lora_rank": mla.kv_lora_rank, "qk_rope_head_dim": mla.qk_rope_head_dim}
    rows.append(_goal_row("mla_over_mha_cache_bytes", mla_bytes / mha_bytes,
                          f"MLA {mla_bytes:,} / MHA {mha_bytes:,} bytes per token (fp32, all layers)"))
    goals = [r["met"] for r in rows if r["met"] is not None]
    return {"rows": rows, "all_met": all(goals), "details": details, "device": device_name(device),
            "config": config.to_dict(), "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats}


def goals_table(result: dict) -> str:
    """Markdown table of `reference_goals` rows."""
    rows = [{"name": r["name"], "measured": _fmt(r["measured"], ".3g"),
             "goal": "-" if r["goal"] is None else f"{r['op']} {r['goal']:g}",
             "met": "-" if r["met"] is None else ("yes" if r["met"] else "no"), "detail": r["detail"]}
            for r in result["rows"]]
    return markdown_table(rows, {"name": "ratio", "measured": "measured:", "goal": "goal", "met": "met",
                                 "detail": "from"})
