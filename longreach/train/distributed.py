"""Multi-process training, applied to the model from outside.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set) ``setup`` starts the process
group (NCCL on CUDA, gloo on CPU) and ``parallelize`` wraps the model in DDP or, with
``train.fsdp``, shards it with FSDP2 (one group per decoder block, then the root). The state
helpers gather full, unsharded state dicts so that checkpoints look the same whichever way
they were trained, and load them back into any of the three layouts.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from longreach.runtime import resolve_device

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_process_group: bool = False  # whether ``teardown`` should destroy it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> DistEnv:
    """Pick the device and, when launched by torchrun with several processes, join the group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        dev = resolve_device(device)
    except ValueError as err:  # an unknown device, or CUDA asked for on a machine without it
        raise ValueError(f"train.device={device!r}: {err}") from None
    if dev.type == "cuda":
        if dev.index is None:  # one GPU per process: the one torchrun's local rank names
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    env = DistEnv(rank, world_size, local_rank, dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        env.owns_process_group = True
    return env


def teardown(env: DistEnv) -> None:
    if env.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, env: DistEnv, *, fsdp: bool) -> nn.Module:
    """Return the module to train: ``model`` itself, DDP around it, or ``model`` sharded in place.

    FSDP2 shards each decoder block (``model.model.layers``) as its own group, so only one
    block's full weights are gathered at a time, and the rest (embeddings, head) at the root.
    """
    if not env.distributed:
        return model
    if fsdp:
        # an explicit mesh on the training device: left to itself, fully_shard builds its mesh
        # on CUDA whenever a GPU exists, even for a CPU (gloo) run
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on micro-steps that are not the last of an accumulation."""
    inner = module._orig_mod if hasattr(module, "_orig_mod") else module
    if enabled:
        yield
    elif isinstance(inner, DistributedDataParallel):
        with inner.no_sync():
            yield
    elif isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Global gradient norm (before clipping); ``max_norm=0`` measures without clipping."""
    norm = torch.nn.utils.clip_grad_norm_(
        list(parameters), max_norm if max_norm > 0 else float("inf")
    )
    if isinstance(norm, DTensor):  # FSDP2: a sharded scalar
        norm = norm.full_tensor()
    return norm


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Unsharded CPU weights of an FSDP model (a collective: call on every rank); None otherwise.

    None tells ``save_pretrained`` to read the (unsharded) model itself, which keeps its
    handling of tied weights.
    """
    if not isinstance(model, FSDPModule):
        return None
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, unsharded (a collective under FSDP)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank holds it) into a plain or sharded model."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
