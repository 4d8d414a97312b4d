"""`ForgetRetainDataModule`: forget, retain, full, test and holdout splits of a text corpus, tokenised and batched.

The forget set is chosen from the training data (by ids, a truthy column, a regex, or a separate forget file) or given
with an explicit retain source (TOFU, MUSE). Forget examples are always materialised (they are few) and never packed,
so every one keeps its `example_id` and its sensitive span; retain, test and holdout may stream. The partition's
helpers and checks (forget rows, disjoint retain, something left to retain) are in `partition.py`.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
import torch
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader

from ..errors import UserInputError
from ..methods.inputs import learned_positions
from .holdout_split import HoldoutSplit
from .partition import (
    COLUMNS,
    FEATURES,
    check_disjoint,
    check_retain_left,
    filter_rows,
    forget_from,
    forget_rows,
    warn_forget_copies,
    warn_source_overlap,
)
from .selection import DEFAULT_MARKERS, Normaliser, Selection, SpanMode
from .sources import AnyDataset, Source, columns_of, describe, load_source, text_column_of
from .tokenize import Collate, Overflow, Tokenise
from .tokenizer import (
    check_same_tokenizer,
    check_token_ids,
    check_tokenizer_fits,
    load_tokenizer,
    train_bpe_tokenizer,
)

SPLITS = ("forget", "retain", "full", "test", "holdout")
CurvatureSplit = Literal["retain", "forget", "full"]


class ForgetTextsInTokenizerWarning(UserWarning):
    """A tokenizer trained by the data module (tokenizer=None) saw the forget texts: its vocabulary may encode them."""


class ForgetRetainDataModule(HoldoutSplit, L.LightningDataModule):
    """Forget and retain data for unlearning.

    Args:
        train: the training corpus D (file, `save_to_disk` folder, dataset name, `datasets` object or list of texts).
        forget: a separate forget source; with `train`, its texts must be training texts (matched by sha256).
        forget_ids / forget_column / forget_regex: choose the forget set inside `train` instead (one way only).
        retain: an explicit retain source (default: the rest of `train`); must not share a text with the forget set.
        test, holdout: explicit sources; otherwise `test_fraction` / `holdout_fraction` of the non-forget training
            texts are set aside by a seeded hash of the text (never trained on; holdout serves membership inference).
        span: "example" (whole-example forgetting), "offsets" (`spans` or `span_start`/`span_end` columns),
            "markers" (`span_markers` around the span in the text) or "regex" (the match, or its `span` group).
        text_column: the column holding the text in every source (never guessed: a missing one is an error).
        tokenizer: a tokenizer, a local path or hub id; None trains a byte-level BPE of `vocab_size` on the
            training text, forget texts included (the original model's tokenizer; `ForgetTextsInTokenizerWarning`),
            and saves it to `tokenizer_dir` (default: `<trainer.default_root_dir>/tokenizer`).
            This one tokenizer tokenises every split; a source's own `input_ids` column is ignored (the text is
            re-tokenised), and refused when its ids do not fit this tokenizer (tokenised with another one).
        packing: pack retain/full/test/holdout into blocks of `max_length` (forget is never packed).
        on_overflow: "truncate" (with a warning) or "error" for examples longer than `max_length`. A forget example
            whose whole span lies beyond `max_length` tokens is always an error (it would keep no label and never be
            unlearned); one whose span is partly cut gets a warning.
        forget_not_in_train: "error" or "warn" when forget texts are not part of `train`.
        combined_mode: `CombinedLoader` mode of the training loader (`min_size`: one pass over the forget set).
        streaming: stream train/retain/test/holdout with `datasets` (sharded per process with
            `split_dataset_by_node`).
    """

    def __init__(
        self,
        train: Source | None = None,
        *,
        forget: Source | None = None,
        forget_ids: Collection[Any] | None = None,
        forget_column: str | None = None,
        forget_regex: str | None = None,
        retain: Source | None = None,
        test: Source | None = None,
        holdout: Source | None = None,
        test_fraction: float = 0.05,
        holdout_fraction: float = 0.05,
        text_column: str = "text",
        id_column: str | None = None,
        source_split: str = "train",
        span: SpanMode = "example",
        span_markers: tuple[str, str] = DEFAULT_MARKERS,
        tokenizer: Any = None,
        vocab_size: int = 1024,
        tokenizer_dir: str | Path | None = None,
        tokenizer_train_examples: int = 200_000,
        max_length: int = 128,
        packing: bool = False,
        on_overflow: Overflow = "truncate",
        forget_not_in_train: Literal["error", "warn"] = "error",
        batch_size: int = 8,
        forget_batch_size: int | None = None,
        eval_batch_size: int | None = None,
        combined_mode: Literal["min_size", "max_size_cycle", "max_size"] = "min_size",
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.selection = Selection(ids=forget_ids, column=forget_column, regex=forget_regex)
        if train is None and forget is None:
            raise UserInputError("no data: give train=<training data> (and a forget selection), or forget=... and "
                                 "retain=...")
        if forget is not None and not self.selection.empty:
            raise UserInputError("choose the forget set one way only: a forget source or forget_ids/forget_column/"
                                 "forget_regex, not both")
        if train is None and not self.selection.empty:
            raise UserInputError("forget_ids/forget_column/forget_regex select inside the training data; give "
                                 "train=...")
        if train is None and retain is None:
            raise UserInputError("with no train source, give retain=... (the data that stays)")
        if forget is None and self.selection.empty:
            raise UserInputError("no forget set: pass forget=<file>, forget_ids=[...], forget_column=<bool column> or "
                                 "forget_regex=<pattern>")
        if span not in ("example", "offsets", "markers", "regex"):
            raise UserInputError(f"span={span!r}; choose 'example', 'offsets', 'markers' or 'regex'")
        if on_overflow not in ("truncate", "error"):
            raise UserInputError(f"on_overflow={on_overflow!r}; choose 'truncate' or 'error'")
        if forget_not_in_train not in ("error", "warn"):
            raise UserInputError(f"forget_not_in_train={forget_not_in_train!r}; choose 'error' or 'warn'")
        if not 0 <= test_fraction + holdout_fraction < 1:
            raise UserInputError("test_fraction + holdout_fraction must lie in [0, 1)")
        for key, value in (("max_length", max_length), ("batch_size", batch_size),
                           ("forget_batch_size", forget_batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserInputError(f"{key}={value!r}; give a positive integer")
        self.train_source, self.forget_source, self.retain_source = train, forget, retain
        self.test_source, self.holdout_source = test, holdout
        self.test_fraction = 0.0 if test is not None else test_fraction
        self.holdout_fraction = 0.0 if holdout is not None else holdout_fraction
        self.text_column, self.id_column, self.source_split = text_column, id_column, source_split
        self.span, self.span_markers = span, tuple(span_markers)
        self.tokenizer_arg, self.vocab_size, self.tokenizer_dir = tokenizer, vocab_size, tokenizer_dir
        self.tokenizer_train_examples = tokenizer_train_examples
        self.max_length, self.packing, self.on_overflow = max_length, packing, on_overflow
        self.forget_not_in_train = forget_not_in_train
        self.batch_size = batch_size
        self.forget_batch_size = forget_batch_size or batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.combined_mode, self.streaming, self.shuffle_buffer = combined_mode, streaming, shuffle_buffer
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer = None
        self.texts: dict[str, AnyDataset] = {}  # normalised rows per split
        self.splits: dict[str, AnyDataset] = {}  # tokenised rows per split
        self._pretokenised: dict[str, int] = {}  # source description -> the largest id of its own input_ids

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Build the splits, get (or train) the tokenizer, tokenise; idempotent. Checks the trainer's model fits."""
        if not self.splits:
            if not self.texts:
                self._build_texts()
            self._ensure_tokenizer()
            self._check_pretokenised()
            self._tokenise()
        model = getattr(self.trainer, "lightning_module", None) if self._trainer_attached() else None
        if model is not None:
            self.check_model(model)

    def _trainer_attached(self) -> bool:
        return getattr(self, "trainer", None) is not None

    def check_model(self, model: nn.Module) -> None:
        """Raise a clear error when the tokenizer's vocabulary is larger than the model's embedding, when it is not
        the tokenizer saved with the model (same size or not), or when the batches would be longer than the model's
        learned positions (`max_length` beyond them)."""
        if self.tokenizer is None:
            self.setup()
        check_tokenizer_fits(self.tokenizer, model)
        check_same_tokenizer(self.tokenizer, model)
        self.position_limit = learned_positions(model)
        for name in self.splits:
            self._check_positions(name)

    def _check_positions(self, name: str) -> None:
        """Refuse a tokenised split with sequences longer than the model's learned positions (an IndexError deep
        inside the model otherwise): packed or streamed splits are `max_length` long, others as long as their longest
        example."""
        limit = getattr(self, "position_limit", None)
        if limit is None or self.max_length <= limit or name not in self.splits:
            return
        ds = self.splits[name]
        if isinstance(ds, Dataset) and not (self.packing and name != "forget"):
            longest = max((len(ids) for ids in ds["input_ids"]), default=0)
        else:
            longest = self.max_length
        if longest > limit:
            raise UserInputError(f"max_length={self.max_length} is more than the model's {limit} positions: {name} "
                                 f"examples are up to {longest} tokens long, and the model has no position beyond "
                                 f"{limit}; set max_length={limit} (data.max_length) or less")

    def _load(self, source: Source, name: str, streaming: bool) -> tuple[AnyDataset, str]:
        """Load one source; refuse an empty one or one without the text column, naming it."""
        ds = load_source(source, split=self.source_split, streaming=streaming, name=name,
                         text_column=self.text_column)
        where = describe(source, name)
        col = text_column_of(ds, self.text_column, where)
        empty = len(ds) == 0 if isinstance(ds, Dataset) else next(iter(ds), None) is None
        if empty:
            what = "the forget set is empty: " if name == "forget" else ""
            raise UserInputError(f"{what}the {where} has no examples (an empty file, blank lines only, or a header "
                                 "without rows); give data with at least one example")
        if "input_ids" in columns_of(ds) and isinstance(ds, Dataset):
            top = max((max(ids, default=-1) for ids in ds["input_ids"] if ids is not None), default=-1)
            self._pretokenised[where] = int(top)
        return ds, col

    def _check_pretokenised(self) -> None:
        """A source's own `input_ids` are not used (its text is re-tokenised by the one tokenizer); ids beyond
        this tokenizer's vocabulary mean that source was tokenised with another tokenizer."""
        for where, top in self._pretokenised.items():
            check_token_ids(top, self.tokenizer, where)

    def _normalise(self, ds: AnyDataset, col: str, role: str, offset: int = 0, *, source: Source | None = None,
                   name: str | None = None, ids_used: bool = False) -> AnyDataset:
        """Normalise one source's rows (see `Normaliser`). `id_column` is required only where ids are matched
        (`ids_used`: the training data); a source without it (a holdout file, a forget file) gets row numbers.
        `source` and `name` (default: `role`) name the data in messages."""
        id_column = self.id_column
        if id_column is not None and id_column not in columns_of(ds):
            if ids_used:
                raise UserInputError(
                    f"id_column {id_column!r} is not a column of the {role} data (columns: {columns_of(ds)}); give "
                    "the column that holds the ids (forget_ids are matched against it), or id_column=None to match "
                    "forget_ids against row numbers")
            id_column = None
        where = describe(source, name or role) if source is not None else ""
        fn = Normaliser(text_column=col, id_column=id_column, selection=self.selection, span=self.span,
                        markers=self.span_markers, seed=self.seed, test_fraction=self.test_fraction,
                        holdout_fraction=self.holdout_fraction, id_offset=offset, role=role, source=where)
        if isinstance(ds, Dataset):
            return ds.map(fn, with_indices=True, remove_columns=ds.column_names, features=FEATURES,
                          load_from_cache_file=False, keep_in_memory=True)
        return ds.map(fn, with_indices=True, features=FEATURES).select_columns(COLUMNS)

    def _build_texts(self) -> None:
        stream = self.streaming
        forget_src = None
        if self.forget_source is not None:
            fds, col = self._load(self.forget_source, "forget", streaming=False)
            forget_src = self._normalise(fds, col, "forget", source=self.forget_source)
            self.selection.hashes = set(forget_src["text_sha256"]) if self.train_source is not None else None
        if self.train_source is not None:
            tds, col = self._load(self.train_source, "train", stream)
            pool = self._normalise(tds, col, "train", source=self.train_source, ids_used=True)
            selected, n_train = forget_rows(pool)
            forget = forget_from(selected, forget_src, self.selection, self.id_column,
                                 self.forget_not_in_train)
        else:
            forget, n_train = forget_src, 0
            rds, col = self._load(self.retain_source, "retain", stream)
            pool = self._normalise(rds, col, "train", offset=len(forget), source=self.retain_source,
                                   name="retain")
        hashes = set(forget["text_sha256"])
        if self.train_source is not None and self.retain_source is None:
            retain = filter_rows(pool, lambda r: r["split"] == "train" and r["text_sha256"] not in hashes)
            check_retain_left(forget, retain, n_train, self.selection, self.test_fraction, self.holdout_fraction)
            full = filter_rows(pool, lambda r: r["split"] in ("train", "forget"))
            warn_forget_copies(pool, hashes, ("train", "test", "holdout"))
        else:
            if self.train_source is not None:
                rds, col = self._load(self.retain_source, "retain", stream)
                retain = check_disjoint(self._normalise(rds, col, "retain", offset=n_train,
                                                        source=self.retain_source), hashes)
                warn_forget_copies(pool, hashes, ("test", "holdout"))
            else:  # the retain source is the pool: none of it (test and holdout shares too) may be a forget text
                pool = check_disjoint(pool, hashes)
                retain = filter_rows(pool, lambda r: r["split"] == "train")
            if self.train_source is not None:
                full = filter_rows(pool, lambda r: r["split"] in ("train", "forget"))
            else:
                f = forget.to_iterable_dataset() if isinstance(retain, IterableDataset) else forget
                full = datasets.concatenate_datasets([f, retain])
        self.texts = {"forget": forget, "retain": retain, "full": full}
        for name, source in (("test", self.test_source), ("holdout", self.holdout_source)):
            if source is not None:
                ds, col = self._load(source, name, stream)
                self.texts[name] = self._normalise(ds, col, name, source=source)
                warn_source_overlap(self.texts[name], hashes, describe(source, name))
            else:  # a held-out share of the training data, less unselected copies of forget texts
                self.texts[name] = filter_rows(pool, lambda r, n=name: r["split"] == n
                                               and r["text_sha256"] not in hashes)

    # ------------------------------------------------------------------ tokenizer
    def _ensure_tokenizer(self) -> None:
        if self.tokenizer is not None:
            return
        if self.tokenizer_arg is not None:
            self.tokenizer = load_tokenizer(self.tokenizer_arg)
            return
        save_dir = self.tokenizer_dir
        if save_dir is None and self._trainer_attached():
            save_dir = Path(self.trainer.default_root_dir) / "tokenizer"
        if save_dir is not None and (Path(save_dir) / "tokenizer.json").exists():
            self.tokenizer = load_tokenizer(save_dir)
            return
        full = self.texts["full"]
        n_forget = len(self.texts["forget"])
        warnings.warn(
            f"tokenizer=None: the tokenizer is trained on the training texts, the {n_forget} forget example(s) "
            "included (it is the original model's tokenizer, and a tokenizer trained without them would give other "
            "token ids); its vocabulary can hold pieces of the forget texts and is saved with the unlearned model; "
            "to keep them out, train the tokenizer without the forget texts before the model is trained and pass "
            "tokenizer=<it> (see docs/data.md)", ForgetTextsInTokenizerWarning, stacklevel=3)
        if isinstance(full, Dataset):
            texts = (t for t in full.select(range(min(len(full), self.tokenizer_train_examples)))["text"])
        else:
            texts = (r["text"] for r in full.take(self.tokenizer_train_examples))
        self.tokenizer = train_bpe_tokenizer(texts, vocab_size=self.vocab_size, save_dir=save_dir)

    def save_tokenizer(self, path: str | Path) -> None:
        """Save the tokenizer (`save_pretrained`) so the run can be reloaded offline."""
        self.setup()
        self.tokenizer.save_pretrained(str(path))

    # ------------------------------------------------------------------ tokenise and load
    def _tokenise(self, names: tuple[str, ...] = ("forget", "retain")) -> None:
        """Tokenise the named splits (the rest are tokenised on first use, see `split`)."""
        rank, world = self._rank_world()
        for name in names:
            if name in self.splits:
                continue
            ds = self.texts[name]
            # forget is never packed (every example keeps its id and span), nor a span-labelled holdout (the target
            # compares per-example losses of the two)
            packing = self.packing and name != "forget" and not (name == "holdout" and self._labelling(name) != "text")
            fn = Tokenise(self.tokenizer, max_length=self.max_length, packing=packing, on_overflow=self.on_overflow,
                          split=name)
            if isinstance(ds, Dataset):
                # the forget set (few rows) in one batch: its truncation check counts the whole set
                out = ds.map(fn, batched=True, batch_size=None if name == "forget" else 1000,
                             remove_columns=ds.column_names, load_from_cache_file=False, keep_in_memory=True)
            else:
                out = ds.map(fn, batched=True, remove_columns=COLUMNS)
                if world > 1:
                    out = split_dataset_by_node(out, rank=rank, world_size=world)
            self.splits[name] = out
            self._check_positions(name)

    def split(self, name: str) -> AnyDataset:
        """The tokenised split `name` (`input_ids`, `labels`, `example_id` rows)."""
        if name not in SPLITS:
            raise UserInputError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        self.setup()
        self._tokenise((name,))
        return self.splits[name]

    def _rank_world(self) -> tuple[int, int]:
        if self._trainer_attached():
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def dataloader(self, split: str, *, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        """A loader over one split (`forget`, `retain`, `full`, `test`, `holdout`) of batch dicts; an empty split
        is an error naming it (instead of a loader of zero batches)."""
        ds = self.split(split)
        if isinstance(ds, Dataset) and len(ds) == 0:
            fix = {"test": "set test_fraction > 0 or give test=<data>",
                   "holdout": "set holdout_fraction > 0 or give holdout=<data>"}.get(
                       split, "check the data and the forget selection")
            raise UserInputError(f"the {split} split is empty (0 examples), so it has no batch; {fix}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise UserInputError(f"batch_size={batch_size!r} for the {split} loader; give a positive integer")
        kwargs: dict[str, Any] = {}
        if shuffle and isinstance(ds, IterableDataset):
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        elif shuffle:
            kwargs = {"shuffle": True, "generator": torch.Generator().manual_seed(self.seed)}
        return DataLoader(ds, batch_size=self.batch_size if batch_size is None else batch_size,
                          collate_fn=Collate(self.tokenizer.pad_token_id, split=split),
                          num_workers=self.num_workers, **kwargs)

    def curvature_dataloader(self, split: CurvatureSplit = "retain", batch_size: int | None = None) -> DataLoader:
        """A deterministic, unshuffled loader for curvature statistics over `retain`, `forget` or `full`."""
        if split not in ("retain", "forget", "full"):
            raise UserInputError(f"curvature data {split!r} is not a split; choose 'retain', 'forget' or 'full'")
        return self.dataloader(split, shuffle=False, batch_size=batch_size)

    def train_dataloader(self) -> CombinedLoader:
        """Forget and retain batches together: each step gets `{"forget": batch, "retain": batch}`."""
        return CombinedLoader({"forget": self.dataloader("forget", shuffle=True, batch_size=self.forget_batch_size),
                               "retain": self.dataloader("retain", shuffle=True)}, mode=self.combined_mode)

    def _eval_loaders(self, names: tuple[str, ...]) -> CombinedLoader:
        self.setup()
        loaders = {n: self.dataloader(n, batch_size=self.eval_batch_size) for n in names
                   if not (isinstance(self.texts[n], Dataset) and len(self.texts[n]) == 0)}
        return CombinedLoader(loaders, mode="sequential")

    def val_dataloader(self) -> CombinedLoader:
        """Forget and test splits, one after the other (`dataloader_idx` tells them apart)."""
        return self._eval_loaders(("forget", "test"))

    def test_dataloader(self) -> CombinedLoader:
        """Forget, retain, test and holdout splits, one after the other."""
        loaders = self._eval_loaders(("forget", "retain", "test", "holdout"))
        problem = self.holdout_problem()
        if problem is not None and self._labelling("holdout") != "none":
            warnings.warn(f"the holdout's losses and the membership inference (forget vs holdout) compare unlike "
                          f"data: {problem}", UserWarning, stacklevel=2)
        return loaders

    # ------------------------------------------------------------------ facts for reports
    @property
    def forget_example_ids(self) -> list[int]:
        """The `example_id`s of the forget set (never the texts)."""
        self.setup()
        return list(self.texts["forget"]["example_id"])

    @property
    def forget_sha256(self) -> list[str]:
        """sha256 of every forget text, for reports and audit without exposing the texts."""
        self.setup()
        return list(self.texts["forget"]["text_sha256"])
