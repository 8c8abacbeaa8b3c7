"""torchrun integration: rank/world from the environment, process group, reductions."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``).

    NCCL on CUDA, gloo on CPU. A single process without those variables runs undistributed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        store = restart_safe_store(world)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return DistInfo(rank, world, local)


def restart_safe_store(world_size: int) -> dist.Store | None:
    """A store private to this launch attempt, when torchrun shares its own store with workers.

    Since torch 2.5 torchrun's c10d rendezvous lends the workers *its* TCPStore
    (``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps that one store across ``--max-restarts``
    attempts, while ``init_process_group`` writes its keys (gloo/NCCL peer addresses) under the
    same names every time: a restarted worker can read a dead peer's address from the previous
    attempt and fail to connect ("Connection refused", pytorch/pytorch#135712). We put every key
    under ``nkd/<run id>/attempt<k>/``, with ``k = TORCHELASTIC_RESTART_COUNT``.

    On one node (``GROUP_WORLD_SIZE=1``) all workers restart together and agree on ``k``. Across
    nodes each agent counts its own restarts, which can disagree; there torch's own fix is needed:
    launch with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a fresh store per rendezvous round, no
    agent store, and this function returns ``None``). A warning says so when restarts are enabled.
    Returns ``None`` (the default ``env://`` path) outside torchrun's shared-store mode.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if nodes > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        warnings.warn("torchrun --max-restarts across several nodes with the rendezvous store shared with the workers: "
                      "restart counts can differ between nodes; launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that "
                      "every restart gets a fresh store", RuntimeWarning, stacklevel=2)
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                           timeout=timedelta(minutes=10))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"nkd/{run_id}/attempt{attempt}/", client)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Destroy the process group after a run that every rank finished (not after a failure:
    tearing down a group whose peer died can block)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
