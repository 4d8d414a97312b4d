"""The TOFU-faithful benchmark's training loop and the small checks of its models (`tofu_experiment`).

`fit_adamw` is the one optimisation recipe of its pretraining and finetuning (AdamW, linear warmup, cosine decay,
clipping) over streams of weighted batches (`block_stream`: packed text blocks); `file_lock` lets one process train
a cached model while the others wait. The checks are not the benchmark's metrics: `answer_scores` (per-question
answer NLL and whether greedy decoding reproduces the answer exactly: all answer tokens are the argmax under teacher
forcing), `choice_accuracy` (the right answer's total NLL below all 5 perturbed answers'), `total_nll`, `token_loss`.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lm import warmup_cosine
from .request import to_device


@contextlib.contextmanager
def file_lock(folder: Path, name: str) -> Iterator[None]:
    """An exclusive advisory lock on `folder/.<name>.lock`: one process trains a cached model (or the tokenizer),
    the others wait, then load it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def block_stream(blocks: Sequence[dict[str, list[int]]], batch_size: int, gen: torch.Generator, pad: int,
                  device: torch.device) -> Iterator[list[tuple[dict[str, torch.Tensor], float]]]:
    """Endless batches of `batch_size` packed blocks, reshuffled every epoch."""
    from .data.tokenize import Collate

    collate = Collate(pad)
    while True:
        order = torch.randperm(len(blocks), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [(to_device(collate([blocks[j] for j in order[i:i + batch_size]]), device), 1.0)]
        if len(order) < batch_size:
            yield [(to_device(collate([blocks[j] for j in order]), device), 1.0)]


def fit_adamw(model: nn.Module, batches: Iterable[list[tuple[dict[str, torch.Tensor], float]]], steps: int, lr: float,
         warmup: int, *, min_lr_ratio: float = 0.1, weight_decay: float = 0.01, clip: float = 1.0,
         on_step: Callable[[int], None] | None = None) -> list[float]:
    """`steps` AdamW steps (linear warmup, cosine to `min_lr_ratio * lr`, gradient clipping) on the weighted sum of
    the mean token NLLs of each step's batches. Returns the per-step losses."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps, min_lr_ratio))
    model.train()
    losses: list[float] = []
    for step, parts in enumerate(batches, start=1):
        if step > steps:
            break
        loss = sum(w * model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
                   for b, w in parts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
    model.eval()
    return losses


def _scored(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch, with the model in eval mode (its mode restored afterwards): the float32 logits before each next
    token [B, T-1, V], the next tokens [B, T-1], the mask of the labelled ones and their log-probabilities."""
    was = model.training
    model.eval()
    try:
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            target = b["labels"][:, 1:]
            mask = target != -100
            lp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            yield logits, target, mask, lp
    finally:
        model.train(was)


@torch.no_grad()
def answer_scores(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the mean NLL of the labelled (answer) tokens [N] and whether every one of them is the argmax
    given the true prefix [N] bool (= greedy decoding from the prompt reproduces the tokenised answer exactly)."""
    nll, exact = [], []
    for logits, target, mask, lp in _scored(model, batches):
        count = mask.sum(-1).clamp_min(1)
        nll.append((-(lp * mask).sum(-1) / count).double().cpu())
        right = (logits.argmax(-1) == target) | ~mask
        exact.append(right.all(-1).cpu())
    if not nll:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.bool)
    return torch.cat(nll), torch.cat(exact)


@torch.no_grad()
def total_nll(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Per example: the summed NLL of the labelled tokens [N] (float64)."""
    out = [(-(lp * mask).sum(-1)).double().cpu() for _, _, mask, lp in _scored(model, batches)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def choice_accuracy(experiment: Any, model: nn.Module, rows: Sequence[dict[str, Any]],
                    answer_key: str = "paraphrased_answer") -> float:
    """Fraction of rows whose `answer_key` has a lower total NLL than each of its 5 perturbed answers (same wording,
    other values: a 6-way multiple choice, chance 1/6)."""
    if not rows:
        return float("nan")
    right = total_nll(model, experiment.qa_batches(rows, answer_key=answer_key))
    k = len(rows[0]["perturbed_answer"])
    flat = [{"question": r["question"], "answer": p} for r in rows for p in r["perturbed_answer"]]
    wrong = total_nll(model, experiment.qa_batches(flat)).view(len(rows), k)
    return float((right.unsqueeze(1) < wrong).all(1).double().mean())


@torch.no_grad()
def token_loss(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean NLL over all labelled tokens (the log of the perplexity)."""
    total, count = 0.0, 0
    for _, _, mask, lp in _scored(model, batches):
        total -= float((lp * mask).sum())
        count += int(mask.sum())
    return total / max(count, 1)
