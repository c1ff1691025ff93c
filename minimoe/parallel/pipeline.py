"""Pipeline parallelism: each rank holds a contiguous slice of the layers, and micro-batches flow through them.

A model that does not fit on one device can be cut by depth into p stages, one per rank. Stage r receives
the hidden states of stage r - 1 (``dist.recv``), runs its layers and sends its output to stage r + 1
(``dist.send``); the backward pass sends the gradient of each stage's input back the same way. Stage 0 owns
the embedding, the last stage the final norm, the vocabulary head and the loss. Here the whole world is one
pipeline: rank r is stage r (no data or tensor parallelism beside it).

With one batch in flight only one stage would work at a time. So the batch is cut into m micro-batches, and
the stages work on different micro-batches at once. Two classic orders of work (p = 2, m = 4):

                GPipe                              1F1B
    stage 0:  F0 F1 F2 F3 B0 B1 B2 B3          F0 F1 B0 F2 B1 F3 B2 B3
    stage 1:  F0 F1 F2 F3 B0 B1 B2 B3          F0 B0 F1 B1 F2 B2 F3 B3

* GPipe (Huang et al., 2019): every stage runs the forwards of all m micro-batches, then all the backwards.
  Simple, but each stage holds the activations of all m micro-batches until its first backward.
* 1F1B, "PipeDream-Flush" (Narayanan et al., 2019 and 2021): stage r runs p - r - 1 warm-up forwards, then
  alternates one forward and one backward, then drains the backwards left. A backward frees its
  micro-batch's activations, so stage r never holds more than p - r micro-batches, however large m is.

Both are synchronous (one optimizer step per batch, the same gradients as one process) and both leave the
same idle time, the "bubble": with equal time per micro-batch on every stage, the pipeline takes m + p - 1
slots of forward + backward, of which each stage is busy for m, so a fraction (p - 1) / (m + p - 1) is idle
(`ideal_bubble`). More micro-batches shrink it; 1F1B is what makes many micro-batches affordable in memory.

The loss is the single-process loss: the last stage divides each micro-batch's summed cross-entropy by the
number of target tokens in the whole batch, so the micro-batch losses add up to the mean over all tokens, and
their gradients accumulate (in ``.grad``) to the gradient of the whole batch. Callers zero the gradients.

Traffic per step: each of the p - 1 stage boundaries carries, per micro-batch, one activation forward and one
gradient back, micro_batch x seq x d_model numbers each. It does not grow with the parameters, which is why
the pipeline axis can take the slowest links (between nodes).

Deadlocks: a blocking send may wait until its peer receives. In 1F1B's steady state a stage sends its output
forward and needs a gradient back from the same neighbour, while that neighbour sends a gradient and needs the
next input. If both sent first, both could wait forever. Here every exchange between neighbours is ordered the
same way on both sides: the lower rank sends first, then receives; the higher rank receives, then sends
(Megatron-LM orders its point-to-point operations by rank parity for the same reason).

Tied embeddings (``tie_embeddings=True``): stage 0's embedding and the last stage's head are copies of one
matrix; their gradients are summed by an all_reduce between the two stages after the backwards (Megatron-LM's
"embedding group"), so both copies take the same optimizer step.

Mixture-of-Experts models are not supported here: their balancing losses are nonlinear in the batch, so the
micro-batches' losses would not add up to the full batch's (see `PipelineStage.from_model`).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import MiniLM
from . import launch
from .comm import count_collectives
from .plan import ParallelPlan


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """The layers of each stage: contiguous and balanced (the first n_layers % n_stages stages get one more)."""
    ParallelPlan(pp=n_stages).validate(n_stages, n_layers=n_layers)
    base, extra = divmod(n_layers, n_stages)
    sizes = [base + (r < extra) for r in range(n_stages)]
    starts = [sum(sizes[:r]) for r in range(n_stages)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


class PipelineStage(nn.Module):
    """A contiguous slice of a MiniLM. Parameter names match the full model's ("blocks.2.attn.qkv.weight")."""

    def __init__(self, config: ModelConfig, rank: int, n_stages: int, blocks: dict, embed=None, norm=None,
                 lm_head=None):
        super().__init__()
        self.config, self.rank, self.n_stages = config, rank, n_stages
        self.embed = embed                                                 # stage 0 only
        self.blocks = nn.ModuleDict({str(i): b for i, b in blocks.items()})
        self.norm, self.lm_head = norm, lm_head                            # last stage only

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.n_stages - 1

    @classmethod
    def from_model(cls, model: MiniLM, rank: int, n_stages: int) -> "PipelineStage":
        """Stage `rank` of `n_stages`: a copy of its layers of `model` (a single-process MiniLM)."""
        cfg = model.config
        if cfg.n_experts:
            raise NotImplementedError(
                "pipeline stages of Mixture-of-Experts models are not supported: the balancing losses "
                "(aux_loss) are nonlinear in the batch, so per-micro-batch losses would not add up to the "
                "full batch's; use a dense config (n_experts=0)")
        layers = stage_layers(cfg.n_layers, n_stages)
        if not isinstance(rank, int) or not 0 <= rank < n_stages:
            raise ValueError(f"rank must be an integer in [0, n_stages={n_stages}), got {rank!r}")
        first, last = rank == 0, rank == n_stages - 1
        # one deepcopy for all parts keeps a tied embedding/head tied when a single stage holds both
        embed, blocks, norm, head = copy.deepcopy([model.embed if first else None,
                                                   [model.blocks[i] for i in layers[rank]],
                                                   model.norm if last else None, model.lm_head if last else None])
        return cls(cfg, rank, n_stages, dict(zip(layers[rank], blocks)), embed, norm, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 0 takes token ids [batch, seq]; the others take hidden states [batch, seq, d_model].
        The last stage returns float logits [batch, seq, vocab], the others hidden states."""
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks.values():
            x = block(x)
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x)).float()
        return x


class _Run:
    """The state of one schedule on one stage: activations held, timeline, loss; and the point-to-point moves.

    Every move is a no-op where there is no neighbour (before stage 0, after the last stage)."""

    def __init__(self, stage: PipelineStage, micro_batches: list, targets: list | None):
        self.stage, self.micro_batches, self.targets = stage, micro_batches, targets
        self.rank, self.p = stage.rank, stage.n_stages
        if self.p > 1 and (not dist.is_initialized() or dist.get_world_size() != self.p):
            raise RuntimeError(f"a {self.p}-stage pipeline needs torch.distributed with world size {self.p}")
        if stage.is_last and (targets is None or len(targets) != len(micro_batches)):
            raise ValueError("the last stage needs one targets tensor per micro-batch")
        param = next(stage.parameters())
        self.device, self.dtype = param.device, param.dtype
        b, t = micro_batches[0].shape[:2]
        if any(mb.shape[:2] != (b, t) for mb in micro_batches):
            raise ValueError("micro-batches must all have the same shape")
        self.shape = (b, t, stage.config.d_model)     # what crosses every stage boundary
        if stage.is_last:  # the whole batch's target count: micro-batch losses then add up to its mean
            self.n_tokens = sum(int((y != -100).sum()) for y in targets)
        self.held = {}     # micro-batch -> (input, output) kept for its backward
        self.peak = 0
        self.timeline = []
        self.loss = torch.zeros((), device=self.device)
        if dist.is_initialized():
            dist.barrier()  # line up the ranks' clocks: every t0 is taken just after the same barrier
        self.t0 = time.perf_counter()

    # ---- compute ----------------------------------------------------------------------------------------
    def forward(self, i: int, x: torch.Tensor | None) -> torch.Tensor:
        """Forward of micro-batch i on this stage; returns what goes to the next stage (the loss on the last)."""
        if self.stage.is_first:
            x = self.micro_batches[i].to(self.device)
        else:
            x.requires_grad_()  # a leaf of this stage's graph: its .grad is what we send back
        start = time.perf_counter()
        y = self.stage(x)
        if self.stage.is_last:
            y = F.cross_entropy(y.flatten(0, 1), self.targets[i].to(self.device).flatten(), ignore_index=-100,
                                reduction="sum") / self.n_tokens
            self.loss += y.detach()
        self._record("F", i, start)
        self.held[i] = (x, y)
        self.peak = max(self.peak, len(self.held))
        return y.detach()

    def backward(self, i: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Backward of micro-batch i from the gradient of its output; returns the gradient of its input."""
        x, y = self.held.pop(i)  # dropping the pair frees the activations
        start = time.perf_counter()
        torch.autograd.backward(y, None if self.stage.is_last else grad)
        self._record("B", i, start)
        return None if self.stage.is_first else x.grad

    def _record(self, kind: str, i: int, start: float):
        self.timeline.append((kind, i, start - self.t0, time.perf_counter() - self.t0))

    # ---- point to point -------------------------------------------------------------------------------
    def _recv(self, peer: int) -> torch.Tensor:
        buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        dist.recv(buf, peer)
        return buf

    def _exchange(self, t: torch.Tensor, peer: int) -> torch.Tensor:
        """Send t to a neighbour and receive a tensor from it; the lower rank sends first (no deadlock)."""
        if self.rank < peer:
            dist.send(t.contiguous(), peer)
            return self._recv(peer)
        buf = self._recv(peer)
        dist.send(t.contiguous(), peer)
        return buf

    def recv_forward(self):
        return None if self.stage.is_first else self._recv(self.rank - 1)

    def send_forward(self, y):
        if not self.stage.is_last:
            dist.send(y.contiguous(), self.rank + 1)

    def recv_backward(self):
        return None if self.stage.is_last else self._recv(self.rank + 1)

    def send_backward(self, g):
        if not self.stage.is_first:
            dist.send(g.contiguous(), self.rank - 1)

    def send_forward_recv_backward(self, y):
        return None if self.stage.is_last else self._exchange(y, self.rank + 1)

    def send_backward_recv_forward(self, g):
        return None if self.stage.is_first else self._exchange(g, self.rank - 1)

    # ---- end of the step ----------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Sum a tied embedding's two gradients; give every rank the loss; return the step's record."""
        stage = self.stage
        if stage.config.tie_embeddings and self.p > 1:
            group = _embedding_group(self.p)  # every rank joins new_group, only the two ends use it
            if stage.is_first or stage.is_last:
                weight = stage.embed.weight if stage.is_first else stage.lm_head.weight
                dist.all_reduce(weight.grad, group=group)
        if self.p > 1:
            dist.broadcast(self.loss, src=self.p - 1)
        return {"loss": float(self.loss), "timeline": self.timeline, "peak_activations": self.peak}


_GROUPS: dict = {}


def _embedding_group(p: int):
    """The process group {stage 0, last stage}, made once per default group (collective: all ranks call it)."""
    key = (id(dist.group.WORLD), p)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group([0, p - 1])
    return _GROUPS[key]


# ---- the two schedules --------------------------------------------------------------------------------------


def gpipe(stage: PipelineStage, micro_batches: list, targets: list | None = None) -> dict:
    """GPipe: the forwards of all micro-batches, then all their backwards; gradients accumulate in .grad.

    micro_batches: the same list of equal-shape token-id tensors on every rank (stage 0 reads the values, the
    other stages only the shape); targets: the matching targets (needed on the last stage, -100 = ignore).
    Returns {"loss": the batch's mean loss on every rank, "timeline": [(kind, micro_batch, start, end)] in
    seconds after a common start, "peak_activations": most micro-batches held at once (here m)}.
    """
    run = _Run(stage, micro_batches, targets)
    for i in range(len(micro_batches)):
        run.send_forward(run.forward(i, run.recv_forward()))
    for i in range(len(micro_batches)):
        run.send_backward(run.backward(i, run.recv_backward()))
    return run.finish()


def one_f_one_b(stage: PipelineStage, micro_batches: list, targets: list | None = None) -> dict:
    """1F1B (PipeDream-Flush): warm-up forwards, then one forward + one backward at a time, then the backwards.

    Stage r runs min(p - r - 1, m) forwards ahead, so that when the last stage starts its first backward
    every stage has work; each steady step then does a forward of a new micro-batch and the backward of the
    oldest one it holds. Same arguments and result as `gpipe`; peak_activations is min(p - r, m).
    """
    run = _Run(stage, micro_batches, targets)
    m = len(micro_batches)
    warmup = min(run.p - run.rank - 1, m)
    for i in range(warmup):
        run.send_forward(run.forward(i, run.recv_forward()))
    x = run.recv_forward() if warmup < m else None
    for k in range(m - warmup):           # steady state: forward of micro-batch warmup + k, backward of k
        y = run.forward(warmup + k, x)
        grad = run.send_forward_recv_backward(y)
        dx = run.backward(k, grad)
        if k == m - warmup - 1:
            run.send_backward(dx)
        else:
            x = run.send_backward_recv_forward(dx)
    for i in range(m - warmup, m):       # cool-down: the backwards of the warm-up micro-batches
        run.send_backward(run.backward(i, run.recv_backward()))
    return run.finish()


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


# ---- the bubble -------------------------------------------------------------------------------------------


def ideal_bubble(p: int, m: int) -> float:
    """Idle fraction of a p-stage pipeline over m micro-batches of equal cost: (p - 1) / (m + p - 1)."""
    if p < 1 or m < 1:
        raise ValueError(f"p and m must be >= 1, got p={p}, m={m}")
    return (p - 1) / (m + p - 1)


def bubble_fraction(timelines: list[list]) -> float:
    """Measured idle fraction: 1 - (compute time summed over stages) / (n_stages x makespan).

    timelines: one list of (kind, micro_batch, start, end) per stage, on a common clock (as the schedules
    return them); the makespan runs from the earliest start to the latest end over all stages."""
    spans = [(s, e) for timeline in timelines for _, _, s, e in timeline]
    makespan = max(e for _, e in spans) - min(s for s, _ in spans)
    busy = sum(e - s for s, e in spans)
    return 1.0 - busy / (len(timelines) * makespan)


def plot_timeline(timelines: list[list], ax=None, title: str | None = None):
    """Gantt chart: one row per stage, a box per forward (blue) and backward (orange), labelled by micro-batch."""
    import matplotlib.pyplot as plt
    ax = ax if ax is not None else plt.subplots(figsize=(8, 0.6 + 0.5 * len(timelines)))[1]
    t0 = min(s for timeline in timelines for _, _, s, _ in timeline)
    colors = {"F": "tab:blue", "B": "tab:orange"}
    for r, timeline in enumerate(timelines):
        for kind, i, s, e in timeline:
            left, width = (s - t0) * 1e3, (e - s) * 1e3
            ax.barh(r, width, left=left, height=0.8, color=colors[kind], edgecolor="black", linewidth=0.5)
            ax.text(left + width / 2, r, f"{kind}{i}", ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(timelines)), [f"stage {r}" for r in range(len(timelines))])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title if title is not None else f"measured bubble {bubble_fraction(timelines):.0%}")
    return ax


# ---- the check against one process --------------------------------------------------------------------------


def _rank_setup(config_dict: dict, schedule: str, seed: int):
    """Inside a rank: check the schedule name, build the same-seed MiniLM on this rank's device and its stage.
    Returns (rank, n_stages, config, device, model, stage)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    rank, p = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig.from_dict(config_dict)
    device = launch.device()
    torch.manual_seed(seed)
    model = MiniLM(cfg).to(device)
    return rank, p, cfg, device, model, PipelineStage.from_model(model, rank, p)


def verify(config_dict: dict, n_micro: int = 4, schedule: str = "1f1b", seed: int = 0, micro_batch_size: int = 2,
           lr: float = 0.1) -> dict:
    """Run inside every rank (launch.run(verify, p, config)): the pipeline against the single-process model.

    Every rank builds the same-seed MiniLM and its own stage of it, runs `schedule` on a fixed batch of
    n_micro x micro_batch_size sequences, and compares with loss.backward() of the whole model on the whole
    batch: the loss, this stage's parameter gradients, and the loss after one SGD step on both. It counts the
    point-to-point bytes this rank sent and the textbook's prediction for them.
    """
    rank, p, cfg, device, model, stage = _rank_setup(config_dict, schedule, seed)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (n_micro * micro_batch_size, cfg.max_seq_len + 1), generator=gen)
    x, y = data[:, :-1].to(device), data[:, 1:].to(device)
    micro_batches, targets = list(x.chunk(n_micro)), list(y.chunk(n_micro))
    run = SCHEDULES[schedule]

    with count_collectives() as log:
        out = run(stage, micro_batches, targets)
    ref = model(x, y)
    (ref.loss + ref.aux_loss).backward()  # the training objective (aux_loss is 0 for a dense model)
    full = dict(model.named_parameters(remove_duplicate=False))
    grad_err = max(float((q.grad - full[name].grad).abs().max()) for name, q in stage.named_parameters())

    torch.optim.SGD(model.parameters(), lr=lr).step()
    torch.optim.SGD(stage.parameters(), lr=lr).step()
    stage.zero_grad()
    next_loss = run(stage, micro_batches, targets)["loss"]
    with torch.no_grad():
        ref_next = float(model(x, y).loss)

    by_op = log.by_op()
    boundary = micro_batch_size * cfg.max_seq_len * cfg.d_model * next(stage.parameters()).element_size()
    return {"rank": rank, "n_stages": p, "n_micro": n_micro, "schedule": schedule,
            "layers": [int(i) for i in stage.blocks.keys()],
            "loss": out["loss"], "ref_loss": float(ref.loss.detach()),
            "loss_err": abs(out["loss"] - float(ref.loss.detach())),
            "grad_err": grad_err, "n_params_checked": sum(1 for _ in stage.parameters()),
            "next_loss": next_loss, "ref_next_loss": ref_next, "next_loss_err": abs(next_loss - ref_next),
            "p2p_bytes": by_op.get("send", 0.0) + by_op.get("isend", 0.0),
            # textbook: per micro-batch, an activation to the next stage and a gradient to the previous one
            "predicted_p2p_bytes": n_micro * boundary * ((rank < p - 1) + (rank > 0)),
            "predicted_total_p2p_bytes": 2 * n_micro * (p - 1) * boundary,
            "comm_by_op": by_op, "timeline": out["timeline"], "peak_activations": out["peak_activations"]}


def measure_bubble(config_dict: dict, micro_counts=(1, 2, 4, 8), schedule: str = "1f1b", micro_batch_size: int = 4,
                   repeats: int = 3, seed: int = 0) -> dict:
    """Run inside every rank: the measured bubble of `schedule` for each number of micro-batches m.

    The batch per step is m x micro_batch_size sequences. Each m runs `repeats` times after one warm-up; the
    repeat with the smallest bubble is kept (a shared CPU adds idle time that is not the schedule's).
    Returns {m: bubble} and the kept timelines of every stage for each m (gathered from all ranks)."""
    rank, p, cfg, device, _, stage = _rank_setup(config_dict, schedule, seed)
    gen = torch.Generator().manual_seed(seed)
    bubbles, timelines = {}, {}
    for m in micro_counts:
        data = torch.randint(0, cfg.vocab_size, (m * micro_batch_size, cfg.max_seq_len + 1), generator=gen)
        micro = list(data[:, :-1].to(device).chunk(m))
        targets = list(data[:, 1:].to(device).chunk(m))
        best = None
        for i in range(repeats + 1):
            stage.zero_grad()
            mine = SCHEDULES[schedule](stage, micro, targets)["timeline"]
            everyone = [None] * p
            dist.all_gather_object(everyone, mine)
            b = bubble_fraction(everyone)
            if i and (best is None or b < best[0]):  # i = 0 warms up
                best = (b, everyone)
        bubbles[m], timelines[m] = best
    return {"bubble": bubbles, "timelines": timelines, "ideal": {m: ideal_bubble(p, m) for m in micro_counts}}
