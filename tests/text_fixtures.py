"""A character-level tokenizer and right-padded batches of short texts, shared by the metric and report tests."""

import string

from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast


def char_tokenizer() -> PreTrainedTokenizerFast:
    chars = list(string.ascii_lowercase + string.digits + " .,:!?'-")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)},
                                                                        merges=[])))
    tok.pad_token = "."
    return tok


def batches(tok, texts, batch_size=3):
    """Right-padded batch dicts (CONVENTIONS): labels = input ids, -100 on padding."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out
