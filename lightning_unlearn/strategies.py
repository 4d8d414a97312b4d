"""Which Lightning/Fabric strategies the drivers accept: curvature needs every layer's whole weights on each process.

`check_strategy` is called by every driver at setup (the callbacks, `UnlearningModule`, `fabric_unlearn`), so a
sharded strategy fails before any work with a message naming the strategies that work. Lightning is imported when
the check runs, not when this module is imported.
"""

from __future__ import annotations

from typing import Any


class UnsupportedStrategyError(RuntimeError):
    """The trainer's strategy shards the weights, which curvature statistics cannot work with yet."""


def check_strategy(strategy: Any, who: str = "lightning-unlearn") -> None:
    """Raise `UnsupportedStrategyError` for strategies that shard parameters (DeepSpeed, FSDP, model parallel).

    Curvature backends read whole weight matrices and their input/output statistics on every process; sharded
    parameters would give each rank a piece of a layer. DDP (any launcher) and single-device strategies work.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    unsupported: tuple[type, ...] = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)
    try:  # Fabric strategies, when the check runs for a Fabric driver
        from lightning.fabric.strategies import DeepSpeedStrategy as FabricDeepSpeed
        from lightning.fabric.strategies import FSDPStrategy as FabricFSDP
        from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel

        unsupported += (FabricDeepSpeed, FabricFSDP, FabricModelParallel)
    except ImportError:  # pragma: no cover - older Lightning
        pass
    if isinstance(strategy, unsupported):
        raise UnsupportedStrategyError(
            f"{who} does not support the {type(strategy).__name__} strategy yet: curvature statistics need every"
            " layer's full, unsharded weights on each process. Use strategy='ddp' (or 'ddp_spawn', or a single"
            " device); DeepSpeed and FSDP/model-parallel sharding are not supported for now."
        )
