"""Which Lightning/Fabric strategies the drivers accept: single device, DDP, and FSDP2 through ModelParallelStrategy.

`check_strategy` is called by every driver at setup (the callbacks, `UnlearningModule`, `fabric_unlearn`), so a
strategy it cannot serve fails before any work with a message naming one that works. Lightning is imported when
the check runs, not when this module is imported.
"""

from __future__ import annotations

from typing import Any


class UnsupportedStrategyError(RuntimeError):
    """The trainer's strategy splits the weights in a way curvature statistics cannot work with."""


MODEL_PARALLEL_HINT = ("ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with "
                       "torch.distributed.fsdp.fully_shard in configure_model (FSDP2)")


def tensor_parallel_size(strategy: Any) -> int:
    """The tensor-parallel degree a (Lightning or Fabric) `ModelParallelStrategy` has or will have ("auto" becomes
    the number of processes per node, as the strategy resolves it)."""
    size = getattr(strategy, "_tensor_parallel_size", 1)
    if size == "auto":
        size = int(getattr(strategy, "num_processes", 1) or 1)
    return int(size)


def check_strategy(strategy: Any, who: str = "lightning-unlearn") -> None:
    """Raise `UnsupportedStrategyError` for strategies the engine cannot serve, naming one that works.

    Works: single device, DDP (any launcher), and FSDP2 through `ModelParallelStrategy` with tensor parallelism 1 (the
    engine gathers the full parameters for a request, `lightning_unlearn.fsdp.full_parameters`, and K-FAC keeps each
    layer's factors on one process). Refused: DeepSpeed and the older `FSDPStrategy` (FSDP1: flat parameters), and
    tensor parallelism (a process sees a slice of each layer's inputs or outputs, so K-FAC's statistics would be
    wrong).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    refused: tuple[type, ...] = (DeepSpeedStrategy, FSDPStrategy)
    model_parallel: tuple[type, ...] = (ModelParallelStrategy,)
    try:  # Fabric strategies, when the check runs for a Fabric driver
        from lightning.fabric.strategies import DeepSpeedStrategy as FabricDeepSpeed
        from lightning.fabric.strategies import FSDPStrategy as FabricFSDP
        from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel

        refused += (FabricDeepSpeed, FabricFSDP)
        model_parallel += (FabricModelParallel,)
    except ImportError:  # pragma: no cover - older Lightning
        pass
    if isinstance(strategy, refused):
        raise UnsupportedStrategyError(
            f"{who} does not support the {type(strategy).__name__} strategy: curvature statistics need every layer's"
            f" full weights, which DeepSpeed and FSDP1 flatten into shards. Use {MODEL_PARALLEL_HINT}, or"
            " strategy='ddp' (or 'ddp_spawn', or a single device).")
    if isinstance(strategy, model_parallel) and tensor_parallel_size(strategy) > 1:
        raise UnsupportedStrategyError(
            f"{who} does not support tensor parallelism (tensor_parallel_size={tensor_parallel_size(strategy)}): each"
            f" process would see a slice of every layer's inputs or outputs. Use {MODEL_PARALLEL_HINT}.")
