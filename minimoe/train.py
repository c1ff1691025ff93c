"""The training loop: accelerate for devices and mixed precision, AdamW, warm-up + LR schedule,
gradient accumulation to a token batch, clipping, periodic validation, exact resume from checkpoints.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from . import data as data_lib
from .checkpoint import (CheckpointError, checkpoint_folder, load_checkpoint, load_training_state, restore_rng_state,
                         save_checkpoint)
from .config import ModelConfig
from .device import device_name, peak_flops, resolve_device, tune_cpu_allocator
from .model import MiniLM
from .moe import max_violation

# After a linear warm-up, every schedule ends at lr * min_lr_ratio on the last step (except "constant"):
# "cosine" is the article's "dynamic cosine", "linear" its linear decay, "step" three equal drops at the thirds
# of the decay, "exponential" a constant factor per step.
SCHEDULES = ("cosine", "linear", "step", "exponential", "constant")
PRECISIONS = ("fp32", "bf16")
DIST_TIMEOUT_S = 300  # seconds a collective may wait for a missing rank before the run fails


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 16               # sequences per micro-batch
    seq_len: int = 256
    batch_tokens: int | None = None    # tokens per optimizer step; None = batch_size * seq_len (no accumulation)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1          # final LR = lr * min_lr_ratio for the decaying schedules
    warmup_steps: int = 50
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    precision: str = "fp32"            # "bf16" = bf16 autocast, weights and optimizer stay fp32
    eval_every: int = 100
    eval_batches: int = 8
    domain_weights: dict | None = None  # e.g. {"code": 0.5, "prose": 0.5}; None = equal per domain
    mixture_temperature: float | None = None  # instead of weights: p(domain) ~ tokens ** (1 / T); T=1 natural
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int | None = None  # steps between checkpoints when an output folder is given
    processes: int | None = None       # data-parallel processes this run must have (checked at start); None = any
    zero: bool = False                 # ZeRO-1: shard AdamW's state across data-parallel processes

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.schedule in ("step", "exponential") and not self.min_lr_ratio > 0:
            raise ValueError(f"min_lr_ratio must be > 0 for the {self.schedule!r} schedule (it decays by a "
                             f"factor), got {self.min_lr_ratio!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.batch_tokens is not None:
            micro = self.batch_size * self.seq_len
            if self.batch_tokens < self.seq_len:
                raise ValueError(f"batch_tokens={self.batch_tokens} is smaller than one sequence "
                                 f"(seq_len={self.seq_len})")
            if self.batch_tokens % micro:
                raise ValueError(f"batch_tokens={self.batch_tokens} must be a positive multiple of "
                                 f"batch_size * seq_len = {micro}")
        if self.domain_weights is not None:
            data_lib.check_weights(self.domain_weights, "domain_weights")
        if self.mixture_temperature is not None:
            if self.domain_weights is not None:
                raise ValueError("give domain_weights or mixture_temperature, not both")
            if not (isinstance(self.mixture_temperature, (int, float)) and self.mixture_temperature > 0):
                raise ValueError(f"mixture_temperature must be > 0, got {self.mixture_temperature!r}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be a positive integer or None, got {self.checkpoint_every!r}")
        if self.processes is not None and (isinstance(self.processes, bool) or not isinstance(self.processes, int)
                                           or self.processes < 1):
            raise ValueError(f"processes must be a positive integer or None, got {self.processes!r}")

    @property
    def accumulation_steps(self) -> int:
        return 1 if self.batch_tokens is None else self.batch_tokens // (self.batch_size * self.seq_len)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.accumulation_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown train config field(s): {', '.join(unknown)}")
        return cls(**d)


@dataclass
class TrainResult:
    model: MiniLM
    history: dict = field(default_factory=lambda: {"train": [], "eval": []})
    checkpoint: Path | None = None


def make_scheduler(optimizer, cfg: TrainConfig):
    """Linear warm-up, then the named schedule, composed from torch.optim.lr_scheduler parts."""
    sched = torch.optim.lr_scheduler
    # the last optimizer step (index steps-1) is decay step steps-1-warmup: it must use lr * min_lr_ratio
    decay_steps = max(1, cfg.steps - cfg.warmup_steps - 1)
    if cfg.schedule == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=cfg.lr * cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        main = sched.LinearLR(optimizer, 1.0, cfg.min_lr_ratio, total_iters=decay_steps)
    elif cfg.schedule == "step":
        thirds = [max(1, round(k * decay_steps / 3)) for k in (1, 2, 3)]  # a repeated milestone drops twice
        main = sched.MultiStepLR(optimizer, milestones=thirds, gamma=cfg.min_lr_ratio ** (1 / 3))
    elif cfg.schedule == "exponential":
        main = sched.ExponentialLR(optimizer, gamma=cfg.min_lr_ratio ** (1 / decay_steps))
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if cfg.warmup_steps == 0:
        return main
    warmup = sched.LinearLR(optimizer, start_factor=1.0 / (cfg.warmup_steps + 1), end_factor=1.0,
                            total_iters=cfg.warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_steps])


def lr_schedule(cfg: TrainConfig) -> list[float]:
    """The learning rate each of cfg.steps optimizer steps uses, driven exactly as train() drives it."""
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg)
    out = []
    for _ in range(cfg.steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def make_optimizer(model: MiniLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm gains are not decayed), as in GPT-2/Llama practice.

    With cfg.zero and several processes: ZeRO stage 1 (Rajbhandari et al. 2020) through PyTorch's
    ZeroRedundancyOptimizer. Each process keeps AdamW's two moments for only its share of the parameters, steps
    those, and broadcasts the updated values, so optimizer memory per process falls by the number of processes.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    fused = device.type in ("cpu", "cuda")  # one kernel for the whole update instead of one per tensor
    if cfg.zero and torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.optim import ZeroRedundancyOptimizer
        zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW, lr=cfg.lr,
                                       betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, fused=fused)
        zero.add_param_group({"params": no_decay, "weight_decay": 0.0})
        return zero
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    device = resolve_device(cfg.device)
    mixed = "bf16" if cfg.precision == "bf16" else "no"
    state = AcceleratorState._shared_state
    # accelerate keeps one global state per process; a notebook that trains fp32 then bf16 in one process
    # must reset it. Only safe (and only done) when this is not a multi-process run.
    if state and state.get("_mixed_precision") not in (None, mixed) and state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state()
    # a rank that fails or hangs must stop the run in minutes, not after torch's default 30-minute timeout
    handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S))]
    return Accelerator(mixed_precision=mixed, cpu=device.type == "cpu", kwargs_handlers=handlers)


@torch.no_grad()
def evaluate(model: MiniLM, dataset: "data_lib.TokenDataset", batch_size: int = 16, seq_len: int = 256,
             max_batches: int | None = 8, domain: str | None = None, precision: str = "fp32") -> dict:
    """Mean next-token loss (nats) and bits per byte on deterministic held-out windows.

    For an MoE model also "max_vio": the global MaxVio of the whole evaluation (per-layer loads summed over
    all batches, MaxVio per layer, averaged over layers; arXiv 2408.15664's MaxVio_global), and
    "expert_load": those per-layer loads (assignments per expert).
    "loss_by_domain" is the same mean per domain. Task-routed models get each window's domain index as
    their task id.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tok = data_lib.ByteTokenizer()
    nats, n_targets, n_bytes = 0.0, 0, 0
    by_domain = {}  # domain -> [nats, targets]
    moes = model.moe_modules()
    loads = [0] * len(moes)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    for x, y, task in dataset.eval_batches(batch_size, seq_len, max_batches=max_batches, domain=domain,
                                           return_domains=True):
        x, y = x.to(device), y.to(device)
        with autocast:
            loss = model(x, targets=y, **_task_kwargs(model, task, device)).loss
        nats += float(loss) * y.numel()
        n_targets += y.numel()
        acc = by_domain.setdefault(dataset.domains[int(task[0])], [0.0, 0])  # a batch never mixes domains
        acc[0] += float(loss) * y.numel()
        acc[1] += y.numel()
        n_bytes += tok.count_bytes(y.flatten())
        loads = [load + moe.last_tokens_per_expert for load, moe in zip(loads, moes)]
    model.train(was_training)
    if n_targets == 0:
        raise ValueError("the validation set is too short for one evaluation window")
    out = {"loss": nats / n_targets, "bpb": nats / math.log(2) / max(n_bytes, 1), "tokens": n_targets,
           "loss_by_domain": {d: a / b for d, (a, b) in by_domain.items()}}
    if moes:
        out["max_vio"] = sum(max_violation(load) for load in loads) / len(loads)
        out["expert_load"] = [load.tolist() for load in loads]  # per MoE layer: assignments per expert
    return out


def _task_kwargs(model: MiniLM, domains: torch.Tensor, device) -> dict:
    """{"task_ids": domain indices} for task-routed models; {} for all others."""
    cfg = model.config
    if not (cfg.n_experts and cfg.router == "task"):
        return {}
    if int(domains.max()) >= cfg.n_tasks:
        raise ValueError(f"the data has more domains than the model has tasks (n_tasks={cfg.n_tasks}); "
                         "a task-routed model needs n_tasks >= the number of domains")
    return {"task_ids": domains.to(device)}


def train(model_config: ModelConfig, train_config: TrainConfig, *, data=None, out_dir: str | Path | None = None,
          resume: bool = False, stop_after: int | None = None, progress: bool = True,
          model: MiniLM | None = None) -> TrainResult:
    """Train a MiniLM.

    data: (train, validation) TokenDatasets; default: the built-in corpus (minimoe.data.builtin_splits()).
    out_dir: checkpoint folder, written every `checkpoint_every` steps and at the end.
    resume: continue from the checkpoint in out_dir (same losses as an uninterrupted run: model, optimizer,
        schedule, data-sampler RNG and every random generator, dropout's on the CPU or each GPU, are restored).
    stop_after: stop (and checkpoint) after this many optimizer steps, as if interrupted; for tests and demos.
    """
    cfg = train_config
    train_ds, val_ds = data if data is not None else data_lib.builtin_splits()
    torch.manual_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    if accelerator.device.type == "cpu":
        tune_cpu_allocator()
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.processes is not None and world != cfg.processes:
        raise RuntimeError(f"expected {cfg.processes} data-parallel processes, but this run has {world} "
                           "(on a CPU, `accelerate launch --cpu --num_processes N` starts one; use "
                           "`minimoe train --nproc N` or torchrun)")
    model = model if model is not None else MiniLM(model_config)
    model.to(accelerator.device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    # every data-parallel process draws its own batches; one process draws exactly what it always did
    rng = np.random.default_rng(cfg.seed if world == 1 else [cfg.seed, rank])
    weights = domain_probabilities(cfg, train_ds)
    history = {"train": [], "eval": [], "train_config": cfg.to_dict(), "mixture": weights,
               "domain_tokens": {d: 0 for d in train_ds.domains}}
    start = 0
    out_dir = Path(out_dir) if out_dir is not None else None
    if resume:
        if out_dir is None or not checkpoint_folder(out_dir).exists():
            raise CheckpointError(f"cannot resume: no checkpoint at {out_dir}")
        load_checkpoint(out_dir, device=accelerator.device, model=model)
        state, opt_state = load_training_state(out_dir)
        if world > 1:
            raise CheckpointError("resuming a multi-process run is not supported: each process's data stream "
                                  "would restart from the main process's; rerun it from the start")
        if state.get("train_config") != _comparable(cfg):
            raise CheckpointError(f"cannot resume {out_dir}: it was trained with a different TrainConfig")
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        missing = restore_rng_state(opt_state["rng"], accelerator.device)
        if missing and model.config.dropout > 0:
            warnings.warn(f"the random state of {', '.join(missing)} is not in the checkpoint {out_dir} (saved by an "
                          "older minimoe, which kept the CPU's only, or on a machine without that device): this "
                          "run's dropout masks, and so its losses, will not match an uninterrupted run's",
                          stacklevel=2)
        rng.bit_generator.state = state["data_rng"]
        history, start = state["history"], state["step"]
        history.setdefault("domain_tokens", {d: 0 for d in train_ds.domains})  # checkpoints before 0.2
        history.setdefault("mixture", weights)
    if hasattr(optimizer, "consolidate_state_dict"):  # ZeRO: accelerate's optimizer wrapper cannot hold it
        model = accelerator.prepare(model)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    base_seen = dict(history["domain_tokens"])  # tokens seen before this run (a resumed checkpoint's)
    seen = np.zeros(len(train_ds.domains), dtype=np.int64)  # tokens this process has drawn since

    def count_seen():  # collective: every process calls it
        total = torch.tensor(seen, dtype=torch.float64, device=accelerator.device)
        total = accelerator.reduce(total, "sum") if world > 1 else total
        history["domain_tokens"] = {d: base_seen.get(d, 0) + int(n) for d, n in zip(train_ds.domains, total.tolist())}

    def checkpoint(step):
        if out_dir is None:
            return
        count_seen()
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        if hasattr(inner, "consolidate_state_dict"):  # ZeRO: gather the shards on the main process first
            inner.consolidate_state_dict(to=0)
        if not accelerator.is_main_process:
            return
        state = {"step": step, "history": history, "data_rng": rng.bit_generator.state,
                 "train_config": _comparable(cfg)}
        save_checkpoint(out_dir, raw_model, optimizer=optimizer, scheduler=scheduler, trainer_state=state)

    def run_eval(step):
        r = evaluate(raw_model, val_ds, cfg.batch_size, cfg.seq_len, cfg.eval_batches, precision=cfg.precision)
        row = {"step": step, "val_loss": r["loss"], "val_bpb": r["bpb"], "val_loss_by_domain": r["loss_by_domain"]}
        if "max_vio" in r:
            row["val_max_vio"] = r["max_vio"]
        history["eval"].append(row)
        return r

    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="train", disable=not progress,
               unit="step", dynamic_ncols=True)
    model.train()
    task_routed = bool(raw_model.config.n_experts) and raw_model.config.router == "task"
    # "seconds" counts training only: evaluation and checkpoints are paused out of the clock
    seconds = history["train"][-1]["seconds"] if history["train"] else 0.0
    for step in bar:
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(cfg.accumulation_steps):
            x, y, dom = train_ds.sample_batch(cfg.batch_size, cfg.seq_len, rng, weights=weights, return_domains=True)
            seen += np.bincount(dom.numpy(), minlength=len(train_ds.domains)) * cfg.seq_len
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            kw = _task_kwargs(raw_model, dom, accelerator.device) if task_routed else {}
            last = micro == cfg.accumulation_steps - 1
            # between micro-batches there is nothing to all-reduce yet (matters under DDP)
            with nullcontext() if last else accelerator.no_sync(model):
                out = model(x, targets=y, **kw)
                loss = (out.loss + out.aux_loss) / cfg.accumulation_steps
                accelerator.backward(loss)
            loss_sum += float(out.loss.detach()) / cfg.accumulation_steps
        grad_norm = None
        if cfg.grad_clip is not None:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        routing = raw_model.finish_step()  # MoE: the step's load (MaxVio), and DeepSeek's bias update
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)
        seconds += time.perf_counter() - t0
        if world > 1:  # the logged loss is the mean over all processes' batches
            loss_sum = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean"))
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training diverged at step {step + 1}: loss = {loss_sum} "
                                     "(try a lower lr or more warm-up)")
        history["train"].append({"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                                 "tokens": (step + 1) * cfg.tokens_per_step * world,
                                 "seconds": seconds, **routing})
        postfix = {"loss": f"{loss_sum:.3f}", "lr": f"{lr:.2e}"}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            postfix["val_bpb"] = f"{run_eval(step + 1)['bpb']:.3f}"
        bar.set_postfix(postfix, refresh=False)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < end:
            checkpoint(step + 1)
    bar.close()
    count_seen()
    if history["train"]:
        # the first peak-FLOPs measurement of a process draws random matrices: not from the generators the
        # checkpoint below saves, or a run stopped here would resume from a state the uninterrupted one never had
        device = accelerator.device
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device],
                                   device_type="cuda" if device.type == "cpu" else device.type):
            history["throughput"] = throughput(raw_model, cfg, history, device, world)
    checkpoint(end)
    return TrainResult(model=raw_model, history=history, checkpoint=out_dir)


def domain_probabilities(cfg: TrainConfig, dataset: "data_lib.TokenDataset") -> dict[str, float]:
    """The probability of each domain of `dataset` under cfg's domain_weights or mixture_temperature."""
    if cfg.mixture_temperature is not None:
        return dataset.mixture_weights(cfg.mixture_temperature)
    if cfg.domain_weights is not None:
        unknown = sorted(set(cfg.domain_weights) - set(dataset.domains))
        if unknown:
            raise ValueError(f"domain_weights name unknown domain(s) {unknown}; the data has {dataset.domains}")
    p = dataset._probs(cfg.domain_weights)
    return {d: float(x) for d, x in zip(dataset.domains, p)}


def throughput(model: MiniLM, cfg: TrainConfig, history: dict, device: torch.device, processes: int = 1) -> dict:
    """Training tokens per second and model-FLOPs utilization (MFU) of a finished run.

    MFU = model FLOPs per second / peak FLOPs per second, with the model FLOPs of
    MiniLM.flops_per_token (6 per active weight per token, plus attention) and the peak from
    minimoe.device.peak_flops: the datasheet's dense peak for known GPUs, else the best matmul throughput
    measured here (for a CPU there is no honest datasheet number per thread count). With several processes
    the tokens are all processes' and the peak is one device's times the number of processes.
    """
    last = history["train"][-1]
    seconds = last["seconds"]
    tokens = last["tokens"]
    flops = model.flops_per_token(cfg.seq_len) * tokens
    peak, source = peak_flops(device, cfg.precision)
    peak, source = peak * processes, source + (f" x {processes} processes" if processes > 1 else "")
    return {"tokens_per_second": tokens / seconds, "model_flops_per_second": flops / seconds,
            "peak_flops": peak, "peak_source": source, "mfu": flops / seconds / peak,
            "device": device_name(device)}


def _comparable(cfg: TrainConfig) -> dict:
    """The TrainConfig fields that must match for a resume to continue the same run (device may change)."""
    d = cfg.to_dict()
    d.pop("device")
    return json.loads(json.dumps(d))
