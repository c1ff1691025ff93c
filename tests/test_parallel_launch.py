"""The multi-process launcher, communication accounting, parallel plans, and data parallelism (DDP through
accelerate, ZeRO-1, `minimoe train --nproc`), each against the single-process result."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from minimoe.cli import launch_processes
from minimoe.parallel import data, launch
from minimoe.parallel.comm import count_collectives, wire_cost
from minimoe.parallel.plan import ARTICLE_PLAN, ParallelPlan, dp_ep_mesh

TINY = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=16)


# -----------------------------------------------------------------------------
# functions run inside the ranks (module level, so each spawned process can import them)


def _collectives(n):
    with count_collectives() as log:
        t = torch.full((n,), float(dist.get_rank() + 1))
        dist.all_reduce(t)
        out = torch.empty(2 * n)
        dist.all_gather_into_tensor(out, torch.ones(n))
        split = [1, 3] if dist.get_rank() == 0 else [2, 2]
        recv = [1, 2] if dist.get_rank() == 0 else [3, 2]
        got = torch.empty(sum(recv))
        dist.all_to_all_single(got, torch.arange(4.0), recv, split)
    return t.tolist(), log.by_op(), log.count()


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # rank 0 waits for a peer that never arrives


def _hang_on_rank_one():
    if dist.get_rank() == 1:
        time.sleep(60)
    dist.barrier()


def _rank_and_world():
    return dist.get_rank(), dist.get_world_size()


def _die_on_rank_one(how):
    """Rank 1 dies without a Python exception while rank 0 waits for it in a collective."""
    if dist.get_rank() == 1:
        time.sleep(0.5)  # let rank 0 enter the all-reduce first
        if how == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.ones(4)
    dist.all_reduce(t)


def _many_tensors(n, big_numel):
    """A result of n small tensors and one large one, with values that say which rank and index made them."""
    rank = dist.get_rank()
    return {"many": [torch.full((3, 5), 1000.0 * rank + i) for i in range(n)],
            "big": torch.arange(big_numel, dtype=torch.float32) + rank, "rank": rank}


def _plan_mesh():
    """ParallelPlan.mesh for plans with expert parallelism, and its refusals, on 2 processes."""
    out = {}
    for name, kwargs in (("plain", {}), ("checked", dict(n_experts=4))):
        mesh = ParallelPlan(ep=2).mesh(**kwargs)
        out[name] = (mesh.mesh_dim_names, tuple(mesh.shape), mesh["ep"].get_local_rank(),
                     dist.get_process_group_ranks(mesh["ep"].get_group()),
                     dist.get_process_group_ranks(dp_ep_mesh(mesh).get_group()), mesh["dp"].size())
    for name, plan, kwargs in (("indivisible", ParallelPlan(ep=2), dict(n_experts=3)),
                               ("dense", ParallelPlan(ep=2), dict(n_experts=0)),
                               ("world", ParallelPlan(dp=2, ep=2), {})):
        try:
            plan.mesh(**kwargs)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


# -----------------------------------------------------------------------------
# launcher and accounting


def test_launch_counts_collectives_by_the_ring_formulas():
    (a, ops, calls), (b, _, _) = launch.run(_collectives, 2, 8)
    assert a == b == [3.0] * 8                                        # 1 + 2 on every element
    assert calls == 3
    assert ops["all_reduce"] == wire_cost("all_reduce", 32, 2) == 32.0  # 2 (n-1)/n * 32 bytes
    assert ops["all_gather_into_tensor"] == 32.0                      # (n-1)/n * 64 bytes
    assert ops["all_to_all_single"] == 12.0                           # 3 of rank 0's 4 floats go to rank 1


def test_a_failing_rank_stops_the_run_with_its_error():
    t0 = time.monotonic()
    with pytest.raises(launch.RankError, match="rank one is broken") as e:
        launch.run(_raise_on_rank_one, 2, timeout=60)
    assert e.value.rank == 1 and time.monotonic() - t0 < 30


def test_a_hanging_rank_times_out():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[.*\] did not finish within 4 s"):
        launch.run(_hang_on_rank_one, 2, timeout=4)
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("how, reason", [("exit", "exit code 3"), ("kill", "signal SIGKILL")])
def test_a_rank_that_dies_without_raising_is_named(how, reason):
    # rank 0's "connection closed by peer" reaches the parent first; the run must still blame rank 1
    t0 = time.monotonic()
    with pytest.raises(launch.RankError, match=reason) as e:
        launch.run(_die_on_rank_one, 2, how, timeout=60)
    assert e.value.rank == 1 and time.monotonic() - t0 < 30
    assert str(e.value).startswith("rank 1 ")


def test_results_with_many_tensors_and_large_tensors_arrive_intact():
    n, big = 100, 50 * 2 ** 20 // 4  # 100 tensors per rank, and 50 MB in one tensor
    results = launch.run(_many_tensors, 2, n, big, timeout=120)
    for rank, r in enumerate(results):
        assert r["rank"] == rank and len(r["many"]) == n
        assert all(torch.equal(t, torch.full((3, 5), 1000.0 * rank + i)) for i, t in enumerate(r["many"]))
        assert r["big"].shape == (big,) and r["big"][0] == rank and r["big"][-1] == big - 1 + rank
        assert torch.equal(r["big"], torch.arange(big, dtype=torch.float32) + rank)


def test_launch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="nproc"):
        launch.run(_rank_and_world, 0)
    with pytest.raises(ValueError, match="backend"):
        launch.run(_rank_and_world, 1, backend="mpi")


def test_wire_cost_formulas():
    assert wire_cost("all_reduce", 1000, 4) == 1500          # 2 * 3/4
    assert wire_cost("all_reduce", 1000, 1) == 0
    assert wire_cost("reduce_scatter_tensor", 1000, 4) == 750
    assert wire_cost("send", 10, 2) == 10 and wire_cost("recv", 10, 2) == 0
    with pytest.raises(ValueError, match="no cost model"):
        wire_cost("gossip", 1, 2)


# -----------------------------------------------------------------------------
# plans


def test_plan_validation_before_any_process_group():
    assert ARTICLE_PLAN.world_size == 32 * 8 * 4 * 2 == 2048
    plan = ParallelPlan(dp=2, ep=2)
    assert plan.validate(4, n_experts=8) is plan
    assert plan.data_parallel == 4 and ARTICLE_PLAN.data_parallel == 64  # ep ranks are data-parallel replicas too
    assert [plan.coords(r) for r in range(4)] == [{"pp": 0, "dp": d, "ep": e, "tp": 0} for d in (0, 1) for e in (0, 1)]
    with pytest.raises(ValueError, match="needs 4 processes, but the world size is 3"):
        plan.validate(3, n_experts=8)
    with pytest.raises(ValueError, match="n_experts=6 is not divisible by ep=4"):
        ParallelPlan(ep=4).validate(4, n_experts=6)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ParallelPlan(ep=2).validate(2)
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by tp=4"):
        ParallelPlan(tp=4).validate(4, n_heads=6)
    with pytest.raises(ValueError, match="n_layers"):
        ParallelPlan(pp=4).validate(4, n_layers=2)
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        ParallelPlan(tp=0)
    assert not dist.is_initialized()


def test_plan_mesh_with_expert_parallelism():
    r0, r1 = launch.run(_plan_mesh, 2)
    for rank, r in enumerate((r0, r1)):
        for name in ("plain", "checked"):
            assert r[name] == (("pp", "dp", "ep", "tp"), (1, 1, 2, 1), rank, [0, 1], [0, 1], 1), name
        assert "n_experts=3 is not divisible by ep=2" in r["indivisible"]
        assert "mixture-of-experts" in r["dense"]
        assert "needs 4 processes, but the world size is 2" in r["world"]


# -----------------------------------------------------------------------------
# data parallel


def test_ddp_and_zero1_equal_one_process():
    for zero in (False, True):
        r = launch.run(data.verify, 2, TINY, zero=zero)
        for rank in r:
            assert rank["loss_ddp"] == pytest.approx(rank["loss_single"], abs=1e-5)
            assert rank["max_grad_diff"] < 1e-4
            assert rank["next_loss_ddp"] == pytest.approx(rank["next_loss_single"], abs=1e-5)
            assert rank["allreduce_bytes"] == rank["expected_bytes"] == rank["grad_bytes"]  # 2 (n-1)/n = 1
        assert r[0]["optimizer"] == ("ZeroRedundancyOptimizer" if zero else "AdamW")


def test_cli_nproc_trains_on_two_processes(tmp_path, text_makers):
    make_code, make_prose = text_makers
    (tmp_path / "a.py").write_text(make_code(seed=1, n_bytes=4000))
    (tmp_path / "b.txt").write_text(make_prose(seed=2, n_bytes=2000))
    cmd = [sys.executable, "-m", "minimoe.cli", "train", "--out", tmp_path / "ck", "--data", tmp_path / "a.py",
           tmp_path / "b.txt", "--d-model", 32, "--n-layers", 2, "--n-heads", 2, "--max-seq-len", 32,
           "--seq-len", 32, "--batch-size", 4, "--steps", 3, "--eval-every", 3, "--device", "cpu", "--quiet",
           "--nproc", 2, "--zero"]
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data parallel: 2 processes, ZeRO-1" in done.stdout
    assert f"tokens seen per domain: text {3 * 2 * 4 * 32:,}" in done.stdout   # both processes' tokens
    assert done.stdout.count("saved") == 1                                   # only rank 0 reports


def test_torchrun_stops_when_a_rank_fails(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, time\nimport torch.distributed as dist\n"
                      "dist.init_process_group('gloo')\n"
                      "if dist.get_rank() == 1:\n    raise SystemExit('rank 1 gives up')\n"
                      "dist.barrier()\n")
    t0 = time.monotonic()
    code = launch_processes([str(script)], 2)
    assert code != 0 and time.monotonic() - t0 < 120
