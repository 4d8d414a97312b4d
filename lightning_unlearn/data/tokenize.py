"""Tokenise normalised rows into `input_ids` / `labels` / `example_id`, with truncation or packing, and collate.

Labels follow the Hugging Face convention (aligned with `input_ids`, the model shifts): a forget example with a
sensitive span keeps labels only on the tokens that overlap the span (-100 elsewhere); padding is always -100.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import UserInputError
from .selection import sorted_ids

IGNORE = -100
Overflow = Literal["truncate", "error"]


def span_labels(input_ids: list[int], offsets: list[tuple[int, int]] | None, spans: list[list[int]]) -> list[int]:
    """Labels that keep a token iff its character range overlaps one of `spans` (all tokens when no span)."""
    if not spans:
        return list(input_ids)
    return [tok if any(s < e_tok and s_tok < e for s, e in spans) else IGNORE
            for tok, (s_tok, e_tok) in zip(input_ids, offsets)]


def span_cuts(ids: list[int], rows_labels: list[list[int]], spans: list[list[list[int]]],
              max_length: int) -> tuple[list[int], list[int]]:
    """The ids of span-labelled rows whose labels truncation at `max_length` removes entirely, and of those it
    removes in part (whole-text rows always keep their first tokens' labels). Labels count from position 1: the label
    on a row's first token is never learned from (the model predicts a token from those before it), so a span on the
    first token alone keeps nothing (see `unusable_labels`)."""
    cut, partly = [], []
    for i, labels, sp in zip(ids, rows_labels, spans):
        if not sp:
            continue
        total = sum(1 for lab in labels[1:] if lab != IGNORE)
        kept = sum(1 for lab in labels[1:max_length] if lab != IGNORE)
        if total and not kept:
            cut.append(i)
        elif kept < total:
            partly.append(i)
    return cut, partly


def unusable_labels(ids: list[int], rows_labels: list[list[int]]) -> list[int]:
    """The ids of rows with no label after their first token, before truncation: the first position predicts
    nothing (no token before it), so such a row is never learned from nor unlearned (e.g. a span that covers only the
    first token of its text)."""
    return [i for i, labels in zip(ids, rows_labels) if not any(lab != IGNORE for lab in labels[1:])]


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before every text by default (a Llama-style BOS), or [] (GPT-2 style,
    and the tokenizers `train_bpe_tokenizer` makes): the data module adds them itself, so the model sees what it was
    trained on, while the texts are encoded without special tokens (for their offsets)."""
    try:
        with_special = tokenizer(SAMPLE, add_special_tokens=True)["input_ids"]
        plain = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer that cannot encode fails where it is used, with its own message
        return []
    k = len(with_special) - len(plain)
    if k <= 0 or not plain:
        return []
    for start in range(k + 1):  # the plain encoding inside the special one (specials may follow it: an EOS)
        if with_special[start:start + len(plain)] == plain:
            prefix = list(with_special[:start])
            specials = set(getattr(tokenizer, "all_special_ids", []) or [])
            return prefix if all(t in specials for t in prefix) else []
    return []


#: the text `special_prefix` encodes to find the tokenizer's own prefix
SAMPLE = "Hello world"


@dataclass
class Tokenise:
    """Batched map function: normalised rows -> tokenised rows (one per example, or packed blocks).

    `split` names the split in messages; for "forget" (never packed) a row whose whole span lies beyond
    `max_length` is an error and a partly cut span a warning: truncation would otherwise leave the example with no
    label, so it would silently never be unlearned. The data module maps the forget split as one batch, so the counts
    are of the whole forget set."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 128
    packing: bool = False
    on_overflow: Overflow = "truncate"
    split: str = ""
    prefix: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.prefix = special_prefix(self.tokenizer)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts, ids, spans = batch["text"], batch["example_id"], batch["spans"]
        with_offsets = any(spans)  # offsets cost time; only span-level rows need them
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=with_offsets)
        offsets = enc["offset_mapping"] if with_offsets else [None] * len(texts)
        eos = self.tokenizer.eos_token_id
        rows_ids, rows_labels = [], []
        for tok, off, sp in zip(enc["input_ids"], offsets, spans):
            labels = span_labels(tok, off, sp)
            if self.prefix:  # the BOS the tokenizer adds by default: context, never a label
                tok, labels = self.prefix + tok, [IGNORE] * len(self.prefix) + labels
            if eos is not None:
                tok, labels = tok + [eos], labels + ([IGNORE] if sp else [eos])
            rows_ids.append(tok)
            rows_labels.append(labels)
        if self.packing:
            return self._pack(rows_ids, rows_labels)
        m = self.max_length
        if self.split == "forget":
            unusable = unusable_labels(ids, rows_labels)
            if unusable:
                raise UserInputError(
                    f"{len(unusable)} of {len(ids)} forget examples (ids {sorted_ids(unusable)}) have no usable label:"
                    " their only labelled token is the first of the example (a span on the first token alone, or an "
                    "empty text), whose label is never learned from (the model predicts each token from the tokens "
                    "before it), so they would never be unlearned; widen the span past the first token, or put some "
                    "context before it in the text")
        # span-labelled forget and holdout rows: a row whose span truncation removes has no loss at all (a forget
        # example never unlearned; a holdout example scored as unseen at any loss, which moves the target)
        spanned = self.split in ("forget", "holdout")
        cut, partly = span_cuts(ids, rows_labels, spans, m) if spanned else ([], [])
        if cut:
            harm = "would never be unlearned" if self.split == "forget" else "would have no loss to set the target with"
            raise UserInputError(
                f"{len(cut)} of {len(ids)} {self.split} examples (ids {sorted_ids(cut)}) lost their span to "
                f"truncation at max_length={m}: every labelled token lies beyond the first {m} tokens, so they "
                f"{harm}; raise max_length (data.max_length, at most the model's positions), or "
                f"shorten or split these texts so that the span comes within the first {m} tokens")
        too_long = [i for i, t in zip(ids, rows_ids) if len(t) > m]
        if too_long:
            self._overflow(too_long)
        if partly:
            warnings.warn(f"{len(partly)} of {len(ids)} {self.split} examples (ids {sorted_ids(partly)}) lost part of "
                          f"their span to truncation at max_length={m}: only the span tokens within the first {m} "
                          "count; raise max_length (data.max_length, at most the model's positions), or shorten "
                          "or split these texts", UserWarning, stacklevel=2)
        return {"input_ids": [t[:m] for t in rows_ids], "labels": [lab[:m] for lab in rows_labels],
                "example_id": list(ids)}

    def _overflow(self, too_long: list[int]) -> None:
        which = f"{self.split} example(s)" if self.split else "example(s)"
        what = f"{len(too_long)} {which} (ids {sorted_ids(too_long)}) are longer than max_length={self.max_length}"
        # the forget set is never packed: packing=True only helps the other splits
        packing = "set packing=True for the other splits (the forget set is never packed: shorten or split its " \
            "long texts)" if self.split == "forget" else "set packing=True"
        if self.on_overflow == "error":
            raise UserInputError(f"{what} tokens; raise max_length, {packing}, or pass on_overflow='truncate'")
        warnings.warn(f"{what} tokens and were truncated; raise max_length, {packing}, or pass "
                      "on_overflow='error' to make this an error", UserWarning, stacklevel=2)

    def _pack(self, rows_ids: list[list[int]], rows_labels: list[list[int]]) -> dict[str, list]:
        flat_ids = [t for row in rows_ids for t in row]
        flat_labels = [t for row in rows_labels for t in row]
        m = self.max_length
        blocks = range(0, len(flat_ids), m)
        return {"input_ids": [flat_ids[i:i + m] for i in blocks], "labels": [flat_labels[i:i + m] for i in blocks],
                "example_id": [-1] * len(blocks)}


@dataclass
class Collate:
    """Pad a list of tokenised rows to the longest (right padding) into the batch dict of the conventions.

    `split` only names the split in error messages."""

    pad_token_id: int
    split: str = ""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        where = f"the {self.split} split" if self.split else "the data"
        if not rows:
            raise UserInputError(f"an empty batch (0 rows) of {where}; the split has no examples: check the data "
                                 "and the forget selection")
        if any(len(r["input_ids"]) == 0 for r in rows):
            ids = [int(r["example_id"]) for r in rows if len(r["input_ids"]) == 0]
            raise UserInputError(f"{len(ids)} example(s) of {where} have no tokens (example ids {sorted_ids(ids)}); "
                                 "remove empty texts or give the tokenizer an eos token")
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
            mask[i, :n] = 1
        example_id = torch.as_tensor([int(r["example_id"]) for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "example_id": example_id}
