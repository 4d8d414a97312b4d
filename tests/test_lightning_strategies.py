"""Sharded strategies are refused at setup with a clear message; requests can arrive during training."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader

from lightning_unlearn.callbacks import CurvatureCallback, Unlearn
from lightning_unlearn.models import small_causal_lm
from lightning_unlearn.module import UnlearningModule
from lightning_unlearn.strategies import UnsupportedStrategyError


class TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = small_causal_lm("gpt2", seed=0)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def ids(n: int, seed: int) -> DataLoader:
    return DataLoader(torch.randint(0, 127, (n, 12), generator=torch.Generator().manual_seed(seed)), batch_size=2)


@pytest.mark.parametrize("callback", [Unlearn(forget=[]), CurvatureCallback("diagonal")])
def test_fsdp_is_refused_at_setup(callback) -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    # FSDP needs a GPU to be built by a Trainer; the check only reads the strategy's type
    trainer._accelerator_connector.strategy = FSDPStrategy()
    with pytest.raises(UnsupportedStrategyError, match=r"does not support the FSDPStrategy strategy.*"
                                                       r"ModelParallelStrategy\(data_parallel_size=N, "
                                                       r"tensor_parallel_size=1\) with .*fully_shard"):
        callback.setup(trainer, TinyLM(), "fit")
    module = UnlearningModule(small_causal_lm("gpt2"))
    module.trainer = trainer
    with pytest.raises(UnsupportedStrategyError, match="UnlearningModule does not support the FSDPStrategy"):
        module.setup("fit")


class RequestAtStep(Unlearn):
    """A deletion request that arrives after the 3rd training batch."""

    def should_unlearn(self, trainer, pl_module) -> bool:
        return trainer.global_step == 3 and self.requests == 0


def test_should_unlearn_serves_a_request_during_training(tmp_path: Path) -> None:
    callback = RequestAtStep(forget=ids(2, 1), retain=ids(4, 2), method="newton", curvature="diagonal",
                             damping=1e-2, scale=0.1, max_retain_increase=None, unlearn_on_train_end=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, callbacks=[callback], logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(TinyLM(), ids(10, 0))
    assert callback.requests == 1 and callback.history and callback.history[0].accepted


def test_unknown_method_and_missing_retain_are_clear() -> None:
    with pytest.raises(ValueError, match="curvature_data must be one of"):
        Unlearn(forget=[], curvature_data="everything")
    with pytest.raises(ValueError, match="unknown unlearning method 'newtonn'; choose one of"):
        Unlearn(forget=ids(2, 1), method="newtonn")  # at construction, before any training
    with pytest.raises(ValueError, match="curvature_data='retain' needs retain="):
        Unlearn(forget=ids(2, 1), curvature="diagonal").unlearn(TinyLM())
