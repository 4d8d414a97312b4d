"""Models sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`): the engine runs on their full parameters.

Under FSDP2 each process holds a shard (a `DTensor`) of every parameter, and a module's full weights exist only
during its forward and backward. The engine needs more: gradients of chosen parameters (`torch.autograd.grad`
returns None for sharded parameters), in-place trial updates and bit-identical rollbacks. `full_parameters(model)`
gathers every FSDP module's parameters once (`unshard`, kept through forward and backward passes, no gradient
reduce-scatter), so the engine sees ordinary tensors of full shape; on exit the final values are written back into
each process's shard and the model is resharded. Statistics are still summed across processes by the engine's
`reduce`, and K-FAC can keep each layer's factors on one process only (`KFAC(shard_factors=True)`), which is where
the memory goes (the factors of a 1B Llama are about 3.5 times its parameters).

What this costs: every process holds the full parameters for the duration of a request (not the gradients or the
optimizer state: those are not needed). Torch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that `fully_shard` wrapped (empty for an unsharded model)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` holds FSDP2-sharded parameters."""
    return bool(fsdp_modules(model))


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: `model`'s parameters are full tensors (gathered once), forward and backward passes keep them, and
    gradients are not reduce-scattered. On exit (also after an error): the values are written back into each
    process's shards and the model is resharded with its usual behaviour restored. A no-op for unsharded models.

    Every process must enter and leave together (the gather and the write-back are collectives of the mesh). Any
    unshard state the caller left (e.g. the root still gathered after a forward without a backward) is resharded on
    entry.
    """
    modules = fsdp_modules(model)
    if not modules:
        yield model
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    # A module's registered parameters are its sharded DTensors only while it is resharded: after a forward without a
    # backward (a validation or `no_grad` pass) the root keeps its unsharded tensors, whose storage `reshard()` frees
    # on exit. Reshard every module first (a no-op for a resharded one), so the shards are what gets recorded.
    for module in modules:
        module.reshard()
    sharded = dict(model.named_parameters())
    for module in modules:
        module.set_reshard_after_forward(False)
        module.set_reshard_after_backward(False)
        module.set_requires_gradient_sync(False)
        module.unshard()
    full = dict(model.named_parameters())
    values: dict[str, torch.Tensor] | None = None
    try:
        yield model
        values = {name: p.detach().clone() for name, p in full.items()}
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True)
            module.set_reshard_after_backward(True)
            module.set_requires_gradient_sync(True)
        if values is not None:  # an error inside: the shards keep their values from before
            with torch.no_grad():
                for name, param in sharded.items():
                    if isinstance(param, DTensor):
                        shard = distribute_tensor(values[name], param.device_mesh, param.placements,
                                                  src_data_rank=None).to_local()
                        param.to_local().copy_(shard)
                    elif values[name] is not param:
                        param.copy_(values[name])


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (the longest `nn.ModuleList` of the model: `transformer.h` in GPT-2,
    `model.layers` in Llama), the usual unit of FSDP sharding; [] when the model has none."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: nn.Module, mesh: object) -> nn.Module:
    """`fully_shard` every transformer block and then the whole model over `mesh` (a 1-d data-parallel device mesh):
    what `UnlearningModule.configure_model` does under Lightning's `ModelParallelStrategy`. Returns the model."""
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters and persistent buffers, by name, read directly from the modules: inside
    `full_parameters` these are the full values, and no FSDP state-dict hook (a collective) runs, so one process
    may call it alone. Tied parameters appear once (under their first name), as in `named_parameters`."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                out[dot + name] = param.detach().cpu().clone()
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                out[dot + name] = buffer.detach().cpu().clone()
    return out
