"""Data-parallel plumbing of draft training, on PyTorch's own engine (torchrun + DDP / FSDP).

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank joins the process group (nccl on CUDA,
gloo on CPU) and the draft's training forward is wrapped in ``DistributedDataParallel`` or,
with ``fsdp``, ``FullyShardedDataParallel``. Everything that knows about FSDP's sharded
weights and optimiser state is here; alone (one process, no group) every helper is a no-op.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from msd.train.config import TrainConfig, device_and_dtype


@dataclass
class Ranks:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this run initialised the process group (and destroys it)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints and metrics and evaluates."""
        return self.rank == 0


def setup_ranks(config: TrainConfig) -> Ranks:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device, _ = device_and_dtype(config.device, config.bf16)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), device, owns_group)
    return Ranks(0, 1, device, False)


def release_ranks(ranks: Ranks) -> None:
    """Destroy the process group if :func:`setup_ranks` created it."""
    if ranks.owns_group:
        dist.destroy_process_group()


def all_reduce(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sums over the ranks (float64, so token counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    if ranks.world > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def sum_counts(counts: Counter, ranks: Ranks) -> Counter:
    """A counter summed over the ranks."""
    if ranks.world > 1:
        gathered = [None] * ranks.world
        dist.all_gather_object(gathered, counts)
        counts = sum(gathered, Counter())
    return counts


def barrier(ranks: Ranks) -> None:
    """Wait for every rank."""
    if ranks.world > 1:
        dist.barrier()


def wrap(module: nn.Module, ranks: Ranks, fsdp: bool) -> nn.Module:
    """DDP / FSDP around the training forward when there are several ranks (or FSDP asked)."""
    if fsdp:
        if ranks.world == 1:
            raise ValueError("fsdp shards the draft over several ranks: run under torchrun --nproc_per_node N")
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullyShardedDataParallel, StateDictType

        # use_orig_params: the frozen embedding shares flat parameters with trainable weights.
        model = FullyShardedDataParallel(module, device_id=ranks.device, use_orig_params=True)
        # The checkpoint's optimiser state is gathered into one buffer reused for every state
        # name; "offloading" it to the CPU makes no copy when it already is there, so on CPU
        # exp_avg would alias exp_avg_sq (torch 2.13). Without offloading it is cloned.
        FullyShardedDataParallel.set_state_dict_type(
            model, StateDictType.FULL_STATE_DICT,
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=ranks.device.type != "cpu"))
        return model
    if ranks.world > 1:
        ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


# ---------------------------------------------------------------------- FSDP's full weights and state
def gathered_weights(model: nn.Module, fsdp: bool):
    """A context in which rank 0's draft (inside ``model``) holds all its weights, read-only
    (FSDP gathers the shards: collective, every rank enters it)."""
    if not fsdp:
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True)


def writable_weights(model: nn.Module, fsdp: bool):
    """A context in which every rank's draft holds all its weights and what is loaded into
    them goes back to the shards (collective under FSDP)."""
    if not fsdp:
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(model, writeback=True)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict | None:
    """FSDP's gathered optimiser state dict (collective); None without FSDP, where the
    optimiser's own ``state_dict()`` is already complete."""
    if not fsdp:
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.optim_state_dict(model, optimizer)


def optimizer_state_to_load(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> dict:
    """The saved full optimiser ``state`` as this rank's optimiser loads it (its shard under FSDP)."""
    if not fsdp:
        return state
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.optim_state_dict_to_load(model, optimizer, state)
