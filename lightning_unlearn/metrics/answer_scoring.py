"""Score a causal LM's answers to questions (and whole texts), and answer questions by greedy decoding: the
building blocks of the TOFU evaluation (`qa_scoring`).

Rows are dicts `{"question", "answer", "paraphrased_answer" (optional), "perturbed_answer": [str, ...] (optional)}`
(MUSE texts for privleak may be plain strings). Each answer is scored inside the project's QA text
(`data.qa.qa_text`: "Question: {q}\\nAnswer: {a}"), tokenised by `data.tokenize.Tokenise` with labels on the answer's
tokens only, in batches, without gradients, with the model in eval mode (its mode is restored afterwards). From one
forward pass per batch come, per row: the mean token NLL of the answer (probability, truth ratio), the Min-K% Prob
score (privleak) and the extraction strength (teacher forced, `metrics.extraction`).

`score_eos`: TOFU and open-unlearning append the eos token to every answer and score it with the answer; the
project's own QA training leaves the eos unscored (`Tokenise` labels only the answer span), so by default it is not
scored here either. Pass `score_eos=True` for a model finetuned the TOFU way (the eos is then part of every answer's
mean NLL). Min-K% and extraction strength never score the eos (open-unlearning drops it for both).

Generation (ROUGE) is greedy decoding of the prompt, the tokens of the QA text before the answer's first token (so
the prompt is tokenised exactly as in training), by a small loop that works for any module mapping ids to logits:
prompts of equal length are batched together (no padding, so no position or mask effects), with the HF KV cache
when the model returns one. Each row gets `max_new_tokens` new tokens, by default its answer's token count plus
`generation_margin` (ROUGE-L *recall* cannot drop with more tokens, so this only saves time; pass
`max_new_tokens=200` for open-unlearning's budget), and stops at eos. Generated texts are scored at once and
dropped: no text is kept, logged or printed.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_unlearn.metrics.extraction import extraction_strength
from lightning_unlearn.metrics.functional import IGNORE_INDEX as IGNORE
from lightning_unlearn.metrics.functional import forward_output, lowest_k_mean, token_logprobs

Row = Mapping[str, Any]
_UNBOUNDED = 1 << 62  # Tokenise's max_length when `_encode` cuts the rows itself


@dataclass(frozen=True)
class ScoringOptions:
    """How rows are scored (see the module docstring)."""

    batch_size: int = 16
    max_length: int = 512  # tokens of a QA text (capped at the model's positions); longer ones are truncated
    k: float = 0.4  # Min-K% fraction (MUSE, open-unlearning: 0.4)
    score_eos: bool = False
    max_new_tokens: int | None = None  # None: each answer's token count + generation_margin
    generation_margin: int = 32

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 2 or self.generation_margin < 0:
            raise ValueError("batch_size must be >= 1, max_length >= 2 and generation_margin >= 0")
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"k must be a fraction in (0, 1], got {self.k}; pass 0.4 for Min-40%")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


def scoring_options(options: ScoringOptions | None, overrides: Mapping[str, Any]) -> ScoringOptions:
    known = {f.name for f in fields(ScoringOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown scoring option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return replace(options or ScoringOptions(), **overrides)


@dataclass
class AnswerScores:
    """Per-row statistics [N] (float64) of the scored span of each row (NaN for a row without scored tokens)."""

    loss: Tensor  # mean token NLL (with the eos when score_eos)
    min_k: Tensor  # Min-K% Prob, higher = more likely a training member
    extraction_strength: Tensor
    n_tokens: Tensor  # scored tokens, eos excluded (int64)


@contextlib.contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put the models in eval mode and restore each one's mode afterwards."""
    present = [m for m in models if m is not None]
    modes = [m.training for m in present]
    try:
        for m in present:
            m.eval()
        yield
    finally:
        for m, mode in zip(present, modes):
            m.train(mode)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model accepts (HF config `n_positions` / `max_position_embeddings`), if known."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _encode(tokenizer: Any, texts: Sequence[str], spans: Sequence[list[int]], max_length: int,
            score_eos: bool) -> list[dict[str, list[int]]]:
    """Tokenise texts with labels on their span; `labels_eos` also labels a final eos that follows the span."""
    from lightning_unlearn.data.tokenize import Tokenise  # the data package is heavy: import it when scoring

    if not texts:
        return []
    # encode whole, then cut at max_length here: the count of cut texts goes into the warning
    enc = Tokenise(tokenizer, max_length=_UNBOUNDED)(
        {"text": list(texts), "example_id": list(range(len(texts))), "spans": [[list(s)] for s in spans]})
    cut = sum(len(ids) > max_length for ids in enc["input_ids"])
    if cut:
        warnings.warn(f"{cut} of {len(texts)} texts are longer than {max_length} tokens and were truncated: only their "
                      f"first {max_length} tokens are scored (a row left with no answer token is dropped); raise "
                      "max_length (ScoringOptions.max_length, `--max-length`; at most the model's positions)",
                      UserWarning, stacklevel=3)
    enc = {key: [row[:max_length] for row in enc[key]] for key in ("input_ids", "labels")}
    eos = tokenizer.eos_token_id
    items = []
    for ids, labels, (_, end), text in zip(enc["input_ids"], enc["labels"], spans, texts):
        labels_eos = list(labels)
        if (score_eos and eos is not None and end == len(text) and ids and ids[-1] == eos
                and any(lab != IGNORE for lab in labels)):
            labels_eos[-1] = eos
        items.append({"input_ids": ids, "labels": labels, "labels_eos": labels_eos})
    return items


def encode_qa(tokenizer: Any, questions: Sequence[str], answers: Sequence[str], *, max_length: int = 512,
              score_eos: bool = False) -> list[dict[str, list[int]]]:
    """Token ids and answer-only labels of `qa_text(question, answer)` per row (see `Tokenise`)."""
    from lightning_unlearn.data.qa import qa_text

    if len(questions) != len(answers):
        raise ValueError(f"got {len(questions)} questions for {len(answers)} answers")
    texts, spans = zip(*(qa_text(q, a) for q, a in zip(questions, answers))) if questions else ((), ())
    return _encode(tokenizer, texts, spans, max_length, score_eos)


def encode_texts(tokenizer: Any, texts: Sequence[str], *, max_length: int = 512) -> list[dict[str, list[int]]]:
    """Token ids and labels on every token of each text (MUSE privleak texts; the eos is never scored)."""
    return _encode(tokenizer, texts, [[0, len(t)] for t in texts], max_length, False)


@torch.no_grad()
def score_encoded(model: nn.Module, items: Sequence[Mapping[str, list[int]]], *, batch_size: int = 16,
                  k: float = 0.4, pad_token_id: int = 0) -> AnswerScores:
    """One forward pass per batch (rows sorted by length, right padding): per-row loss, Min-K%, ES, token count."""
    from lightning_unlearn.data.tokenize import Collate

    n = len(items)
    out = {name: torch.full((n,), float("nan"), dtype=torch.float64) for name in ("loss", "min_k", "es")}
    counts = torch.zeros(n, dtype=torch.long)
    if n == 0:
        return AnswerScores(out["loss"], out["min_k"], out["es"], counts)
    device = _device(model)
    collate = Collate(pad_token_id)
    order = sorted(range(n), key=lambda i: len(items[i]["input_ids"]))
    with eval_mode(model):
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            batch = collate([{"input_ids": items[i]["input_ids"], "labels": items[i]["labels"], "example_id": i}
                             for i in index])
            width = batch["input_ids"].shape[1]
            labels_eos = torch.full((len(index), width), IGNORE, dtype=torch.long)
            for row, i in enumerate(index):
                lab = items[i].get("labels_eos", items[i]["labels"])
                labels_eos[row, :len(lab)] = torch.as_tensor(lab, dtype=torch.long)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            labels, labels_eos = batch["labels"].to(device), labels_eos.to(device)
            logits = _forward(model, ids, ids.shape[1], attention_mask=mask)[0]
            lp, _, scored_eos = token_logprobs(logits, labels_eos)  # one log-softmax for every statistic
            scored = labels[:, 1:] != IGNORE
            count_eos = scored_eos.sum(-1)
            loss = -lp.double().sum(-1) / count_eos.clamp_min(1)
            loss = torch.where(count_eos > 0, loss, torch.full_like(loss, float("nan")))
            where = torch.as_tensor(index)
            out["loss"][where] = loss.cpu()
            out["min_k"][where] = lowest_k_mean(lp.masked_fill(~scored, 0.0), scored, k).cpu()
            out["es"][where] = extraction_strength(logits, labels).double().cpu()
            counts[where] = scored.sum(-1).cpu()
    return AnswerScores(out["loss"], out["min_k"], out["es"], counts)


def _forward(model: nn.Module, ids: Tensor, length: int, **kwargs: Any) -> tuple[Tensor, Any]:
    """`forward_output`, with the IndexError of a model fed more tokens than its positions (a module without a
    config that states them) turned into an error that names max_length."""
    try:
        return forward_output(model, ids, **kwargs)
    except IndexError as err:
        raise ValueError(
            f"the model raised IndexError on sequences of {length} tokens: most likely it has fewer positions, and "
            "it has no config stating them (n_positions / max_position_embeddings), so sequences are cut at max_length "
            "only; pass max_length (ScoringOptions.max_length, `--max-length`) at most its positions (otherwise a "
            f"token id beyond its vocabulary: largest id here {int(ids.max())}; use the model's own tokenizer)"
        ) from err


def _pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def length_limit(model: nn.Module, options: ScoringOptions) -> int:
    limit = max_positions(model)
    return min(options.max_length, limit) if limit else options.max_length


def score_answers(model: nn.Module, tokenizer: Any, questions: Sequence[str], answers: Sequence[str],
                  options: ScoringOptions | None = None, **overrides: Any) -> AnswerScores:
    """Per-row statistics of each answer after its question (see `AnswerScores`)."""
    opts = scoring_options(options, overrides)
    items = encode_qa(tokenizer, questions, answers, max_length=length_limit(model, opts), score_eos=opts.score_eos)
    return score_encoded(model, items, batch_size=opts.batch_size, k=opts.k, pad_token_id=_pad_id(tokenizer))


def score_texts(model: nn.Module, tokenizer: Any, texts: Sequence[str], options: ScoringOptions | None = None,
                **overrides: Any) -> AnswerScores:
    """Per-text statistics over all tokens of each text (MUSE's privleak scores whole texts)."""
    opts = scoring_options(options, overrides)
    items = encode_texts(tokenizer, texts, max_length=length_limit(model, opts))
    return score_encoded(model, items, batch_size=opts.batch_size, k=opts.k, pad_token_id=_pad_id(tokenizer))


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                    eos_token_id: int | None = None, batch_size: int = 16,
                    max_total_length: int | None = None) -> list[list[int]]:
    """Greedy continuations (token ids, without the prompt, cut after eos exclusive) of each prompt.

    Prompts of equal length are decoded together, so there is no padding; an HF model's KV cache is used when its
    output carries one, otherwise every step runs the whole sequence. `max_total_length` caps prompt + new tokens
    (the model's positions)."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"got {len(limits)} max_new_tokens for {len(prompts)} prompts")
    if max_total_length is not None:
        limits = [max(0, min(lim, max_total_length - len(p))) for lim, p in zip(limits, prompts)]
    results: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; greedy decoding needs at least one token")
        if limits[i] > 0:
            groups.setdefault(len(p), []).append(i)
    device = _device(model)
    with eval_mode(model):
        for length in sorted(groups):
            members = groups[length]
            for start in range(0, len(members), batch_size):
                index = members[start:start + batch_size]
                ids = torch.tensor([list(prompts[i]) for i in index], dtype=torch.long, device=device)
                steps = max(limits[i] for i in index)
                new = _greedy_loop(model, ids, steps, eos_token_id)
                for row, i in enumerate(index):
                    tokens = new[row, :limits[i]].tolist()
                    if eos_token_id is not None and eos_token_id in tokens:
                        tokens = tokens[:tokens.index(eos_token_id)]
                    results[i] = tokens
    return results


def _cache_argument(model: nn.Module) -> str:
    """The forward's KV-cache argument: `cache` (transformers >= 5.x) or `past_key_values` (older)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    """The KV cache an HF output carries (None for a plain tensor or an output without one)."""
    if isinstance(output, Tensor) or not hasattr(output, "keys"):
        return None
    keys = output.keys()
    return next((output[name] for name in ("cache", "past_key_values") if name in keys), None)


def _greedy_loop(model: nn.Module, ids: Tensor, steps: int, eos_token_id: int | None) -> Tensor:
    """[B, steps'] greedy tokens after `ids` (stops early once every row has produced eos)."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    generated: list[Tensor] = []
    sequence, past = ids, None
    for _ in range(steps):
        if past is None:
            logits, out = _forward(model, sequence, sequence.shape[1], use_cache=True)
        else:
            logits, out = _forward(model, sequence[:, -1:], sequence.shape[1], use_cache=True,
                                   **{_cache_argument(model): past})
        past = _cache_of(out)
        token = logits[:, -1].argmax(-1)
        generated.append(token)
        sequence = torch.cat([sequence, token.unsqueeze(-1)], dim=1)
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                break
    if not generated:
        return torch.empty((ids.shape[0], 0), dtype=torch.long)
    return torch.stack(generated, dim=1).cpu()


def generate_answers(model: nn.Module, tokenizer: Any, questions: Sequence[str], reference_answers: Sequence[str],
                     options: ScoringOptions | None = None, **overrides: Any) -> list[str]:
    """Greedy answers to each question (the prompt is the QA text's tokens before the reference answer's first
    token; the reference answer also sets the default token budget). Keep the texts in memory only."""
    from lightning_unlearn.data.qa import qa_text

    opts = scoring_options(options, overrides)
    items = encode_qa(tokenizer, questions, reference_answers, max_length=length_limit(model, opts))
    prompts, limits = [], []
    for item, question in zip(items, questions):
        labels = item["labels"]
        first = next((t for t, lab in enumerate(labels) if lab != IGNORE), None)
        if first is None or first == 0:  # no answer token (empty or truncated answer): the bare prompt
            text, (start, _) = qa_text(question, "")
            prompt = tokenizer(text[:start], add_special_tokens=False)["input_ids"]
        else:
            prompt = item["input_ids"][:first]
        n_answer = sum(lab != IGNORE for lab in labels)
        prompts.append(prompt)
        limits.append(opts.max_new_tokens if opts.max_new_tokens is not None else n_answer + opts.generation_margin)
    # prompt + answer stay within the model's positions, or within max_length for a module without a config
    new = greedy_generate(model, prompts, limits, eos_token_id=tokenizer.eos_token_id, batch_size=opts.batch_size,
                          max_total_length=length_limit(model, opts) if max_positions(model) is None
                          else max_positions(model))
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new]
