"""Regenerate docs/exposure_example.png: canary exposure before/after K-FAC Newton steps on a tiny GPT-2.

    python docs/exposure_example.py        # ~20 s on 2 CPU cores, offline

A character-level GPT-2 is trained on a small corpus with Secret-Sharer canaries inserted 4 or 16 times, then the
secrets (only the secret span is scored) are removed with three guarded `newton` steps (K-FAC curvature from
retain data; a step that raises the retain loss by more than 20 % is undone and retried with more damping).
"""

from __future__ import annotations

import random
import shutil
import string
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from lightning_unlearn.data import make_canaries
from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.metrics import evaluate
from lightning_unlearn.models import small_causal_lm
from lightning_unlearn.report import write_report

HERE = Path(__file__).parent


def char_tokenizer() -> PreTrainedTokenizerFast:
    chars = list(string.ascii_lowercase + string.digits + " .,:!?'-")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)},
                                                                        merges=[])))
    tok.pad_token = "."
    return tok


def batches(tok, texts, batch_size=16, spans=None):
    """Batch dicts; with `spans` (character [start, end) per text) only the span's tokens are scored."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        if spans is not None:  # one character per token
            for row, (start, end) in enumerate(spans[i:i + batch_size]):
                labels[row, :start] = -100
                labels[row, end:] = -100
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def main() -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    tok = char_tokenizer()
    words = ["river", "stone", "garden", "window", "market", "winter", "lamp", "road", "bread", "music"]
    corpus = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(600)]
    registry = make_canaries(4, (4, 16), template="my pin is {d} {d} {d} {d}", length=4, n_references=8)
    canary_texts = [c.text for c in registry.inserted for _ in range(c.repetitions)]
    train = corpus[:500] + canary_texts
    rng.shuffle(train)
    model = small_causal_lm("gpt2", vocab_size=64, hidden=64, layers=2, heads=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    data = batches(tok, train, 32)
    for _ in range(8):
        for batch in data:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    model.eval()
    kw = dict(forget=batches(tok, [c.text for c in registry.inserted]), holdout=batches(tok, corpus[500:540]),
              test=batches(tok, corpus[540:]), canaries=registry, tokenizer=tok, progress=False)
    before = evaluate(model, **kw)
    forget = batches(tok, [c.text for c in registry.inserted], spans=[c.secret_span for c in registry.inserted])
    unlearner = build_unlearner("newton", model, curvature_backend="kfac", damping=1e-2, scale=3.0, steps=3,
                                max_retain_increase=0.2)
    unlearner.fit(forget, batches(tok, corpus[:256], 32))
    after = evaluate(model, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_report(tmp, before=before, after=after, method="newton (kfac)",
                             secrets=[c.secret for c in registry.inserted + registry.references])
        shutil.copyfile(files["exposure_plot"], HERE / "exposure_example.png")
    for key in ("exposure/mean", "exposure/reference_mean", "test/perplexity"):
        print(f"{key}: {before[key]:.3f} -> {after[key]:.3f}")


if __name__ == "__main__":
    main()
