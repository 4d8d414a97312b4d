"""The holdout split of `ForgetRetainDataModule` (a mixin): the never-trained data the unlearning target is
calibrated on, checked to be of the forget set's kind and labelled like it (its spans with span-level forgetting), and
the loader a fit takes it from. Without such data a target means nothing: the command refuses or warns instead of
reporting success (`docs/data.md`).

It reads what the data module sets: `span`, `holdout_source`, `holdout_fraction`, `texts`, `_build_texts`, `setup`
and `dataloader`.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from datasets import Dataset
from torch.utils.data import DataLoader

from ..errors import UserInputError
from .sources import describe


class HoldoutSplit:
    """How the holdout is labelled, why it cannot calibrate the target, and its loader (see the module docstring)."""

    span: str
    holdout_source: Any
    holdout_fraction: float
    texts: dict[str, Any]

    def _labelling(self, name: str) -> Literal["spans", "text", "mixed", "none"]:
        """How the rows of split `name` are labelled: all on their spans, all on every token (whole text), some
        each way, or no rows (a streaming split: judged on its first 256 rows)."""
        if name == "holdout" and self.holdout_source is None and self.holdout_fraction == 0:
            return "none"
        if not self.texts:
            self._build_texts()
        ds = self.texts[name]
        if isinstance(ds, Dataset):
            spans = ds["spans"]
        elif self.span == "example" or (name == "holdout" and self.holdout_source is None):
            return "text"  # streamed rows that never get spans (read to the end only when used)
        else:
            spans = [r["spans"] for r in ds.take(256)]
        if not spans:
            return "none"
        with_spans = sum(1 for s in spans if s)
        return "spans" if with_spans == len(spans) else "text" if with_spans == 0 else "mixed"

    def holdout_problem(self) -> str | None:
        """Why the holdout split cannot calibrate the unlearning target, or None when it can: with span-level
        forgetting (`span` other than "example") the holdout must be never-trained examples of the forget set's
        kind labelled on their spans too (e.g. never-inserted canaries labelled on their secret); whole texts
        labelled on every token, or no holdout at all, give no meaningful target."""
        if self.span == "example":
            return None
        labelling = self._labelling("holdout")
        if labelling == "spans":
            return None
        forget = f"the forget set is labelled on its spans (span={self.span!r})"
        if labelling == "none":
            what = "there is no holdout data (holdout_fraction=0 and no holdout=...)"
        elif self.holdout_source is None:
            what = ("the holdout is whole training texts (holdout_fraction) labelled on every token, so the target "
                    "(forget losses at the holdout's median) compares the spans with ordinary text and may be met "
                    "before any step")
        else:
            ds = self.texts["holdout"]
            count = (f"{sum(1 for sp in ds['spans'] if not sp)} of {len(ds)}" if isinstance(ds, Dataset)
                     else "some")
            where = {"offsets": "no `spans` (or `span_start`/`span_end`) offsets", "markers": "no span markers",
                     "regex": "no match of forget_regex"}[self.span]
            what = (f"{count} examples of the {describe(self.holdout_source, 'holdout')} have {where}, so they are "
                    "labelled on every token and the target (forget losses at the holdout's median) is meaningless")
        return f"{forget} but {what}"

    def holdout_dataloader(self) -> DataLoader | None:
        """The batches the unlearning target is calibrated on (`UnlearningModule` takes them when a fit starts):
        the holdout split, checked to be of the forget set's kind. A span-level forget set with a whole-text or
        missing holdout is refused (`UserInputError` naming the fix: a span-labelled `holdout=`, or
        `holdout_batches=0` on the model for no holdout target); with whole-example forgetting and no holdout data it
        warns and returns None (the run has no holdout target)."""
        self.setup()
        problem = self.holdout_problem()
        if problem is not None:
            raise UserInputError(
                f"{problem}; give holdout=<never-trained examples of the forget set's kind with their spans> "
                "(data.holdout in a config; after `lightning-unlearn demo`: runs/demo/data/holdout.jsonl, never-"
                "inserted canaries), or set holdout_batches=0 on the model (model.holdout_batches) to unlearn "
                "without a holdout target (forget_target=<nats> sets a loss target instead)")
        if self._labelling("holdout") == "none":
            warnings.warn("no holdout data (holdout_fraction=0 and no holdout=...): the unlearning has no holdout "
                          "target, so every step takes the largest step within the retain budget until max_steps; give "
                          "holdout=<never-trained examples of the forget set's kind>, or set holdout_batches=0 on the "
                          "model to silence this", UserWarning, stacklevel=2)
            return None
        return self.dataloader("holdout")
