"""The forget/retain partition of `ForgetRetainDataModule`: the forget rows chosen in the training data or matched
from a forget source, and the checks that forget and retain are disjoint and that something is left to retain.
Messages give counts and row numbers, never the texts, the pattern or the ids.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import datasets
from datasets import Dataset

from ..errors import UserInputError
from .selection import Selection, sorted_ids
from .sources import AnyDataset

#: the columns of a normalised row (`selection.Normaliser`): every split's texts before tokenisation
FEATURES = datasets.Features({
    "text": datasets.Value("string"), "example_id": datasets.Value("int64"), "key": datasets.Value("string"),
    "text_sha256": datasets.Value("string"), "spans": datasets.List(datasets.List(datasets.Value("int64"))),
    "forget": datasets.Value("bool"), "split": datasets.Value("string"),
})
COLUMNS = list(FEATURES)


def filter_rows(ds: AnyDataset, fn: Callable[[dict], bool]) -> AnyDataset:
    """The rows of `ds` for which `fn` is true (in memory, never cached on disk, for a materialised dataset)."""
    if isinstance(ds, Dataset):
        return ds.filter(fn, load_from_cache_file=False, keep_in_memory=True)
    return ds.filter(fn)



def forget_rows(pool: AnyDataset) -> tuple[Dataset, int]:
    """Materialise the selected rows of the training data; count the training rows."""
    if isinstance(pool, Dataset):
        return filter_rows(pool, lambda r: r["forget"]), len(pool)
    rows, n = [], 0
    for row in pool:
        n += 1
        if row["forget"]:
            rows.append(row)
    return Dataset.from_list(rows, features=FEATURES), n



def forget_from(rows: Dataset, forget_src: Dataset | None, selection: Selection, id_column: str | None,
                forget_not_in_train: str) -> Dataset:
    """The forget split: the selected training rows, or the forget source's rows carrying their training ids."""
    sel = selection
    if forget_src is None:
        if sel.ids is not None:
            missing = set(sel._ids) - set(rows["key"])
            if missing:  # counts only: the ids may be secrets
                where = f"column {id_column!r}" if id_column else \
                    "the row numbers (pass id_column=<name> to match a column)"
                raise UserInputError(f"{len(missing)} of the {len(sel._ids)} forget_ids are not in the training "
                                     f"data; ids are matched against {where}")
        if len(rows) == 0:
            if sel.regex is not None:
                raise UserInputError("forget_regex matched no training example; check the pattern (re.search on "
                                     "each text, after span markers are removed)")
            raise UserInputError(f"the forget set is empty: column {sel.column!r} is false for every training "
                                 "example; mark the examples to forget with a true value")
        return rows
    train_id = {}
    for sha, eid in zip(rows["text_sha256"], rows["example_id"]):
        train_id.setdefault(sha, eid)
    missing = [i for i, sha in enumerate(forget_src["text_sha256"]) if sha not in train_id]
    if missing:
        msg = (f"{len(missing)} forget example(s) (rows {sorted_ids(missing)} of the forget source) are not "
               "part of the training data, so there is nothing to unlearn for them; make the forget texts match "
               "training texts exactly, or pass forget_not_in_train='warn'")
        if forget_not_in_train == "error":
            raise UserInputError(msg)
        what = ("none of the forget examples is a training text: the model may never have seen them"
                if len(missing) == len(forget_src) else msg.split("; ")[0])
        warnings.warn(f"{what} (forget_not_in_train='warn': they were kept in the forget set with negative "
                      "example ids)", UserWarning, stacklevel=3)
    return forget_src.map(lambda r, i: {"example_id": train_id.get(r["text_sha256"], -1 - i)}, with_indices=True,
                          load_from_cache_file=False, keep_in_memory=True)



def check_disjoint(retain: AnyDataset, hashes: set[str]) -> AnyDataset:
    """`retain` unchanged, refused when a row holds the text of a forget example (`hashes`: their sha256)."""
    msg = ("forget and retain overlap: {what} the text of a forget example; remove it from the retain source "
           "(or leave retain=None to use the rest of the training data)")
    if isinstance(retain, Dataset):
        bad = [i for i, h in zip(retain["example_id"], retain["text_sha256"]) if h in hashes]
        if bad:
            raise UserInputError(msg.format(what=f"{len(bad)} retain example(s) (ids {sorted_ids(bad)}) have"))
        return retain

    def check(row: dict) -> dict:  # streaming: checked as rows arrive
        if row["text_sha256"] in hashes:
            raise UserInputError(msg.format(what=f"retain example {row['example_id']} has"))
        return row

    return retain.map(check)



def warn_forget_copies(pool: AnyDataset, hashes: set[str], splits: tuple[str, ...]) -> None:
    """Warn, with counts only, when unselected training rows of `pool` that landed in `splits` ("train" = retain,
    "test", "holdout") repeat a forget text: the data module leaves them out of those splits (a forget text is neither
    retained nor unseen data). A streamed pool is filtered as it arrives, uncounted."""
    if not isinstance(pool, Dataset):
        return
    counts = Counter(s for s, h in zip(pool["split"], pool["text_sha256"]) if s in splits and h in hashes)
    if counts:
        where = ", ".join(f"{'retain' if name == 'train' else name} ({counts[name]})" for name in splits
                          if counts[name])
        warnings.warn(f"{sum(counts.values())} training example(s) repeat a forget text without being selected; they "
                      f"were left out of {where} (select every copy to silence this)", UserWarning, stacklevel=3)


def warn_source_overlap(ds: AnyDataset, hashes: set[str], where: str) -> None:
    """Warn, with counts and row ids only, when an explicit test or holdout source holds forget texts: it is meant
    to be data the model never saw, so its losses and the membership inference would compare the forget set with
    itself."""
    if not isinstance(ds, Dataset):
        return
    bad = [i for i, h in zip(ds["example_id"], ds["text_sha256"]) if h in hashes]
    if bad:
        warnings.warn(f"{len(bad)} of the {len(ds)} examples of the {where} (ids {sorted_ids(bad)}) have the text "
                      "of a forget example, but this data should be unseen; remove them from it", UserWarning,
                      stacklevel=3)


def check_retain_left(forget: Dataset, retain: AnyDataset, n_train: int, selection: Selection, test_fraction: float,
                      holdout_fraction: float) -> None:
    """Refuse a forget selection that leaves no retain data (e.g. a regex matching every text); the message
    gives counts only, never the pattern or the ids."""
    n_forget = len(forget)
    if isinstance(retain, Dataset):
        if len(retain) > 0:
            return
    elif n_forget < n_train:  # streaming: only "everything selected" is known before training
        return
    sel = selection
    how = ("forget_regex" if sel.regex is not None else "forget_ids" if sel.ids is not None
           else f"forget_column {sel.column!r}" if sel.column is not None else "the forget source")
    rest = n_train - n_forget
    tail = "" if rest == 0 else (f", and the other {rest} all went to test/holdout (test_fraction="
                                 f"{test_fraction:g}, holdout_fraction={holdout_fraction:g})")
    raise UserInputError(
        f"retain is empty: the forget selection ({how}) selected {n_forget} of {n_train} training examples"
        f"{tail}, so nothing would be kept (retain, test and holdout need the rest); select fewer examples "
        f"(check {how}), or give retain=<the data that stays>")
