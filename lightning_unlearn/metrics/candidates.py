"""Score the candidates of a canary's randomness space under a causal LM: all of them or a sample.

A candidate is `len(space)` symbols joined by a separator, appended to the canary's prefix. Its score is the
sum of the log-probabilities of its tokens given the prefix. Full enumeration walks the candidates as a prefix
tree, one tree depth at a time and in batches of nodes, so every shared prefix is computed once; with a
Hugging Face model the tree nodes carry the model's key/value cache, so each node costs the new tokens only.

Tokenisation is handled per position, not per character: the alternatives of position `i` are tokenised in
the context of the text before them (the separator belongs to the alternative), so a symbol may map to any
number of tokens, and pieces of different token lengths are batched separately.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_unlearn.metrics.functional import forward_output


@dataclass(frozen=True)
class RandomnessSpace:
    """All sequences of `length` symbols from `alphabet`, rendered joined by `separator`."""

    alphabet: tuple[str, ...]
    length: int
    separator: str = " "

    def __post_init__(self) -> None:
        if self.length < 1 or len(self.alphabet) < 2:
            raise ValueError("a randomness space needs length >= 1 and at least two symbols in its alphabet")
        if len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError("the alphabet of a randomness space has repeated symbols")

    @property
    def size(self) -> int:
        return len(self.alphabet) ** self.length

    def render(self, symbols: Sequence[int]) -> str:
        """The text of the candidate given as symbol indices."""
        return self.separator.join(self.alphabet[s] for s in symbols)

    def parse(self, text: str) -> list[int]:
        """Symbol indices of a candidate's text; ValueError (without echoing the text) when it is not in the space."""
        parts = text.split(self.separator) if self.separator else list(text)
        lookup = {a: i for i, a in enumerate(self.alphabet)}
        if len(parts) != self.length or any(p not in lookup for p in parts):
            raise ValueError(
                f"the secret is not a sequence of {self.length} symbols of the alphabet joined by "
                f"{self.separator!r}; fix the canary's alphabet, length or separator"
            )
        return [lookup[p] for p in parts]

    def index(self, symbols: Sequence[int]) -> int:
        """Lexicographic index of a candidate (first position most significant)."""
        out = 0
        for s in symbols:
            out = out * len(self.alphabet) + s
        return out


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    out = tokenizer.encode(text, add_special_tokens=special)
    return list(getattr(out, "ids", out))


@dataclass
class SpaceTokens:
    """Token ids of a canary's prefix and of every position's alternatives: `pieces[position][symbol]`."""

    prefix_ids: list[int]
    pieces: list[list[tuple[int, ...]]]

    def candidate(self, symbols: Sequence[int]) -> list[int]:
        """Token ids of one candidate (without the prefix)."""
        return [t for pos, s in enumerate(symbols) for t in self.pieces[pos][s]]


def tokenize_space(
    tokenizer, prefix: str, space: RandomnessSpace, reference: Sequence[int], *, add_special_tokens: bool = True
) -> SpaceTokens:
    """Tokenise a prefix and each position's alternatives in the context of the `reference` candidate.

    Trailing whitespace of the prefix moves into the first alternative (BPE tokenisers attach the space to the
    following word). Warns when the reference candidate's piecewise tokens differ from tokenising the whole text.
    """
    stripped = prefix.rstrip()
    lead = prefix[len(stripped):]
    plain = _encode(tokenizer, stripped, False)
    full = _encode(tokenizer, stripped, True) if add_special_tokens else plain
    prefix_ids = full if full[len(full) - len(plain):] == plain else plain
    pieces: list[list[tuple[int, ...]]] = []
    context = stripped
    for pos in range(space.length):
        glue = lead if pos == 0 else space.separator
        before = _encode(tokenizer, context, False)
        alternatives = []
        for symbol in space.alphabet:
            ids = _encode(tokenizer, context + glue + symbol, False)
            if ids[: len(before)] == before and len(ids) > len(before):
                alternatives.append(tuple(ids[len(before):]))
            else:  # the tokeniser merges across the boundary: fall back to the piece on its own
                alone = tuple(_encode(tokenizer, glue + symbol, False))
                if not alone:
                    raise ValueError(f"the tokenizer maps the alphabet symbol {symbol!r} to no token")
                alternatives.append(alone)
        pieces.append(alternatives)
        context = context + glue + space.alphabet[reference[pos]]
    tokens = SpaceTokens(prefix_ids, pieces)
    if plain + tokens.candidate(reference) != _encode(tokenizer, stripped + lead + space.render(reference), False):
        warnings.warn(
            "the piecewise tokenisation of a canary differs from tokenising its full text; exposure ranks use the "
            "piecewise tokens for every candidate (consistent), which may differ from what the model saw in training",
            stacklevel=3,
        )
    return tokens


class _Context:
    """A batch of tree nodes: either a key/value cache (HF models) or the full token sequences (any module)."""

    def __init__(self, cache=None, tokens: Tensor | None = None) -> None:
        self.cache, self.tokens = cache, tokens

    def select(self, index: Tensor) -> _Context:
        if self.cache is not None:
            return _Context(cache=_select_cache(self.cache, index))
        return _Context(tokens=self.tokens[index])

    def extend(self, model: nn.Module, new: Tensor) -> tuple[Tensor, _Context]:
        """Logits [B, k, V] of the `k` new tokens, and the context that includes them."""
        if self.cache is not None:
            logits, out = forward_output(model, new, **{_cache_kwarg(model): self.cache}, use_cache=True)
            return logits, _Context(cache=_output_cache(out))
        full = torch.cat([self.tokens, new], dim=1)
        logits, _ = forward_output(model, full)
        return logits[:, -new.shape[1]:], _Context(tokens=full)


def _select_cache(cache, index: Tensor):
    """A new cache holding the rows `index` of `cache`, which stays untouched.

    Dynamic cache layers reassign (never mutate) their tensors when selecting or growing, so shallow copies of the
    cache and its layers suffice; other cache types are deep-copied first.
    """
    layers = getattr(cache, "layers", None)
    if layers is not None and all(type(layer).__name__ == "DynamicLayer" for layer in layers):
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in layers]
    else:
        new = copy.deepcopy(cache)
    new.batch_select_indices(index)
    return new


def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.x names the key/value cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _supports_cache(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel) and hasattr(model, "config") and getattr(model.config, "use_cache", True)


def _start(model: nn.Module, prefix_ids: list[int], use_cache: bool | None) -> tuple[_Context, Tensor]:
    """Run the prefix once: (context of one node, log-probabilities [1, V] of the first token after it)."""
    if not prefix_ids:
        raise ValueError("a canary prefix must tokenise to at least one token (add a BOS token or some text)")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.tensor([prefix_ids], device=device)
    cache = _supports_cache(model) if use_cache is None else use_cache
    if cache:
        logits, out = forward_output(model, ids, use_cache=True)
        ctx = _Context(cache=_output_cache(out))
    else:
        logits, _ = forward_output(model, ids)
        ctx = _Context(tokens=ids)
    return ctx, torch.log_softmax(logits[:, -1].float(), dim=-1)


@torch.no_grad()
def enumerate_scores(
    model: nn.Module, tokens: SpaceTokens, *, batch_size: int = 1024, use_cache: bool | None = None
) -> Tensor:
    """Log-probability (float64, nats) of every candidate given the prefix, indexed lexicographically."""
    n_alt = len(tokens.pieces[0])
    depth_count = len(tokens.pieces)
    ctx0, lp0 = _start(model, tokens.prefix_ids, use_cache)
    device = lp0.device
    scores = torch.full((n_alt**depth_count,), float("nan"), dtype=torch.float64)
    # per depth: the distinct first tokens (columns kept of the next-token log-probs) and groups by token length
    firsts, groups = [], []
    for alts in tokens.pieces:
        first = sorted({a[0] for a in alts})
        col = {t: i for i, t in enumerate(first)}
        by_len: dict[int, list[int]] = {}
        for i, a in enumerate(alts):
            by_len.setdefault(len(a), []).append(i)
        firsts.append(torch.tensor(first, device=device))
        groups.append([
            (torch.tensor(ids, device=device), torch.tensor([alts[i] for i in ids], device=device),
             torch.tensor([col[alts[i][0]] for i in ids], device=device))
            for ids in by_len.values()
        ])

    def walk(ctx: _Context, idx: Tensor, base: Tensor, first_lp: Tensor, depth: int) -> None:
        last = depth == depth_count - 1
        for alt_ids, toks, cols in groups[depth]:
            n, k = toks.shape
            head = first_lp[:, cols].double()  # [P, n]
            if last and k == 1:
                leaves = (idx.unsqueeze(1) * n_alt + alt_ids).reshape(-1)
                scores[leaves.cpu()] = (base.unsqueeze(1) + head).reshape(-1).cpu()
                continue
            chunk = max(1, batch_size // n)
            for start in range(0, idx.numel(), chunk):
                p = min(chunk, idx.numel() - start)
                rows = torch.arange(start, start + p, device=device).repeat_interleave(n)
                feed = toks.repeat(p, 1)
                logits, child = ctx.select(rows).extend(model, feed[:, :-1] if last else feed)
                lp = torch.log_softmax(logits.float(), dim=-1)
                inner = lp[:, : k - 1].gather(-1, feed[:, 1:].unsqueeze(-1)).double().sum((1, 2)) if k > 1 else 0.0
                child_base = base[start:start + p].repeat_interleave(n) + head[start:start + p].reshape(-1) + inner
                child_idx = idx[start:start + p].repeat_interleave(n) * n_alt + alt_ids.repeat(p)
                if last:
                    scores[child_idx.cpu()] = child_base.cpu()
                else:
                    walk(child, child_idx, child_base, lp[:, -1][:, firsts[depth + 1]], depth + 1)

    walk(ctx0, torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.float64, device=device),
         lp0[:, firsts[0]], 0)
    return scores


@torch.no_grad()
def score_candidates(
    model: nn.Module, tokens: SpaceTokens, candidates: Tensor, *, batch_size: int = 1024, use_cache: bool | None = None
) -> Tensor:
    """Log-probability (float64, nats) of each candidate (rows of symbol indices [N, length]) given the prefix."""
    ctx0, lp0 = _start(model, tokens.prefix_ids, use_cache)
    device = lp0.device
    out = torch.empty(candidates.shape[0], dtype=torch.float64)
    for start in range(0, candidates.shape[0], batch_size):
        seqs = [tokens.candidate(row.tolist()) for row in candidates[start:start + batch_size]]
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        width = int(lengths.max())
        padded = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            padded[i, : len(s)] = torch.tensor(s, device=device)
        total = lp0[0, padded[:, 0]].double()
        if width > 1:  # right padding: causal attention keeps real positions independent of the padding after them
            logits, _ = ctx0.select(torch.zeros(len(seqs), dtype=torch.long, device=device)).extend(
                model, padded[:, :-1])
            lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, padded[:, 1:].unsqueeze(-1)).squeeze(-1)
            valid = torch.arange(1, width, device=device).unsqueeze(0) < lengths.unsqueeze(1)
            total = total + lp.double().masked_fill(~valid, 0.0).sum(-1)
        out[start:start + len(seqs)] = total.cpu()
    return out
