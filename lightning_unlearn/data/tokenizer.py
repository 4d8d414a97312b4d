"""Tokenizers: load a Hugging Face tokenizer, or train a small byte-level BPE offline; check it fits a model."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..errors import UserInputError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int = 1024, min_frequency: int = 2,
                        save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style, lossless) on `texts`; optionally `save_pretrained` it.

    Special tokens: `<|endoftext|>` (eos, also bos) and `<|pad|>`. A small vocabulary suits the tiny demo models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise UserInputError(f"vocab_size={vocab_size} is too small for byte-level BPE; use at least 258 (256 bytes "
                             "+ 2)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   unk_token=None, clean_up_tokenization_spaces=False, padding_side="right")
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


#: the files of a saved tokenizer: a local folder with none of them holds no tokenizer (AutoTokenizer would still
#: load one from its config.json, with an empty vocabulary)
TOKENIZER_FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                          "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
#: a short text every usable tokenizer encodes to at least one token (letters, digits, punctuation, a CJK character:
#: one of them is in any vocabulary)
SAMPLE_TEXT = "Hello, world: the 42 cats. 你好"
#: where to give the right tokenizer, in the message of a folder without one
_TOKENIZER_FIX = ("give the folder with the tokenizer the model was trained with (data.tokenizer in a fit config, "
                  "--tokenizer for evaluate)")


def load_tokenizer(name_or_path: str | Path | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory (or a hub id when online), with a pad token and right padding.

    A tokenizer object that lacks either is copied first: the caller's own object (used elsewhere, e.g. for left-padded
    generation) is never changed.

    Refuses a local folder without tokenizer files (`TOKENIZER_FOLDER_FILES`: a model folder saved without its
    tokenizer) and a tokenizer that encodes `SAMPLE_TEXT` to no token: either would encode every text to nothing,
    and the run would fail much later with an unrelated error."""
    if isinstance(name_or_path, PreTrainedTokenizerBase):
        tok = name_or_path
        if tok.pad_token is None or tok.padding_side != "right":  # the caller's object is never changed
            tok = copy.deepcopy(tok)
    else:
        path = Path(name_or_path).expanduser()
        text = str(name_or_path)
        if (path.is_absolute() or text.startswith((".", "~")) or path.exists()) and not path.exists():
            raise FileNotFoundError(f"tokenizer path {text!r} does not exist; give a saved tokenizer directory, "
                                    "a hub id, or tokenizer=None to train one on the training text")
        if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FOLDER_FILES):
            what = "a model saved without its tokenizer" if (path / "config.json").is_file() else "no tokenizer"
            raise UserInputError(f"the folder {str(path)!r} holds {what} (none of "
                                 f"{', '.join(TOKENIZER_FOLDER_FILES)}): {_TOKENIZER_FIX}")
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else text)
    _check_encodes(tok)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserInputError("the tokenizer has neither a pad nor an eos token; add one with "
                                 "tokenizer.add_special_tokens({'pad_token': ...})")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if not getattr(tok, "is_fast", False):
        raise UserInputError("span-level forgetting and offsets need a fast tokenizer; load it with use_fast=True")
    return tok


def _check_encodes(tok: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer that encodes `SAMPLE_TEXT` to no token (an empty vocabulary: tokenizer files without one,
    or a tokenizer class loaded from a config.json alone). A tokenizer that cannot encode at all (an error) is left
    to fail where it is used, with its own message."""
    try:
        ids = tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    except Exception:  # not this check's problem (see the docstring)
        return
    if len(ids) == 0:
        source = getattr(tok, "name_or_path", None)
        where = f"the tokenizer loaded from {str(source)!r}" if source else "the given tokenizer"
        raise UserInputError(f"{where} encodes every text to no token ({len(tok)} token(s) in its vocabulary, "
                             f"none for {SAMPLE_TEXT!r}): it has no usable vocabulary; {_TOKENIZER_FIX}")


def embedding_rows(model: nn.Module) -> int | None:
    """Number of rows of the model's input embedding (None when no embedding can be found)."""
    inner = getattr(model, "model", model)  # a LightningModule wrapping an HF model as `.model`
    for candidate in (model, inner):
        get = getattr(candidate, "get_input_embeddings", None)
        if callable(get):
            try:
                emb = get()
            except (NotImplementedError, AttributeError):
                emb = None
            if emb is not None and hasattr(emb, "num_embeddings"):
                return int(emb.num_embeddings)
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return int(module.num_embeddings)
    return None


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> None:
    """Raise when the tokenizer can produce ids the model has no embedding for."""
    rows = embedding_rows(model)
    n = len(tokenizer)
    if rows is not None and n > rows:
        raise UserInputError(
            f"the tokenizer has {n} tokens but the model's embedding has only {rows} rows; build the model with "
            f"vocab_size >= {n} (e.g. small_causal_lm(vocab_size=len(tokenizer))), call "
            f"model.resize_token_embeddings({n}), or train a smaller tokenizer (vocab_size={rows})")


def check_token_ids(max_id: int, tokenizer: PreTrainedTokenizerBase | int, where: str = "the data") -> None:
    """Raise when pre-tokenised data holds an id the tokenizer (or a vocabulary of that size) cannot produce: the
    data was tokenised with another tokenizer. `where` names the data ("holdout file 'h.jsonl'")."""
    n = tokenizer if isinstance(tokenizer, int) else len(tokenizer)
    if max_id >= n:
        raise UserInputError(
            f"the {where} holds token id {max_id} but the tokenizer has only {n} tokens: it was tokenised with "
            "another tokenizer; every split must use one tokenizer, so give texts (the data module tokenises them) "
            "or re-tokenise it with this tokenizer")


#: files that hold a saved tokenizer in a model folder
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def check_same_tokenizer(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> None:
    """Refuse a tokenizer that is not the one saved with the model, when the model was loaded from a folder that
    holds one: its vocabulary (token -> id) must be the same. Two tokenizers of the same size give token ids the
    embedding accepts (`check_tokenizer_fits` passes), but every id means another token. Models without a saved
    tokenizer (built in memory, or a folder of weights only) are not checked."""
    inner = getattr(model, "model", model)
    source = getattr(model, "source_path", None) or getattr(getattr(inner, "config", None), "_name_or_path", None)
    if not source:
        return
    folder = Path(source)
    if not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return
    if getattr(tokenizer, "name_or_path", None) and Path(tokenizer.name_or_path).resolve() == folder.resolve():
        return
    try:
        saved = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return  # not a readable tokenizer: nothing to compare with
    if saved.get_vocab() != tokenizer.get_vocab():
        size = (f"both have {len(tokenizer)} tokens" if len(saved) == len(tokenizer)
                else f"{len(tokenizer)} tokens, the model's {len(saved)}")
        raise UserInputError(f"the data's tokenizer is not the one saved with the model in {str(folder)!r} ({size}, "
                             "but other tokens: every token id would mean another token to the model); give the "
                             f"model's tokenizer (data.tokenizer: {str(folder)!r})")
