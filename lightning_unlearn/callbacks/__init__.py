"""Lightning drivers of the unlearning engine: `CurvatureCallback` and the drop-in `Unlearn` callback.

    trainer = L.Trainer(callbacks=[Unlearn(forget=forget_loader, retain=retain_loader, method="newton",
                                           curvature="kfac", accumulate_every_n_batches=4,
                                           curvature_path="curvature.pt")])
    trainer.fit(my_lightning_module, datamodule=my_data)   # trains, keeps a curvature checkpoint, then unlearns

Thin drivers: every computation is the engine's (`lightning_unlearn.curvature`, `lightning_unlearn.methods`).
This module only decides *when* (cadence, `should_accumulate`, `should_unlearn`), *on what* (the unwrapped model
returned by `model_getter`, batches moved to the module's device, curvature batches sharded across ranks) and
*how statistics meet* (the strategy's all-reduce as the engine's `reduce`); a deletion request is
`lightning_unlearn.request.serve_request`, the same function every driver calls, with the settings of
`lightning_unlearn.settings.UnlearnSettings` (whose defaults are this callback's). Texts never reach a logger: only
the numbers of each `StepRecord` are logged.
"""

from .curvature_callback import (
    BatchTransform,
    CheckpointsPredateUnlearningWarning,
    CurvatureCallback,
    CurvatureResumeWarning,
    ModelGetter,
    ProcessGroupTeardown,
    default_model_getter,
)
from .unlearn import Unlearn

__all__ = ["BatchTransform", "CheckpointsPredateUnlearningWarning", "CurvatureCallback", "CurvatureResumeWarning",
           "ModelGetter", "ProcessGroupTeardown", "Unlearn", "default_model_getter"]
