"""torch.distributed for the training loop: set up from torchrun's environment, shard with FSDP2, reduce.

One process (no RANK/WORLD_SIZE, or WORLD_SIZE=1) runs without a process group: every helper here is then a
no-op or a local call, so the loop has one code path. Under `torchrun` with WORLD_SIZE > 1 the process group
is NCCL on CUDA and gloo on CPU; modules are sharded with FSDP2 (`fully_shard` per decoder layer, then the
root); full state dicts are gathered to rank 0 on the CPU, so checkpoints look the same in both cases.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from compactlm.errors import CompactLMError
from compactlm.models.loading import pick_device

log = logging.getLogger(__name__)

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on CPU, non-empty on rank 0 only


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, and the device it trains on."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """More than one process: models are FSDP-sharded and results reduced."""
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    """Dist from torchrun's RANK/WORLD_SIZE/LOCAL_RANK (initialising NCCL or gloo), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return Dist(0, 1, pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and not device.startswith("cpu") and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompactLMError(f"device={device} but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    log.info("rank %d of %d on %s (%s)", rank, world, dev, dist.get_backend())
    return Dist(rank, world, dev)


def teardown(d: Dist) -> None:
    """Destroy the process group that `setup` created (no-op for one process)."""
    if d.sharded and dist.is_initialized():
        dist.destroy_process_group()


def shard_(module: nn.Module, layers: nn.ModuleList, d: Dist, offload: bool = False,
           units: tuple[nn.Module, ...] = (), param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 in place: `fully_shard` every decoder layer and each of `units`, then `module` as the root; no-op for
    one process. A unit below the root gathers its parameters for its forward and shards them again after it;
    the root keeps its own gathered after forward (for the backward that follows) until it is resharded.

    `offload`: the shards live in (pinned) CPU memory and each layer's parameters are copied to the GPU for its
    forward (`CPUOffloadPolicy`): a frozen teacher then costs GPU memory for one layer at a time, plus its root's
    parameters (final norm, LM head) while a step computes its losses.
    `param_dtype` (bfloat16 for a student trained with dtype=bfloat16): the parameters are gathered and computed
    with in that dtype and the gradients reduced in float32 (`MixedPrecisionPolicy`); the sharded master weights
    and the optimizer stay float32. None: gathered in the parameters' own dtype."""
    if not d.sharded:
        return module
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    policy = CPUOffloadPolicy(pin_memory=d.device.type == "cuda") if offload else OffloadPolicy()
    mixed = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for unit in (*layers, *units, module):  # the root last
        fully_shard(unit, mesh=mesh, offload_policy=policy, mp_policy=mixed)
    return module


def resident_params(module: nn.Module) -> int:
    """Parameters this rank holds for `module` now: its shards of what is sharded, whole what is gathered."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of `t` over all ranks (a new tensor on t's device)."""
    if not d.sharded:
        return t.clone()
    out = t.detach().to(d.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def gather_objects(obj: Any, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not d.sharded:
        return [obj]
    out: list = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op for one process)."""
    if d.sharded:
        dist.barrier()


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on the CPU, keyed by parameter name; empty on ranks but 0."""
    model_sd = get_model_state_dict(module, options=_FULL)
    optim_sd = get_optimizer_state_dict(module, optimizer, options=_FULL) if optimizer is not None else {}
    return model_sd, optim_sd


def load_full_state_(module: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict,
                     optim_sd: dict | None) -> None:
    """Load full (unsharded) state dicts, as `full_state` returns them, into a plain or sharded module."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, model_sd, options=options)
    if optimizer is not None and optim_sd:
        set_optimizer_state_dict(module, optimizer, optim_sd, options=options)
