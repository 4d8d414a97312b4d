"""Build and load causal language models: small random configs (tests, the offline demo) and real checkpoints.

Nothing here downloads: `load_causal_lm` accepts a local directory (or a hub id when the user is online).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ARCHITECTURES = ("gpt2", "llama", "qwen2", "gpt_neox", "opt")


def small_config(
    arch: str = "gpt2",
    *,
    vocab_size: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_positions: int = 64,
    tie_embeddings: bool = True,
    eos_token_id: int | None = None,
):
    """A transformers config of the given architecture with tiny sizes and eager attention.

    Eager attention keeps forward-mode AD and double backward working (fused kernels do not support them).
    """
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie_embeddings, bos_token_id=eos, eos_token_id=eos)
    if arch == "gpt2":
        kw = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif arch in ("llama", "qwen2"):
        kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions)
    elif arch == "gpt_neox":
        kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=max_positions,
                  hidden_dropout=0.0, attention_dropout=0.0)
    else:  # opt
        kw = dict(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=max_positions, word_embed_proj_dim=hidden, dropout=0.0,
                  attention_dropout=0.0)
    config = AutoConfig.for_model(arch, **common, **kw)
    config._attn_implementation = "eager"
    return config


def small_causal_lm(arch: str = "gpt2", *, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> nn.Module:
    """A randomly initialised `AutoModelForCausalLM` of a tiny config (see `small_config`), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(small_config(arch, **sizes), attn_implementation="eager")
    return model.to(dtype).eval()


def load_causal_lm(name_or_path: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a causal LM with `from_pretrained` from a local directory or a hub id, with eager attention.

    Raises a clear error when a local path is missing instead of trying the hub with a path-shaped id.
    """
    from transformers import AutoModelForCausalLM

    path = Path(name_or_path)
    looks_local = path.is_absolute() or str(name_or_path).startswith((".", "~")) or path.exists()
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist; give a saved model directory or a hub id")
    kwargs = {"attn_implementation": "eager"}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
