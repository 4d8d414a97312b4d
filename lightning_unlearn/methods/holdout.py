"""Checks that a holdout can set the target: data the model never saw, of the forget set's kind.

The holdout's loss level is the target of a run (see `lightning_unlearn.methods.target`), so a holdout that is not
never-seen data of the forget set's kind sets the wrong level without a word: the forget batch itself, or a holdout
that contains forget examples, is "reached" after 0 steps; a holdout of trained retain texts stops the run early;
random strings push the forget loss to the level of noise. `Unlearner.check_holdout` runs these cheap checks before
the first step, each message naming what to pass:

- **refused** (`UserInputError`): holdout examples that *are* forget or retain examples (the same token ids over the
  attended positions): the model was trained on them.
- **warned** (`HoldoutWarning`), from the losses before unlearning: a holdout whose mean loss is not above the
  forget set's (the target is met before any step: either the forget set is not memorised or the holdout was trained
  on), or below the retain data's (never-seen data is not easier than data the model was trained on: a holdout below
  it was trained on, or is an easier kind of text than the retain set, so it sets a target the forget set reaches
  before it is forgotten; not "at about the retain level": never-trained text of the training data's kind is at
  about that level on a model that generalises, and is a proper holdout when the forget set is of that kind too);
  and, from the tokens, a holdout whose labelled tokens are mostly tokens that the forget
  set's labels never use (under half of them, and under 3 × what uniformly random tokens would share): random strings,
  another tokenizer, another kind of text. Losses alone cannot tell random strings from a proper holdout on a small
  memorising model (never-seen canary digits cost it as much as random tokens, more than a uniform guess), the
  tokens can.

Counts and losses are reduced across processes, so every process takes the same decision; duplicates are looked for
within each process's share of the data. Messages hold counts and losses, never token ids or text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..curvature.objective import IGNORE_INDEX

Batch = Mapping[str, Tensor]

#: a holdout is "not of the forget set's kind" when fewer of its labelled tokens than this fraction occur among the
#: forget set's labelled tokens ...
MIN_SHARED_TOKENS = 0.5
#: ... and fewer than this multiple of the share that uniformly random tokens would have
CHANCE_MULTIPLE = 3.0


class HoldoutWarning(UserWarning):
    """The holdout does not look like never-seen data of the forget set's kind (see `check_holdout`)."""


def example_keys(batches: Sequence[Batch]) -> list[bytes]:
    """One key per example: its token ids over the attended positions (padding dropped), as bytes."""
    keys = []
    for b in batches:
        ids = b.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            continue  # a custom objective's inputs: no token ids to compare
        mask = b.get("attention_mask")
        for i in range(ids.shape[0]):
            row = ids[i] if not isinstance(mask, Tensor) else ids[i][mask[i].bool()]
            keys.append(row.detach().to("cpu", torch.int64).numpy().tobytes())
    return keys


def labelled_tokens(batches: Sequence[Batch]) -> Tensor:
    """The label ids of every labelled position (labels != -100) of the batches."""
    parts = [b["labels"][b["labels"] != IGNORE_INDEX].detach().cpu().long() for b in batches
             if isinstance(b.get("labels"), Tensor)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def duplicate_counts(holdout: Sequence[Batch], forget: Sequence[Batch], retain: Sequence[Batch]) -> list[float]:
    """[holdout examples that are forget examples, ... that are retain examples, holdout examples] (this share)."""
    keys = example_keys(holdout)
    forget_keys, retain_keys = set(example_keys(forget)), set(example_keys(retain))
    return [float(sum(k in forget_keys for k in keys)), float(sum(k in retain_keys for k in keys)), float(len(keys))]


def shared_token_counts(holdout: Sequence[Batch], forget: Sequence[Batch]) -> list[float]:
    """[labelled holdout tokens that occur among the forget set's labelled tokens, labelled holdout tokens, distinct
    forget label tokens] (this share)."""
    held, seen = labelled_tokens(holdout), labelled_tokens(forget).unique()
    shared = torch.isin(held, seen).sum() if len(held) and len(seen) else torch.tensor(0)
    return [float(shared), float(len(held)), float(len(seen))]


def holdout_findings(*, duplicates: Sequence[float], shared: Sequence[float], vocabulary: int | None,
                     holdout_loss: float, forget_loss: float,
                     retain_loss: float | None) -> tuple[str | None, list[str]]:
    """(the refusal or None, the warnings) from the reduced counts and the losses before unlearning."""
    in_forget, in_retain, examples = duplicates
    fix = ("pass never-trained examples of the forget set's kind, labelled like it (e.g. never-inserted canaries on "
           "their secret, QA pairs of people outside the training data)")
    if in_forget or in_retain:
        parts = [f"{int(n)} are {what} examples" for n, what in ((in_forget, "forget"), (in_retain, "retain")) if n]
        return (f"holdout: of its {int(examples)} examples, {' and '.join(parts)} (the same token ids): the model was "
                f"trained on them, so they cannot set the level of data it never saw; remove them, or {fix}"), []
    warnings = []
    if holdout_loss <= forget_loss:
        warnings.append(
            f"holdout: its loss before unlearning ({holdout_loss:.3g} nats) is not above the forget set's "
            f"({forget_loss:.3g}), so the target is met before any step: either the forget set is not memorised, or "
            f"the holdout was trained on (copies or near-copies of training text); if so, {fix}")
    elif retain_loss is not None and holdout_loss < retain_loss:
        warnings.append(
            f"holdout: its loss before unlearning ({holdout_loss:.3g} nats) is below the retain data's "
            f"({retain_loss:.3g}), and data the model never saw is not easier than its retain data: it looks trained "
            f"on, or is an easier kind of text than the forget set, and sets a target the forget set reaches before "
            f"it is forgotten; {fix}")
    hits, total, distinct = shared
    if total > 0 and distinct > 0:
        share = hits / total
        chance = distinct / vocabulary if vocabulary else 0.0
        if share < MIN_SHARED_TOKENS and share < CHANCE_MULTIPLE * chance:
            warnings.append(
                f"holdout: only {share:.0%} of its labelled tokens occur among the forget set's labelled tokens "
                f"(uniformly random tokens: {chance:.0%}): it does not look like data of the forget set's kind "
                f"(random strings, another tokenizer, other text?), and its loss level is not the one of the forget "
                f"set never seen; {fix}")
    return None, warnings
