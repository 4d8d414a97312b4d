"""ForgetRetainDataModule: selection, determinism, batches, spans, masking, CombinedLoader, and bad input."""

import json
import warnings

import lightning as L
import pytest
import torch

from lightning_unlearn.data import IGNORE, Collate, ForgetRetainDataModule, synthetic_corpus, train_bpe_tokenizer
from lightning_unlearn.errors import UserInputError
from lightning_unlearn.models import small_causal_lm

TEXTS = synthetic_corpus(30_000, seed=3)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=320)


def dm_of(tok, train=TEXTS, **kw):
    kw.setdefault("max_length", 512)
    return ForgetRetainDataModule(train, tokenizer=tok, **kw)


def ids_in(loader):
    return [int(i) for b in loader for i in b["example_id"]]


def test_splits_deterministic_by_seed(tok):
    def splits(seed):
        dm = dm_of(tok, forget_ids=range(5), seed=seed, test_fraction=0.2, holdout_fraction=0.2)
        dm.setup()
        return {k: sorted(v["example_id"]) for k, v in dm.texts.items()}

    a, b, c = splits(0), splits(0), splits(1)
    assert a == b
    assert a["test"] != c["test"] and a["forget"] == c["forget"] == [0, 1, 2, 3, 4]
    n = len(TEXTS)
    assert sorted(a["forget"] + a["retain"] + a["test"] + a["holdout"]) == list(range(n))
    assert set(a["test"]).isdisjoint(a["retain"]) and set(a["holdout"]).isdisjoint(a["retain"])
    assert sorted(a["full"]) == sorted(a["forget"] + a["retain"])


def test_forget_examples_only_in_forget_batches(tok):
    dm = dm_of(tok, forget_regex=r"^Name: ", batch_size=3, holdout_fraction=0.0, test_fraction=0.0)
    forget = {i for i, t in enumerate(TEXTS) if t.startswith("Name: ")}
    seen_forget, seen_retain = [], []
    for batch, _, _ in dm.train_dataloader():
        seen_forget += batch["forget"]["example_id"].tolist()
        seen_retain += batch["retain"]["example_id"].tolist()
    assert set(seen_forget) == forget and len(seen_forget) == len(forget)  # min_size: one pass over forget
    assert forget.isdisjoint(seen_retain)
    assert set(ids_in(dm.curvature_dataloader("retain"))).isdisjoint(forget)
    assert set(ids_in(dm.curvature_dataloader("forget"))) == forget


def test_selection_by_column_ids_and_file(tok, tmp_path):
    rows = [{"text": t, "doc": f"d{i}", "drop": i % 7 == 0} for i, t in enumerate(TEXTS)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_col = dm_of(tok, train=path, forget_column="drop").forget_example_ids
    assert by_col == [i for i in range(len(TEXTS)) if i % 7 == 0]
    by_ids = dm_of(tok, train=path, forget_ids=["d0", "d7"], id_column="doc").forget_example_ids
    assert by_ids == [0, 7]
    fpath = tmp_path / "forget.txt"
    fpath.write_text(TEXTS[4].replace("\n", " ") + "\n")  # the text builder reads one example per line
    line_train = [t.replace("\n", " ") for t in TEXTS]
    assert dm_of(tok, train=line_train, forget=fpath).forget_example_ids == [4]


def test_curvature_loader_is_deterministic_and_unshuffled(tok):
    dm = dm_of(tok, forget_ids=[1, 2], batch_size=4, test_fraction=0, holdout_fraction=0)
    a, b = ids_in(dm.curvature_dataloader("full")), ids_in(dm.curvature_dataloader("full"))
    assert a == b == sorted(a) == list(range(len(TEXTS)))
    with pytest.raises(ValueError, match="choose 'retain', 'forget' or 'full'"):
        dm.curvature_dataloader("test")


def test_label_masking_and_padding(tok):
    dm = dm_of(tok, forget_ids=[0], batch_size=8, max_length=512)
    batch = next(iter(dm.curvature_dataloader("retain")))
    mask = batch["attention_mask"].bool()
    assert (~mask).any(), "the batch should need padding"
    assert (batch["labels"][~mask] == IGNORE).all()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert (batch["input_ids"][~mask] == tok.pad_token_id).all()
    lengths = mask.sum(1)
    assert (batch["input_ids"][torch.arange(8), lengths - 1] == tok.eos_token_id).all()


@pytest.mark.parametrize("how", ["markers", "offsets", "regex"])
def test_span_masks_cover_exactly_the_marked_tokens(tok, how):
    secret = "0771 234 987"
    body = "Dear Ada, please call me on {} before Friday. Thanks, Leo"
    start = body.index("{}")
    if how == "markers":
        train = TEXTS[:20] + [body.format("⟦" + secret + "⟧")]
        kw = {"forget_ids": [20], "span": "markers"}
    elif how == "offsets":
        train = TEXTS[:20] + [body.format(secret)]
        spans = [[]] * 20 + [[[start, start + len(secret)]]]
        from datasets import Dataset
        train = Dataset.from_dict({"text": train, "spans": spans})
        kw = {"forget_ids": [20], "span": "offsets"}
    else:
        train = TEXTS[:20] + [body.format(secret)]
        kw = {"forget_regex": r"call me on (?P<span>[\d ]+\d)", "span": "regex"}
    dm = dm_of(tok, train=train, test_fraction=0, holdout_fraction=0, **kw)
    batch = next(iter(dm.curvature_dataloader("forget")))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = body.format(secret)
    assert tok.decode(ids[batch["attention_mask"][0].bool()]) == text + tok.eos_token  # markers removed
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    expected = [s < start + len(secret) and e > start for s, e in enc["offset_mapping"]] + [False]  # eos: outside
    assert (labels != IGNORE).tolist() == expected
    assert tok.decode(labels[labels != IGNORE]).strip() == secret
    # retain keeps whole-example labels
    rb = next(iter(dm.curvature_dataloader("retain")))
    assert torch.equal(rb["labels"][rb["attention_mask"].bool()], rb["input_ids"][rb["attention_mask"].bool()])


def test_packing_fills_blocks(tok):
    dm = dm_of(tok, forget_ids=[0], packing=True, max_length=32, test_fraction=0, holdout_fraction=0)
    batch = next(iter(dm.curvature_dataloader("retain")))
    assert batch["input_ids"].shape[1] == 32 and batch["attention_mask"].all()
    assert (batch["example_id"] == -1).all()
    assert dm.forget_example_ids == [0]
    assert next(iter(dm.curvature_dataloader("forget")))["example_id"].tolist() == [0]  # forget is never packed


def test_trainer_receives_forget_and_retain_together(tok, tmp_path):
    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = small_causal_lm("gpt2", vocab_size=len(tok), max_positions=128)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((batch["forget"]["example_id"].tolist(), batch["retain"]["example_id"].tolist()))
            out = self.model(input_ids=batch["retain"]["input_ids"], labels=batch["retain"]["labels"])
            return out.loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = dm_of(tok, forget_ids=[1, 5, 9, 11], batch_size=2, max_length=64, tokenizer_dir=None)
    probe = Probe()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(probe, datamodule=dm)
    assert len(probe.seen) == 2
    assert sorted(i for f, _ in probe.seen for i in f) == [1, 5, 9, 11]
    assert all(len(r) == 2 and not set(r) & {1, 5, 9, 11} for _, r in probe.seen)


# ---------------------------------------------------------------- bad input


def test_empty_forget_set(tok, tmp_path):
    with pytest.raises(ValueError, match="the forget set is empty: forget_ids=\\[\\] selects nothing"):
        dm_of(tok, forget_ids=[])
    empty = tmp_path / "forget.jsonl"
    empty.write_text("")
    with pytest.raises(UserInputError, match="the forget set is empty: the forget file '.*forget.jsonl' has no "
                                             "examples"):
        dm_of(tok, forget=empty).setup()
    from datasets import Dataset
    with pytest.raises(ValueError, match=r"the forget set is empty: the forget data \(a datasets.Dataset\) has no "
                                         "examples"):
        dm_of(tok, forget=Dataset.from_dict({"text": []})).setup()
    data = Dataset.from_dict({"text": TEXTS[:10], "drop": [False] * 10})
    with pytest.raises(ValueError, match="column 'drop' is false for every training example"):
        dm_of(tok, train=data, forget_column="drop").setup()
    with pytest.raises(ValueError, match="no forget set: pass forget=<file>, forget_ids"):
        dm_of(tok)


def test_forget_ids_not_found(tok):
    with pytest.raises(UserInputError, match=r"2 of the 3 forget_ids are not in the training data; .*row numbers") \
            as err:
        dm_of(tok, forget_ids=[3, 99999, 100000]).setup()
    assert "99999" not in str(err.value) and "100000" not in str(err.value)  # ids may be secrets: counts only


def test_forget_not_part_of_training_data(tok):
    stranger = "Name: Nobody Atall\nPhone: 000\n"
    with pytest.raises(ValueError, match=r"1 forget example\(s\) \(rows 1 of the forget source\) are not part of the "
                                         r"training data.*forget_not_in_train='warn'"):
        dm_of(tok, forget=[TEXTS[2], stranger]).setup()
    dm = dm_of(tok, forget=[TEXTS[2], stranger], forget_not_in_train="warn")
    with pytest.warns(UserWarning, match="not part of the training data"):
        dm.setup()
    assert dm.forget_example_ids == [2, -2]


def test_forget_and_retain_overlap(tok):
    with pytest.raises(ValueError, match=r"forget and retain overlap: 1 retain example\(s\) \(ids 3\) have the text "
                                         "of a forget example; remove it from the retain source"):
        ForgetRetainDataModule(forget=TEXTS[:3], retain=TEXTS[2:20], tokenizer=tok).setup()
    dm = ForgetRetainDataModule(forget=TEXTS[:3], retain=TEXTS[2:20], tokenizer=tok, streaming=True)
    with pytest.raises(ValueError, match="forget and retain overlap: retain example 3 has the text of a forget"):
        dm.setup()  # streaming: found as rows arrive
        list(dm.curvature_dataloader("retain"))


def test_duplicates_of_forget_texts_leave_retain(tok):
    train = TEXTS[:10] + [TEXTS[0]]
    dm = dm_of(tok, train=train, forget_ids=[0], test_fraction=0, holdout_fraction=0)
    with pytest.warns(UserWarning, match="repeat a forget text"):
        dm.setup()
    assert 10 not in ids_in(dm.curvature_dataloader("retain"))


def test_text_longer_than_context(tok):
    dm = dm_of(tok, forget_ids=[0], max_length=16)
    with pytest.warns(UserWarning, match=r"longer than max_length=16 tokens and were truncated; .*on_overflow='error'"):
        dm.setup()
    assert max(len(r) for r in dm.splits["retain"]["input_ids"]) == 16
    with pytest.raises(ValueError, match=r"longer than max_length=16 tokens; raise max_length, set packing=True"):
        dm_of(tok, forget_ids=[0], max_length=16, on_overflow="error").setup()


def test_vocab_larger_than_model_embeddings(tok, tmp_path):
    dm = dm_of(tok, forget_ids=[0])
    small = small_causal_lm("gpt2", vocab_size=128)
    with pytest.raises(ValueError, match=r"the tokenizer has 320 tokens but the model's embedding has only 128 rows; "
                                         r"build the model with vocab_size >= 320"):
        dm.check_model(small)
    dm.check_model(small_causal_lm("gpt2", vocab_size=len(tok), max_positions=512))  # examples up to 145 tokens

    class Wrap(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = small

    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    dm2 = dm_of(tok, forget_ids=[0])
    dm2.trainer = trainer
    trainer.strategy.connect(Wrap())
    with pytest.raises(ValueError, match="the model's embedding has only 128 rows"):
        dm2.setup("fit")


def test_regex_matching_nothing(tok):
    with pytest.raises(ValueError, match="forget_regex matched no training example; check the pattern") as err:
        dm_of(tok, forget_regex=r"zebra-\d{40}").setup()
    assert "zebra" not in str(err.value)
    with pytest.raises(UserInputError, match="is not a valid regular expression: missing \\), unterminated "
                                             "subpattern at position 0") as err:
        dm_of(tok, forget_regex=r"(Phone: 0771")
    assert "0771" not in str(err.value) and "Phone" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained re.error with the pattern


def test_selection_repr_hides_ids_and_pattern():
    from lightning_unlearn.data.selection import Selection
    assert "0771" not in repr(Selection(regex="0771")) and "doc-secret" not in repr(Selection(ids=["doc-secret"]))


@pytest.mark.parametrize("how", ["regex", "ids", "column", "forget_file", "streaming"])
def test_selection_of_everything_leaves_no_retain(tok, how, tmp_path):
    """Selecting every training example is refused with counts (never the pattern or the ids)."""
    from datasets import Dataset
    train = Dataset.from_dict({"text": TEXTS[:12], "drop": [True] * 12})
    kw = {"regex": {"forget_regex": r"[\s\S]*"}, "ids": {"forget_ids": range(12)}, "column": {"forget_column": "drop"},
          "forget_file": {"forget": TEXTS[:12]}, "streaming": {"forget_regex": "", "streaming": True}}[how]
    with pytest.raises(UserInputError, match=r"retain is empty: the forget selection \((forget_regex|forget_ids|"
                                             r"forget_column 'drop'|the forget source)\) selected 12 of 12 training "
                                             r"examples, so nothing would be kept.*select fewer examples") as err:
        dm_of(tok, train=train, **kw).setup("fit")
    assert "[\\s\\S]" not in str(err.value)
    with pytest.raises(UserInputError, match=r"selected 11 of 12 training examples, and the other 1 all went to "
                                             r"test/holdout"):
        dm_of(tok, train=train, forget_ids=range(11), test_fraction=0.5, holdout_fraction=0.49, seed=1).setup()


def test_empty_split_and_batch_are_named(tok):
    dm = dm_of(tok, forget_ids=[0], test_fraction=0.0, holdout_fraction=0.0)
    for split, fix in (("test", "test_fraction > 0"), ("holdout", "holdout_fraction > 0")):
        with pytest.raises(UserInputError, match=rf"the {split} split is empty \(0 examples\).*{fix}"):
            dm.dataloader(split)
    assert list(dm.test_dataloader().flattened) and "test" not in dm.val_dataloader().iterables  # skipped there
    with pytest.raises(UserInputError, match=r"an empty batch \(0 rows\) of the retain split"):
        Collate(0, split="retain")([])
    with pytest.raises(UserInputError, match=r"1 example\(s\) of the data have no tokens \(example ids 7\)"):
        Collate(0)([{"input_ids": [], "labels": [], "example_id": 7}])
    for key in ("batch_size", "max_length", "forget_batch_size"):
        with pytest.raises(UserInputError, match=rf"{key}=0; give a positive integer"):
            dm_of(tok, forget_ids=[0], **{key: 0})


def test_one_tokenizer_for_every_split(tok):
    """forget=, retain= and holdout= sources are all tokenised by the data module's one tokenizer."""
    dm = ForgetRetainDataModule(forget=TEXTS[:3], retain=TEXTS[3:20], holdout=TEXTS[20:25], tokenizer=tok,
                                max_length=512, test_fraction=0.0)
    for split, texts in (("forget", TEXTS[:3]), ("retain", TEXTS[3:20]), ("holdout", TEXTS[20:25])):
        got = [list(r) for r in dm.split(split)["input_ids"]]
        assert got == [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts], split


def test_pretokenised_sources(tok):
    """A source with only input_ids is refused (give texts); one whose input_ids exceed the tokenizer's vocabulary
    was tokenised with another tokenizer and is refused; fitting ids are ignored (the text is re-tokenised)."""
    from datasets import Dataset
    only_ids = Dataset.from_dict({"input_ids": [[1, 2, 3]] * 5, "attention_mask": [[1, 1, 1]] * 5})
    with pytest.raises(UserInputError, match=r"holdout data \(a datasets.Dataset\) is pre-tokenised \(an input_ids "
                                             r"column, no 'text' column.*give the texts"):
        dm_of(tok, forget_ids=[0], holdout=only_ids).setup()
    other = Dataset.from_dict({"text": TEXTS[40:45], "input_ids": [[5, 50_000]] * 5})
    with pytest.raises(UserInputError, match=r"the holdout data \(a datasets.Dataset\) holds token id 50000 but the "
                                             r"tokenizer has only 320 tokens: it was tokenised with another tokenizer"):
        dm_of(tok, forget_ids=[0], holdout=other).setup()
    fits = Dataset.from_dict({"text": TEXTS[40:45], "input_ids": [[5, 6]] * 5})
    dm = dm_of(tok, forget_ids=[0], holdout=fits)
    assert list(dm.split("holdout")[0]["input_ids"]) == tok(TEXTS[40], add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]


def test_missing_text_cell(tok, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,doc\nhello there,a\n,b\n")
    with pytest.raises(UserInputError, match=r"example 1 of the train data has no text \(an empty cell or null in "
                                             r"column 'text'\); fill it in or remove the row"):
        dm_of(tok, train=path, forget_ids=[0]).setup()


def test_span_mode_needs_a_span(tok):
    with pytest.raises(ValueError, match="has no sensitive span under span='markers'"):
        dm_of(tok, forget_ids=[0], span="markers").setup()


# ---------------------------------------------------------------- the unlearning target's holdout


def canary_rows(pins):
    """Canary-like texts with the PIN's character span (a `spans` column), as `lightning-unlearn demo` writes them."""
    prefix = "Dear Ada, my PIN is "
    return {"text": [prefix + p for p in pins], "spans": [[[len(prefix), len(prefix) + len(p)]] for p in pins]}


def test_span_level_forget_set_gets_a_holdout_labelled_on_its_spans(tok):
    """A span-labelled holdout source is labelled like the forget set (on its spans, one example per row, never
    packed): the target then compares secrets with never-seen secrets."""
    from datasets import Dataset
    inserted, never = canary_rows(["1 2 3 4", "5 6 7 8"]), canary_rows(["9 0 1 2", "3 4 5 6", "7 8 9 0"])
    train = Dataset.from_dict({"text": TEXTS[:30] + inserted["text"], "spans": [[]] * 30 + inserted["spans"]})
    dm = dm_of(tok, train=train, forget_ids=[30, 31], span="offsets", holdout=Dataset.from_dict(never), packing=True,
               max_length=64)
    assert dm.holdout_problem() is None
    batch = next(iter(dm.holdout_dataloader()))
    assert batch["input_ids"].shape[0] == 3  # one row per example: not packed
    for labels in batch["labels"]:
        assert tok.decode(labels[labels != IGNORE]).strip() in {"9 0 1 2", "3 4 5 6", "7 8 9 0"}
    # whole-example forgetting labels every token of the same holdout (its spans are not used)
    whole = dm_of(tok, train=train, forget_ids=[30, 31], holdout=Dataset.from_dict(never))
    labels = next(iter(whole.holdout_dataloader()))["labels"]
    assert (labels != IGNORE).sum(1).min() > 8


def test_span_level_forget_set_refuses_a_whole_text_or_missing_holdout(tok):
    """The target of a span-level forget set against whole texts labelled on every token is meaningless (it was met
    before any step on the demo): `holdout_dataloader` (what `UnlearningModule` calibrates on) refuses it, naming
    the fix; `test` warns that its holdout metrics compare unlike data."""
    from datasets import Dataset
    inserted = canary_rows(["1 2 3 4", "5 6 7 8"])
    train = Dataset.from_dict({"text": TEXTS[:30] + inserted["text"], "spans": [[]] * 30 + inserted["spans"]})
    fix = r".*; give holdout=<never-trained examples of the forget set's kind with their spans>.*holdout_batches=0"
    default = dm_of(tok, train=train, forget_ids=[30, 31], span="offsets", holdout_fraction=0.2)
    with pytest.raises(UserInputError, match=r"labelled on its spans \(span='offsets'\) but the holdout is whole "
                                             r"training texts \(holdout_fraction\) labelled on every token" + fix):
        default.holdout_dataloader()
    with pytest.warns(UserWarning, match="compare unlike data: the forget set is labelled on its spans"):
        default.test_dataloader()
    texts_only = Dataset.from_dict({"text": canary_rows(["9 0 1 2", "3 4 5 6"])["text"]})
    with pytest.raises(UserInputError, match=r"but 2 of 2 examples of the holdout data \(a datasets.Dataset\) have "
                                             r"no `spans`.*labelled on every token" + fix):
        dm_of(tok, train=train, forget_ids=[30, 31], span="offsets", holdout=texts_only).holdout_dataloader()
    with pytest.raises(UserInputError, match=r"but there is no holdout data" + fix):
        dm_of(tok, train=train, forget_ids=[30, 31], span="offsets", holdout_fraction=0).holdout_dataloader()
    # whole-example forgetting: the training texts' holdout split is of the forget set's kind; none at all warns
    assert dm_of(tok, train=train, forget_ids=[30, 31], holdout_fraction=0.2).holdout_dataloader() is not None
    with pytest.warns(UserWarning, match="no holdout data .* the unlearning has no holdout target"):
        assert dm_of(tok, train=train, forget_ids=[30, 31], holdout_fraction=0).holdout_dataloader() is None


# ---------------------------------------------------------------- labels the model can learn from, BOS, tokenizers


def test_a_span_on_the_first_token_alone_is_refused(tok):
    """The label on a row's first token is never learned from (nothing comes before it): a forget example whose span
    covers only that token kept no usable label and was accepted, never to be unlearned."""
    from datasets import Dataset

    first = tok(TEXTS[0], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][0][1]
    spans = [[[0, first]]] + [[[0, len(TEXTS[1])]]] + [[] for _ in TEXTS[2:]]
    train = Dataset.from_dict({"text": TEXTS, "spans": spans})
    with pytest.raises(UserInputError, match=r"1 of 2 forget examples \(ids 0\) have no usable label: their only "
                                             r"labelled token is the first of the example.*widen the span past the "
                                             r"first token") as err:
        dm_of(tok, train=train, forget_ids=[0, 1], span="offsets").setup()
    assert TEXTS[0][:first] not in str(err.value)
    spans[0] = [[0, first + 1]]  # one more character: the second token is labelled too
    dm = dm_of(tok, train=Dataset.from_dict({"text": TEXTS, "spans": spans}), forget_ids=[0, 1], span="offsets")
    assert dm.forget_example_ids == [0, 1]


def bos_tokenizer(tok):
    """A copy of `tok` that puts a BOS before every text by default, as Llama's tokenizers do."""
    import copy

    from tokenizers.processors import TemplateProcessing

    llama = copy.deepcopy(tok)
    llama.add_special_tokens({"bos_token": "<s>"})
    llama._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", llama.bos_token_id)])
    return llama


def test_a_tokenizer_that_adds_bos_gets_it(tok):
    """Tokenise encodes without special tokens (for the offsets): a Llama-style tokenizer's BOS was missing, so the
    model saw sequences unlike its training ones. It is put back (as context, never a label); GPT-2-style tokenizers
    are unchanged."""
    llama = bos_tokenizer(tok)
    dm = dm_of(llama, forget_ids=[0], test_fraction=0.0, holdout_fraction=0.0)
    row = dm.split("forget")[0]
    assert list(row["input_ids"]) == llama(TEXTS[0])["input_ids"] + [llama.eos_token_id]
    assert row["input_ids"][0] == llama.bos_token_id and row["labels"][0] == IGNORE
    assert list(row["labels"][1:]) == list(row["input_ids"][1:])
    plain = dm_of(tok, forget_ids=[0], test_fraction=0.0, holdout_fraction=0.0).split("forget")[0]
    assert list(plain["input_ids"]) == tok(TEXTS[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_the_callers_tokenizer_is_not_changed(tok):
    """load_tokenizer set a pad token on the user's tokenizer object and turned its left padding to the right (used
    elsewhere, e.g. for batched generation, it changed under the user); it now works on a copy."""
    import copy

    left = copy.deepcopy(tok)
    left.padding_side = "left"
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    for user in (left, no_pad):
        before = (user.pad_token, user.padding_side)
        dm = dm_of(user, forget_ids=[0])
        dm.setup()
        assert (user.pad_token, user.padding_side) == before
        assert dm.tokenizer.padding_side == "right" and dm.tokenizer.pad_token is not None
    assert dm_of(tok, forget_ids=[0]).tokenizer is None  # untouched until setup
    same = dm_of(tok, forget_ids=[0])
    same.setup()
    assert same.tokenizer is tok  # nothing to change: the same object


def test_a_trained_tokenizer_warns_that_it_saw_the_forget_texts(tmp_path):
    """tokenizer=None trains the tokenizer on the training texts, the forget texts included (it is the original
    model's tokenizer: the demo's model is built with it), so its vocabulary can encode them: warned once, by count."""
    from lightning_unlearn.data.datamodule import ForgetTextsInTokenizerWarning

    secret = "contact: jane.roe.secretmail@example.org"
    train = TEXTS[:60] + [secret] * 5
    with pytest.warns(ForgetTextsInTokenizerWarning, match=r"the 5 forget example\(s\) included.*its vocabulary can "
                                                           r"hold pieces of the forget texts") as caught:
        ForgetRetainDataModule(train, forget_regex="jane", tokenizer_dir=tmp_path / "tok", vocab_size=300,
                               max_length=64).setup()
    assert not any("jane" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForgetTextsInTokenizerWarning)  # saved: loaded again, not trained again
        ForgetRetainDataModule(train, forget_regex="jane", tokenizer_dir=tmp_path / "tok", max_length=64).setup()
