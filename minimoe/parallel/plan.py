"""A parallel plan: how many ways to split the data, the tensors, the layers and the experts.

The article's listing asks for data 32 x tensor 8 x pipeline 4 x expert 2. Read as four independent axes of
a device mesh, that is 32 * 8 * 4 * 2 = 2,048 processes, one per GPU:

* tp (tensor): ranks that hold slices of every weight matrix and all-reduce inside each layer; the fastest
  links (one NVLink island, usually 8 GPUs) go here;
* ep (expert): ranks that hold different experts and exchange tokens with all-to-all; for everything that is
  not an expert they are more data-parallel replicas, each with its own tokens;
* dp (data): replicas that see different data and average gradients; for the experts, dp counts the ranks that
  hold the same experts (one in each ep group);
* pp (pipeline): stages that hold different layers and pass activations point to point; the slowest links
  (between nodes) can go here, as its traffic is smallest.

How ep composes with dp. Here ep is its own axis next to dp, so a plan dp 2 x ep 2 is 4 processes and the batch
is split dp * ep = 4 ways (`data_parallel`). Each weight is all-reduced over the ranks that hold the same copy:
an expert over "dp" (same experts, other data), every other weight over "dp" and "ep" together, flattened into
one dimension, "dp_ep" (`dp_ep_mesh`). Megatron-LM and torchtitan (and DeepSeek-V3's report) write the same
mesh the other way round: their data-parallel degree counts every replica of the dense weights, and expert
parallelism is carved out of it (torchtitan's dp_shard 4 with ep 2 is this dp 2 x ep 2; the article's 2,048
GPUs would be dp 64 x tp 8 x pp 4 with ep 2 inside dp). Both are the same grid of processes, named
differently; naming ep separately keeps "how many copies of an expert" (dp) visible.

`ParallelPlan.validate` checks a plan against a world size and a model before any process group exists;
`ParallelPlan.mesh` builds the device mesh (torch.distributed.device_mesh) once the default group is up.
"""
from __future__ import annotations

from dataclasses import dataclass

DIMS = ("pp", "dp", "ep", "tp")  # mesh order: outermost (slowest links) to innermost (fastest)


@dataclass(frozen=True)
class ParallelPlan:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self):
        for name in DIMS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.ep

    @property
    def data_parallel(self) -> int:
        """How many ways the batch is split: the replicas of every weight that is not an expert (dp * ep)."""
        return self.dp * self.ep

    def validate(self, world_size: int, *, n_experts: int | None = None, n_layers: int | None = None,
                 n_heads: int | None = None, d_ff: int | None = None) -> "ParallelPlan":
        """Raise ValueError naming the field if the plan cannot run on `world_size` processes for this model.
        n_experts None or 0 is a dense model, which cannot be split into experts (ep > 1)."""
        return self._check(world_size, n_experts=n_experts or 0, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff)

    def _check(self, world_size: int, n_experts: int | None = None, n_layers: int | None = None,
               n_heads: int | None = None, d_ff: int | None = None) -> "ParallelPlan":
        """validate's rules; a model size that is None is not known, so not checked."""
        if world_size != self.world_size:
            raise ValueError(f"the plan dp {self.dp} x tp {self.tp} x pp {self.pp} x ep {self.ep} needs "
                             f"{self.world_size} processes, but the world size is {world_size}")
        if self.ep > 1 and n_experts is not None:
            if n_experts < 1:
                raise ValueError(f"ep={self.ep} needs a mixture-of-experts model (n_experts > 0)")
            if n_experts % self.ep:
                raise ValueError(f"n_experts={n_experts} is not divisible by ep={self.ep}")
        if n_layers is not None and n_layers < self.pp:
            raise ValueError(f"pp={self.pp} stages need at least {self.pp} layers, got n_layers={n_layers}")
        if n_heads is not None and n_heads % self.tp:
            raise ValueError(f"n_heads={n_heads} is not divisible by tp={self.tp}")
        if d_ff is not None and d_ff % self.tp:
            raise ValueError(f"d_ff={d_ff} is not divisible by tp={self.tp}")
        return self

    def coords(self, rank: int) -> dict[str, int]:
        """The rank's position on each axis, with tp varying fastest (row-major over DIMS)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the plan's {self.world_size} processes")
        out = {}
        for name in reversed(DIMS):
            size = getattr(self, name)
            out[name] = rank % size
            rank //= size
        return {name: out[name] for name in DIMS}

    def mesh(self, device_type: str = "cpu", *, n_experts: int | None = None, n_layers: int | None = None,
             n_heads: int | None = None, d_ff: int | None = None):
        """The DeviceMesh of this plan (call after the default process group is initialised, on every rank).

        Dimensions DIMS ("pp", "dp", "ep", "tp"; sizes 1 included, so mesh["ep"] always exists), and dp x ep
        flattened (`dp_ep_mesh`): mesh["ep"].get_group() exchanges tokens, mesh["dp"].get_group() averages
        expert gradients, dp_ep_mesh(mesh).get_group() the gradients of everything else. Checks the world size,
        and the model sizes that are given, by validate's rules (ValueError before any group is made).
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        self._check(dist.get_world_size(), n_experts=n_experts, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff)
        mesh = init_device_mesh(device_type, tuple(getattr(self, d) for d in DIMS), mesh_dim_names=DIMS)
        dp_ep_mesh(mesh)  # makes its process group now, on every rank together
        return mesh


def dp_ep_mesh(mesh):
    """The dp and ep dimensions of a plan's mesh as one (named "dp_ep"): every replica of the weights that are
    not experts. DeviceMesh._flatten, as torchtitan does; it caches, so every call returns the same mesh."""
    return mesh["dp", "ep"]._flatten("dp_ep")


ARTICLE_PLAN = ParallelPlan(dp=32, tp=8, pp=4, ep=2)  # the source article, section 2 (T2)
