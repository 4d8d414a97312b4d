"""Forget and retain data: the DataModule, Secret-Sharer canaries, the embedded synthetic corpus, adapters."""

from .adapters import load_muse, load_muse_privleak, load_tofu, load_tofu_eval, muse_datamodule, tofu_datamodule
from .canaries import Canary, CanaryRegistry, CanarySpace, insert_canaries, make_canaries
from .datamodule import ForgetRetainDataModule, ForgetTextsInTokenizerWarning
from .qa import QACorpus, make_qa_corpus  # noqa: F401  (the TOFU-style QA benchmark)
from .selection import DEFAULT_MARKERS, strip_markers, text_sha256
from .sources import load_source
from .synthetic import synthetic_corpus, synthetic_dataset
from .tokenize import IGNORE, Collate, Tokenise
from .tokenizer import check_token_ids, check_tokenizer_fits, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "Canary", "CanaryRegistry", "CanarySpace", "Collate", "DEFAULT_MARKERS", "ForgetRetainDataModule",
    "ForgetTextsInTokenizerWarning", "IGNORE",
    "Tokenise", "check_token_ids", "check_tokenizer_fits", "insert_canaries", "load_muse", "load_source", "load_tofu",
    "load_muse_privleak", "load_tofu_eval",
    "load_tokenizer", "make_canaries", "muse_datamodule", "tofu_datamodule",
    "strip_markers", "synthetic_corpus", "synthetic_dataset", "text_sha256", "train_bpe_tokenizer",
]
