"""The process group of one model worker's ranks and the collectives its forward pass uses.

gloo on CPU (each rank a share of the cores), NCCL on CUDA (one GPU per rank). At world size 1 every
collective is a no-op and nothing of torch.distributed is touched, so the single-process engine runs
the same model code.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engines.parallel.layout import ParallelLayout

log = logging.getLogger("engines.parallel")

DEFAULT_TIMEOUT_S = 600.0
"""A collective waiting longer than this means a rank is gone (the watchdog usually notices first)."""


@dataclass
class Rendezvous:
    """Where ranks meet: torchrun's MASTER_ADDR / MASTER_PORT."""

    address: str
    port: int

    def store(self, rank: int, world_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
        """The group's key-value store: rank 0 hosts it, the others connect to it.

        Rank 0 opens it before loading its weights (`load_rank`), so a rank that finishes loading
        first finds it listening: connecting before the server is up costs a retry back-off, which
        made joining take 0.5-0.6 s instead of 0.02 in three starts of four (TP=2, this CPU)."""
        import torch.distributed as dist

        return dist.TCPStore(
            self.address,
            self.port,
            world_size,
            is_master=rank == 0,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )


@dataclass
class ParallelComm:
    """Collectives over this rank's tensor-parallel group and point-to-point between stages."""

    layout: ParallelLayout = field(default_factory=ParallelLayout)
    tp_group: Any = None
    shm: Any = None
    """engines.parallel.shm.ShmGroup when the tensor-parallel group shares this machine's memory."""
    reduce_seconds: float = 0.0
    forced: bool = False
    """Run the collectives even in a group of one (tests of the NCCL path on a single GPU)."""
    """Time spent in all-reduces and all-gathers since start (the communication share of a step)."""

    @property
    def distributed(self) -> bool:
        return self.layout.world_size > 1 or self.forced

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the tensor-parallel group, in place."""
        if self.layout.tensor_parallel == 1 and not self.forced:
            return tensor
        import torch.distributed as dist

        started = time.perf_counter()
        if self.shm is not None and self.shm.fits(tensor):
            self.shm.all_reduce(tensor)
        else:
            dist.all_reduce(tensor, group=self.tp_group)
        self.reduce_seconds += time.perf_counter() - started
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., tp x n], rank order (the vocabulary shards of the logits)."""
        if self.layout.tensor_parallel == 1 and not self.forced:
            return tensor
        import torch.distributed as dist

        started = time.perf_counter()
        if self.shm is not None and self.shm.fits(tensor):
            gathered = self.shm.all_gather_last(tensor)
        else:
            parts = [torch.empty_like(tensor) for _ in range(self.layout.tensor_parallel)]
            dist.all_gather(parts, tensor.contiguous(), group=self.tp_group)
            gathered = torch.cat(parts, dim=-1)
        self.reduce_seconds += time.perf_counter() - started
        return gathered

    def send(self, tensor: torch.Tensor, rank: int) -> Any:
        """Start sending to a global rank; wait on the returned work before reusing ``tensor``."""
        import torch.distributed as dist

        return dist.isend(tensor.contiguous(), rank)

    def recv(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, rank: int
    ) -> torch.Tensor:
        import torch.distributed as dist

        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(tensor, rank)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (its pickled form crosses the group)."""
        import torch.distributed as dist

        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.broadcast(tensor, src=0)
        return tensor

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` of all ranks (cache blocks every rank can hold)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())


def init_comm(
    layout: ParallelLayout,
    rendezvous: Rendezvous,
    device: torch.device,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    shared_memory: bool = False,
    force: bool = False,
    store: Any = None,
) -> ParallelComm:
    """Join the group (blocks until every rank has) and build every stage's tensor-parallel group;
    `store` is `rendezvous.store(...)` when this rank opened it earlier.

    Every rank creates every stage's group, in the same order, as torch.distributed requires."""
    if layout.world_size == 1 and not force:
        return ParallelComm(layout)
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    options: dict[str, Any] = {}
    if device.type == "cuda":
        options["device_id"] = device
    dist.init_process_group(
        backend,
        store=store if store is not None else rendezvous.store(layout.rank, layout.world_size, timeout_s),
        rank=layout.rank,
        world_size=layout.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **options,
    )
    tp_group = None
    if layout.pipeline_parallel > 1 and layout.tensor_parallel > 1:
        for stage in range(layout.pipeline_parallel):
            group = dist.new_group(layout.stage_ranks(stage))
            if stage == layout.stage:
                tp_group = group
    shm = (
        _shared_memory_group(layout, rendezvous, tp_group) if shared_memory and device.type == "cpu" else None
    )
    log.info(
        "Rank %d/%d joined (%s%s, %s)",
        layout.rank,
        layout.world_size,
        backend,
        " + shared-memory all-reduce" if shm is not None else "",
        layout.describe(),
    )
    return ParallelComm(layout, tp_group, shm, forced=force)


def _shared_memory_group(layout: ParallelLayout, rendezvous: Rendezvous, tp_group: Any) -> Any:
    """The group's slots in /dev/shm: its first rank creates the file, every rank maps it, and the file
    is unlinked at once so that nothing outlives the group, however its ranks die."""
    if layout.tensor_parallel == 1:
        return None
    import torch.distributed as dist

    from engines.parallel.shm import ShmGroup

    path = Path("/dev/shm") / f"lmi-tp-{rendezvous.address}-{rendezvous.port}-{layout.stage}"
    first = layout.tp_rank == 0
    group = ShmGroup(path, layout.tensor_parallel, layout.tp_rank, create=True) if first else None
    dist.barrier(group=tp_group)
    if not first:
        group = ShmGroup(path, layout.tensor_parallel, layout.tp_rank, create=False)
    dist.barrier(group=tp_group)
    if first:
        path.unlink(missing_ok=True)
    return group
