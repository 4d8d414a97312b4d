"""Run every proof-of-forgetting metric over forget / holdout / test data (and canaries) in one call."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

from lightning_unlearn.metrics.exposure import Exposure, canary_specs
from lightning_unlearn.metrics.extraction import ExactMemorization, ExtractionStrength
from lightning_unlearn.metrics.forget_quality import ForgetQuality
from lightning_unlearn.metrics.functional import IGNORE_INDEX, example_loss, model_logits
from lightning_unlearn.metrics.membership import ATTACKS, MembershipInference, attack_scores, privleak

SPLITS = ("forget", "holdout", "test")


class Evaluation(dict):
    """A flat `{name: float}` dict of metrics; `per_example` holds per-example values for plots (no texts)."""

    def __init__(self, *args, per_example: Mapping[str, list] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.per_example: dict[str, list] = dict(per_example or {})


def _loaders(data: Any, forget, holdout, test) -> dict[str, Iterable]:
    """Explicit loaders win; otherwise ask a data module (`dataloader(split)` or `<split>_dataloader()`)."""
    given = {"forget": forget, "holdout": holdout, "test": test}
    out = {}
    for split, loader in given.items():
        if loader is None and data is not None:
            if hasattr(data, f"{split}_dataloader") and split != "test":
                loader = getattr(data, f"{split}_dataloader")()
            elif hasattr(data, "dataloader"):
                try:
                    loader = data.dataloader(split, batch_size=getattr(data, "eval_batch_size", None))
                except (KeyError, ValueError):
                    loader = None
            elif split == "test" and hasattr(data, "test_dataloader"):
                loader = data.test_dataloader()
        if loader is not None:
            out[split] = loader
    return out


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _scored_texts(tokenizer, labels: Tensor) -> list[str] | None:
    """Decoded text of each example's scored tokens (for the zlib attack; stays in memory)."""
    if tokenizer is None:
        return None
    return [tokenizer.decode(row[row != IGNORE_INDEX].tolist()) for row in labels[:, 1:].cpu()]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any = None,
    *,
    forget: Iterable[Mapping[str, Tensor]] | None = None,
    holdout: Iterable[Mapping[str, Tensor]] | None = None,
    test: Iterable[Mapping[str, Tensor]] | None = None,
    canaries: Any = None,
    tokenizer: Any = None,
    reference: nn.Module | None = None,
    k: float = 0.4,
    exposure_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate `model` (in eval mode, batched, restored afterwards) and return a flat dict of floats.

    Data: a data module (`ForgetRetainDataModule` or anything with `dataloader(split)` or `forget_dataloader()`...)
    and/or explicit loaders of batch dicts (`input_ids`, `attention_mask`, `labels`; see CONVENTIONS). `canaries`:
    CanarySpecs or a canary registry (exposure needs a `tokenizer`, default the data module's). `reference`: the
    retrained model; adds the reference-model attack, privleak, and forget quality.

    Keys: `<split>/perplexity` (torchmetrics Perplexity, HF shift, ignore -100) and `<split>/loss` (mean of per-
    example mean NLL) for forget, holdout, test; `forget/extraction_strength`, `forget/exact_memorization`;
    `mia/<attack>/auroc` (forget vs holdout; 1 = recognised as members, 0.5 = indistinguishable), and with a
    reference `mia/<attack>/reference_auroc`, `mia/<attack>/privleak`, `forget_quality`; `exposure/mean`,
    `exposure/reference_mean`, `exposure/extrapolated_mean`, `exposure/reps_<r>`, `exposure/canary/<name>`.
    """
    loaders = _loaders(data, forget, holdout, test)  # first: a data module sets its tokenizer up here
    tokenizer = tokenizer if tokenizer is not None else getattr(data, "tokenizer", None)
    models = [m for m in (model, reference) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    device = _device(model)
    result = Evaluation()
    try:
        mia, mia_ref = MembershipInference(k=k), MembershipInference(k=k)
        es, em, fq = ExtractionStrength(), ExactMemorization(), ForgetQuality()
        for split, loader in loaders.items():
            ppl = Perplexity(ignore_index=IGNORE_INDEX).to(device)
            losses = []
            for batch in tqdm(loader, desc=f"evaluate {split}", disable=not progress, leave=False):
                ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
                mask = batch.get("attention_mask")
                mask = mask.to(device) if mask is not None else None
                logits = model_logits(model, ids, mask)
                ppl.update(logits[:, :-1].float(), labels[:, 1:])
                loss = example_loss(logits, labels)
                losses.append(loss.cpu())
                if split == "test":
                    continue
                ref_logits = model_logits(reference, ids.to(_device(reference)), mask) if reference else None
                texts = _scored_texts(tokenizer, labels)
                member = split == "forget"
                mia.update(logits, labels, member, texts=texts, reference_logits=ref_logits)
                if reference is not None:
                    mia_ref.update(None, None, member, scores=attack_scores(ref_logits, labels, k=k, texts=texts))
                if member:
                    es.update(logits, labels)
                    em.update(logits, labels)
                    if reference is not None:
                        fq.update(loss, example_loss(ref_logits, labels))
            per_example = torch.cat(losses) if losses else torch.empty(0)
            result.per_example[f"{split}/loss"] = per_example.tolist()
            result[f"{split}/loss"] = float(per_example[~torch.isnan(per_example)].mean())
            result[f"{split}/perplexity"] = float(ppl.compute())
        if "forget" in loaders:
            result["forget/extraction_strength"] = float(es.compute())
            result["forget/exact_memorization"] = float(em.compute())
        if "forget" in loaders and "holdout" in loaders:
            aucs = mia.compute()
            ref_aucs = mia_ref.compute() if reference is not None else {}
            for attack in ATTACKS:
                if attack in aucs:
                    result[f"mia/{attack}/auroc"] = float(aucs[attack])
                if attack in ref_aucs:
                    result[f"mia/{attack}/reference_auroc"] = float(ref_aucs[attack])
                    if attack in aucs:
                        result[f"mia/{attack}/privleak"] = privleak(aucs[attack], ref_aucs[attack])
            if reference is not None:
                result["forget_quality"] = float(fq.compute())
        if canaries is not None:
            result.update(_exposure(model, canaries, tokenizer, exposure_kwargs or {}, progress, result.per_example))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return result


def _exposure(model, canaries, tokenizer, kwargs, progress: bool, per_example: dict) -> dict[str, float]:
    if tokenizer is None:
        raise ValueError("exposure needs the tokenizer the model was trained with: pass evaluate(..., tokenizer=...)")
    specs = canary_specs(canaries)
    metric = Exposure(tokenizer, **kwargs)
    metric.update(model, specs, progress=progress)
    out = metric.compute()
    labels = {s.id: s.label for s in specs}
    names = [labels[int(i)] for i in out["canary_id"].tolist()]
    per_example["exposure/canary"] = names
    per_example["exposure/exposure"] = out["exposure"].tolist()
    per_example["exposure/repetitions"] = out["repetitions"].tolist()
    flat = {"exposure/mean": float(out["mean"]), "exposure/reference_mean": float(out["reference_mean"]),
            "exposure/extrapolated_mean": float(out["extrapolated_mean"])}
    flat.update({f"exposure/reps_{r}": float(v) for r, v in out["by_repetitions"].items() if r > 0})
    flat.update({f"exposure/canary/{n}": float(v) for n, v in zip(names, out["exposure"].tolist())})
    return flat
