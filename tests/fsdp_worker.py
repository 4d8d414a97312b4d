"""One deletion request per curvature backend on a tiny GPT-2 (or `FSDP_WORKER_ARCH`), through one driver, on 1
process or on N processes
with the model sharded by FSDP2 (`fully_shard`, `ModelParallelStrategy`): the script `tests/test_fsdp.py` runs.

    python tests/fsdp_worker.py OUT DRIVER WORLD      # DRIVER: callback | module | fabric | curvature, or
                                                      # callback_val | module_val | fabric_eval (K-FAC only)

Every process sees its share of the same global data; the fixed step (absolute λ, no step search) makes the update a
continuous function of the reduced statistics, so N processes must equal 1. The `_val`/`_eval` drivers run a forward
pass without a backward before the request (Lightning's sanity validation and a validation epoch; a `no_grad` forward
for Fabric), after which FSDP2 keeps the root module's parameters unsharded. Process 0 writes, for each backend, the
full weights after the request and the size of this process's curvature state (`memory_footprint()["total"]`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402
from lightning.pytorch.utilities import CombinedLoader  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_unlearn.callbacks import CurvatureCallback, ProcessGroupTeardown, Unlearn  # noqa: E402
from lightning_unlearn.distributed import leave_process_group  # noqa: E402
from lightning_unlearn.fabric import fabric_unlearn  # noqa: E402
from lightning_unlearn.fsdp import is_sharded, shard_model  # noqa: E402
from lightning_unlearn.models import small_causal_lm  # noqa: E402
from lightning_unlearn.module import UnlearningModule  # noqa: E402

BACKENDS = tuple(os.environ.get("FSDP_WORKER_BACKENDS", "kfac,diagonal,cg").split(","))
#: the tiny model's architecture (`FSDP_WORKER_ARCH`; gpt2 unless set: mixtral for fused experts and routers)
ARCH = os.environ.get("FSDP_WORKER_ARCH", "gpt2")
X = torch.randint(0, 120, (16, 12), generator=torch.Generator().manual_seed(0))
ROWS = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in X]
FORGET, RETAIN = ROWS[:4], ROWS[4:]
FIXED = {"damping": 1e-2, "scale": 0.1, "max_retain_increase": None}
SEARCH_OFF = {"damping_mode": "absolute", "step_search": False}


def backend_kwargs(backend: str) -> dict:
    # CG to the residual (no stop on progress); the default (mc) Fisher for K-FAC
    return {"max_iter": 50, "rtol": 1e-10, "progress_tol": 0} if backend == "cg" else {}


def stack(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value (a collective for sharded ones: every process calls it)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


class Capture(pl.Callback):
    """After the run (in teardown: after the module's own on_train_end): the full weights and the size of this
    process's curvature state."""

    def __init__(self, results: dict, backend: str, curvature) -> None:
        self.results, self.backend, self.curvature = results, backend, curvature

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        curvature = self.curvature()
        self.results[self.backend] = {"weights": full_weights(pl_module.model),
                                      "memory": curvature.memory_footprint()["total"],
                                      "sharded": is_sharded(pl_module.model)}


def gathered(model: torch.nn.Module) -> bool:
    """Whether some FSDP2-managed parameter is registered unsharded (a plain tensor, not its `DTensor` shard)."""
    from torch.distributed.tensor import DTensor

    return is_sharded(model) and not all(isinstance(p, DTensor) for p in model.parameters())


class Probe(pl.Callback):
    """Whether the model's parameters were left gathered just before the request starts (`hook`: the callback's
    request is in `on_train_end`, the module's in its own `on_train_start`; callbacks run before the module)."""

    def __init__(self, hook: str) -> None:
        self.hook, self.seen = hook, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hook == "on_train_start":
            self.seen = gathered(pl_module.model)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hook == "on_train_end":
            self.seen = gathered(pl_module.model)


class Frozen(pl.LightningModule):
    """The user's module for the drop-in callback: trains with lr 0, sharded by FSDP2 under ModelParallelStrategy."""

    def __init__(self) -> None:
        super().__init__()
        self.model = small_causal_lm(ARCH, seed=0)

    def configure_model(self) -> None:
        if getattr(self.trainer.strategy, "device_mesh", None) is not None:
            shard_model(self.model, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Validated(Frozen):
    """The user's module with a validation loop (forward passes without a backward, before and after training)."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)


def lightning_run(driver: str, world: int) -> tuple[dict, int]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    validate = driver.endswith("_val")  # sanity validation before training, a validation epoch after it
    driver = driver.removesuffix("_val")
    val = {"val_dataloaders": DataLoader(FORGET, batch_size=2)} if validate else {}
    results: dict = {}
    rank = 0
    for backend in ("kfac",) if validate else BACKENDS:
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if world > 1 else "auto"
        common = dict(accelerator="cpu", devices=world, strategy=strategy, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
        if driver == "callback":
            callback = Unlearn(forget=DataLoader(FORGET, batch_size=2), retain=DataLoader(RETAIN, batch_size=2),
                               curvature=backend, steps=2, curvature_kwargs=backend_kwargs(backend),
                               method_kwargs=SEARCH_OFF, **FIXED)
            capture = Capture(results, backend, lambda c=callback: c.last_result.unlearner.curvature)
            probe = Probe("on_train_end")
            trainer = pl.Trainer(max_epochs=1, callbacks=[probe, callback, capture], **common)
            trainer.fit(Validated() if validate else Frozen(), DataLoader(RETAIN, batch_size=2), **val)
        else:
            module = UnlearningModule(small_causal_lm(ARCH, seed=0), curvature=backend, holdout_batches=0,
                                      curvature_kwargs=backend_kwargs(backend), method_kwargs=SEARCH_OFF, **FIXED)
            module.set_curvature_data(DataLoader(RETAIN, batch_size=2))
            train = CombinedLoader({"forget": DataLoader([stack(FORGET)] * 2, batch_size=None),
                                    "retain": DataLoader([stack(RETAIN[:4])] * 2, batch_size=None)}, "max_size_cycle")
            capture = Capture(results, backend, lambda m=module: m.unlearner.curvature)
            probe = Probe("on_train_start")
            trainer = pl.Trainer(max_steps=2, callbacks=[probe, capture], **common)
            trainer.fit(module, train, **val)
        results[backend]["gathered_before"] = probe.seen
        rank = trainer.global_rank
    leave_process_group()  # once, after the last run (the next Trainer reuses the group)
    return results, rank


def fabric_run(world: int, eval_first: bool = False) -> tuple[dict, int]:
    from lightning.fabric.strategies import ModelParallelStrategy

    def parallelize(model, mesh):
        return shard_model(model, mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh)

    strategy = (ModelParallelStrategy(parallelize_fn=parallelize, data_parallel_size=world, tensor_parallel_size=1)
                if world > 1 else "auto")
    fabric = Fabric(accelerator="cpu", devices=world, strategy=strategy)
    fabric.launch()
    results: dict = {}
    for backend in ("kfac",) if eval_first else BACKENDS:
        model = fabric.setup(small_causal_lm(ARCH, seed=0))
        if eval_first:  # an evaluation of the sharded model before the request: no backward, the root stays gathered
            with torch.no_grad():
                model(**stack(FORGET[:2]))
        inner = model.module if hasattr(model, "module") else model
        gathered_before = gathered(inner)
        run = fabric_unlearn(fabric, model, DataLoader(FORGET, batch_size=2), DataLoader(RETAIN, batch_size=2),
                             curvature=backend, steps=2, curvature_kwargs=backend_kwargs(backend), **FIXED,
                             **SEARCH_OFF)
        results[backend] = {"weights": full_weights(inner),
                            "memory": run.unlearner.curvature.memory_footprint()["total"],
                            "sharded": is_sharded(inner), "gathered_before": gathered_before}
    rank = fabric.global_rank
    leave_process_group()
    return results, rank


def curvature_run(out: Path, world: int) -> None:
    """A diagonal-Fisher checkpoint accumulated during training by `CurvatureCallback` (written to `out`)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if world > 1 else "auto"
    callback = CurvatureCallback("diagonal", every_n_batches=1, path=out)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_epochs=1, logger=False,
                         callbacks=[callback, ProcessGroupTeardown()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Frozen(), DataLoader(RETAIN, batch_size=2))


if __name__ == "__main__":
    out, driver, world = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if driver == "curvature":
        curvature_run(out, world)
        sys.exit(0)
    if driver.startswith("fabric"):
        results, rank = fabric_run(world, eval_first=driver == "fabric_eval")
    else:
        results, rank = lightning_run(driver, world)
    if rank == 0:
        torch.save(results, out)
