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


def check_strategy_setting(value: Any, key: str = "trainer.strategy") -> None:
    """Check a strategy as a config or command line gives it, before Lightning builds the trainer; raise
    `UserInputError` (one line: the problem and the fix) for a value Lightning would reject with a traceback or that
    `check_strategy` would refuse later.

    A plain string is a name of Lightning's strategy registry ("ddp", "fsdp", ...): an unknown name is refused with
    the choices, a registered name whose strategy is refused (FSDP1, DeepSpeed) is refused here, on any accelerator,
    naming `ModelParallelStrategy`. A class name or class path given as a plain string ("ModelParallelStrategy",
    "lightning.pytorch.strategies.ModelParallelStrategy") is not a registry name: the message gives the class_path
    form with its arguments. A `class_path` form naming a refused class is refused too."""
    from lightning.pytorch import strategies as pl_strategies

    from .errors import UserInputError

    refused = (pl_strategies.DeepSpeedStrategy, pl_strategies.FSDPStrategy)
    refusal = (f"{key}: {{name}} is not supported: curvature statistics need every layer's full weights, which"
               f" DeepSpeed and FSDP1 flatten into shards; use {MODEL_PARALLEL_HINT} (on the command line: "
               f"{MODEL_PARALLEL_FLAGS}), or --{key} ddp (or ddp_spawn, or a single device)")
    if isinstance(value, str):
        name = value.strip()
        registry = pl_strategies.StrategyRegistry
        if name.lower() == "auto":
            return
        if name.lower() in registry:
            if issubclass(registry[name.lower()]["strategy"], refused):
                raise UserInputError(refusal.format(name=f"{name!r} ({registry[name.lower()]['strategy'].__name__})"))
            return
        cls = _strategy_class(name)
        if cls is None:
            raise UserInputError(f"{key}: unknown strategy {name!r}; give a registered name ("
                                 f"{', '.join(sorted(n for n in registry.available_strategies() if '_find_' not in n))}"
                                 f", or auto) or a class with class_path, e.g. {MODEL_PARALLEL_FLAGS}")
        if issubclass(cls, refused):
            raise UserInputError(refusal.format(name=f"{name!r}"))
        if issubclass(cls, pl_strategies.ModelParallelStrategy):
            raise UserInputError(f"{key}: {name!r} is a class name, which Lightning does not read as a strategy (a"
                                 " plain string must be a registered name such as ddp); give the class with its"
                                 f" arguments: {MODEL_PARALLEL_FLAGS} (N: the number of processes, tensor parallelism"
                                 " is not supported)")
        raise UserInputError(f"{key}: {name!r} is a class name, which Lightning does not read as a strategy (a plain"
                             " string must be a registered name such as ddp); give it as a class: "
                             f"--{key}.class_path {cls.__module__.rsplit('.', 1)[0]}.{cls.__name__} (its arguments "
                             f"as --{key}.init_args.NAME VALUE)")
    class_path = getattr(value, "class_path", None) if not isinstance(value, dict) else value.get("class_path")
    if isinstance(class_path, str):
        cls = _strategy_class(class_path)
        if cls is not None and issubclass(cls, refused):
            raise UserInputError(refusal.format(name=f"{class_path!r}"))


#: `ModelParallelStrategy` for FSDP2 on the `lightning-unlearn` command line
MODEL_PARALLEL_FLAGS = ("--trainer.strategy.class_path lightning.pytorch.strategies.ModelParallelStrategy "
                        "--trainer.strategy.init_args.data_parallel_size N "
                        "--trainer.strategy.init_args.tensor_parallel_size 1")


def _strategy_class(name: str) -> type | None:
    """The Lightning strategy class a class name or dotted class path names (case-insensitive), or None."""
    import importlib

    from lightning.pytorch import strategies as pl_strategies

    module, _, short = name.rpartition(".")
    if module:
        try:
            found = getattr(importlib.import_module(module), short, None)
        except ImportError:
            found = None
        if isinstance(found, type) and issubclass(found, pl_strategies.Strategy):
            return found
    for attr in dir(pl_strategies):
        found = getattr(pl_strategies, attr)
        if (attr.lower() == short.lower() and isinstance(found, type)
                and issubclass(found, pl_strategies.Strategy)):
            return found
    return None
