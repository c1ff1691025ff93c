"""Data parallelism, the production path: DistributedDataParallel through accelerate, checked and measured.

`minimoe train --nproc N` runs train() on N processes: each draws its own batches, and DDP averages the
gradients with all-reduce before every optimizer step, so N processes with batch B train like one process
with batch N * B. The functions below run inside each rank (through minimoe.parallel.launch.run) to show it:

* verify: one DDP step on half a batch per rank equals one single-process step on the whole batch;
* allreduce_volume: the bytes DDP's all-reduce moves per step, counted through a DDP communication hook,
  against the ring formula 2 (n - 1) / n * (gradient bytes);
* overlap: DDP starts all-reducing a bucket of gradients as soon as backward has produced it, while backward
  goes on (Li et al. 2020, "PyTorch Distributed"). We time a step that way and a step that waits for the
  whole backward before all-reducing, on the same model and data.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..model import MiniLM
from . import launch
from .comm import count_collectives, wire_cost


def _batch(cfg: ModelConfig, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _counting_allreduce(state, bucket):
    """A DDP communication hook: average the bucket with dist.all_reduce, so count_collectives sees it."""
    buf = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])


def verify(config: dict, batch: int = 4, seq: int = 16, seed: int = 0, zero: bool = False,
           lr: float = 1e-3) -> dict:
    """Inside each rank: DDP (through accelerate) on this rank's share of a fixed batch vs one process on all
    of it. Returns the losses, the largest gradient difference, the loss after one AdamW step (ZeRO-1 with
    zero=True) and the all-reduce bytes counted against the ring formula."""
    from accelerate import Accelerator
    from ..train import TrainConfig, make_optimizer

    cfg = ModelConfig.from_dict(config)
    world, rank = dist.get_world_size(), dist.get_rank()
    if batch % world:
        raise ValueError(f"batch={batch} is not divisible by the {world} processes")
    device = launch.device()
    x, y = (t.to(device) for t in _batch(cfg, batch, seq, seed))
    torch.manual_seed(seed)
    single = MiniLM(cfg).to(device)
    torch.manual_seed(seed)
    model = MiniLM(cfg).to(device)

    out = single(x, targets=y)
    (out.loss + out.aux_loss).backward()
    tc = TrainConfig(lr=lr, zero=False, warmup_steps=0, device=device.type)
    opt_single = make_optimizer(single, tc)

    acc = Accelerator(cpu=device.type == "cpu")
    assert acc.num_processes == world, "accelerate did not join the process group"
    opt = make_optimizer(model, TrainConfig(lr=lr, zero=zero, warmup_steps=0, device=device.type))
    ddp = acc.prepare(model)
    ddp.register_comm_hook(None, _counting_allreduce)
    share = slice(rank * batch // world, (rank + 1) * batch // world)
    with count_collectives() as log:
        o = ddp(x[share], targets=y[share])
        acc.backward(o.loss + o.aux_loss)
    loss = o.loss.detach().clone()
    dist.all_reduce(loss)
    grad_diff = max((p.grad - q.grad).abs().max().item()
                    for p, q in zip(model.parameters(), single.parameters()) if q.grad is not None)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    opt.step()
    opt_single.step()
    with torch.no_grad():
        next_single = float(single(x, targets=y).loss)
        next_ddp = float(model(x, targets=y).loss)
    return {"loss_single": out.loss.item(), "loss_ddp": loss.item() / world, "max_grad_diff": grad_diff,
            "next_loss_single": next_single, "next_loss_ddp": next_ddp,
            "allreduce_bytes": log.by_op().get("all_reduce", 0.0), "allreduce_calls": log.count("all_reduce"),
            "expected_bytes": wire_cost("all_reduce", grad_bytes, world), "grad_bytes": grad_bytes,
            "optimizer": type(opt).__name__}


def overlap(config: dict, batch: int = 8, seq: int = 128, steps: int = 6, bucket_mb: float = 1.0) -> dict:
    """Inside each rank: median seconds of forward + backward + gradient all-reduce, two ways.

    overlapped: plain DDP, buckets of `bucket_mb` MB all-reduced while backward continues;
    sequential: the same DDP model under no_sync() (no communication during backward), then one all-reduce
    per gradient tensor after backward has finished.
    Returns both medians and backward alone (no communication at all), so the saving can be compared with
    the communication time it could hide.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = ModelConfig.from_dict(config)
    world = dist.get_world_size()
    device = launch.device()
    torch.manual_seed(0)
    model = MiniLM(cfg).to(device)
    ddp = DDP(model, bucket_cap_mb=bucket_mb)
    x, y = (t.to(device) for t in _batch(cfg, batch, seq, dist.get_rank()))

    def overlapped():
        ddp(x, targets=y).loss.backward()

    def backward_only():
        with ddp.no_sync():
            ddp(x, targets=y).loss.backward()

    def sequential():
        backward_only()
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)

    def median(fn):
        times = []
        for i in range(steps + 1):
            model.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return {"overlapped_s": median(overlapped), "sequential_s": median(sequential),
            "backward_only_s": median(backward_only), "params": model.num_parameters(), "world": world}
