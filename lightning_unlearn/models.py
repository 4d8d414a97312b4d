"""Build, load and save causal language models: small random configs (tests, the offline demo) and real
checkpoints; the one place that calls `from_pretrained` / `save_pretrained` for a model.

Nothing here downloads: `load_causal_lm` accepts a local directory (or a hub id when the user is online).
`build_model` turns what `UnlearningModule` is given (a path, a transformers config or a module, and a dtype's name)
into a model, with clear errors for an unknown dtype and an unreadable saved model; `load_causal_lm` refuses a
`config.json` that does not match the weights beside it (transformers would only log it).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCHITECTURES = ("gpt2", "llama", "qwen2", "gpt_neox", "opt", "stablelm", "mistral", "qwen3", "gemma2", "phi", "falcon",
                 "bloom", "phi3", "gemma3_text", "starcoder2", "olmo2", "granite")
#: mixture-of-experts architectures `small_config` also builds (4 experts, 2 per token; their routers are bare
#: weights no layer-wise curvature covers, so they are not in `ARCHITECTURES`, whose models have no uncovered weight)
MOE_ARCHITECTURES = ("mixtral", "qwen3_moe")
#: the dtypes `build_model` loads or casts a model in
DTYPES = ("float32", "bfloat16", "float16", "float64")
#: the files of a saved model's folder that `atomic_save_pretrained(files_from=...)` copies beside new weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "generation_config.json")


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

    if arch not in ARCHITECTURES + MOE_ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES + MOE_ARCHITECTURES)}")
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie_embeddings, bos_token_id=eos, eos_token_id=eos)
    if arch == "gpt2":
        kw = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif arch in ("llama", "qwen2", "stablelm", "mistral", "qwen3", "gemma2", "phi3", "gemma3_text", "starcoder2",
                  "olmo2", "granite") + MOE_ARCHITECTURES:
        kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions)
        if arch == "mixtral":
            kw.update(num_local_experts=4, num_experts_per_tok=2)
        if arch == "qwen3_moe":
            kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=2 * hidden, norm_topk_prob=True)
        if arch in ("qwen3", "gemma2", "gemma3_text", "qwen3_moe"):  # their head width is a setting of its own
            kw["head_dim"] = hidden // heads
        if arch == "phi3":  # its padding id (32000) must lie in the vocabulary; qkv and gate/up are fused Linears
            kw["pad_token_id"] = eos
        if arch == "starcoder2":
            kw.update(residual_dropout=0.0, embedding_dropout=0.0)
    elif arch == "phi":
        kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=max_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                  attention_dropout=0.0)
    elif arch == "falcon":
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=max_positions, hidden_dropout=0.0, attention_dropout=0.0)
    elif arch == "bloom":
        kw = dict(hidden_size=hidden, n_layer=layers, n_head=heads, hidden_dropout=0.0, attention_dropout=0.0)
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


def build_model(model: str | Path | nn.Module | Any, dtype: str | None = None) -> nn.Module:
    """An `nn.Module` from a saved directory / hub id (`load_causal_lm`), a transformers config, or a module.

    An unknown `dtype`, an unreadable saved model (a corrupt or truncated `*.safetensors`, a broken `config.json`) and
    a `config.json` that does not match the weights raise `UserInputError` naming the value or the file."""
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if isinstance(model, nn.Module):
        return model if torch_dtype is None else model.to(torch_dtype)
    if isinstance(model, (str, Path)):
        from .errors import UserInputError

        try:
            return load_causal_lm(model, dtype=torch_dtype)
        except UserInputError as err:  # already names the folder and the fix: say which setting it came from
            raise UserInputError(f"model.model: {err}") from err
        except Exception as err:
            problem = _unreadable_model_message(Path(model).expanduser(), err)
            if problem is None:
                raise
            raise UserInputError(problem) from err
    if hasattr(model, "model_type") and hasattr(model, "to_dict"):  # a PretrainedConfig
        from transformers import AutoModelForCausalLM

        built = AutoModelForCausalLM.from_config(model, attn_implementation="eager")
        return built if torch_dtype is None else built.to(torch_dtype)
    raise TypeError(f"model must be a path, a transformers config or an nn.Module, got {type(model).__name__}")


def parse_dtype(name: str) -> torch.dtype:
    """The floating-point torch dtype named `name` ("bfloat16", ...); `UserInputError` naming the valid ones."""
    from .errors import UserInputError

    value = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UserInputError(f"model.dtype: unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return value


def _unreadable_model_message(path: Path, err: Exception) -> str | None:
    """The message for a local saved model that cannot be read (which file, and why), or None when `err` is not
    about the files of a local model (then it is re-raised as it is)."""
    if not path.is_dir():
        return None
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:  # pragma: no cover - transformers requires safetensors
        return None
    if isinstance(err, SafetensorError):
        for file in sorted(path.glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            except (SafetensorError, OSError) as bad:
                reason = " ".join(str(bad).split()) or type(bad).__name__
                return (f"model.model: cannot read {str(file)!r} ({reason}): the file is corrupt or truncated; "
                        "save or copy the model again")
        return f"model.model: cannot read the safetensors weights in {str(path)!r} ({' '.join(str(err).split())})"
    if isinstance(err, (OSError, ValueError)):
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        return f"model.model: cannot load a model from {str(path)!r}: {reason}"
    return None


def load_causal_lm(name_or_path: str | Path, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> nn.Module:
    """Load a causal LM with `from_pretrained` from a local directory or a hub id, with eager attention; with a
    `device`, moved there and in eval mode.

    Raises a clear error when a local path is missing instead of trying the hub with a path-shaped id, and
    `UserInputError` when `config.json` does not describe the saved weights (see `_weights_mismatch_message`):
    transformers would only log a report and hand back a truncated model, or one with randomly initialised weights.
    """
    from transformers import AutoModelForCausalLM

    from .errors import UserInputError

    path = Path(name_or_path)
    looks_local = path.is_absolute() or str(name_or_path).startswith((".", "~")) or path.exists()
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist; give a saved model directory or a hub id")
    # ignore_mismatched_sizes: a weight of another shape is reported in the loading info (then refused below, naming
    # it) instead of a RuntimeError advising `ignore_mismatched_sizes=True`, which would load random weights
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "output_loading_info": True,
                              "ignore_mismatched_sizes": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model, info = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    problem = _weights_mismatch_message(str(name_or_path), path if path.is_dir() else None, info, model)
    if problem is not None:
        raise UserInputError(problem)
    return model if device is None else model.eval().to(device)


def load_cached_model(path: Path, read: Any = None, *,
                      device: torch.device | str | None = None) -> tuple[nn.Module, Any]:
    """(the model saved in a cache entry `path`, `read()`: e.g. its training record): `UserInputError` naming the
    entry when either cannot be read (a truncated `model.safetensors`, a broken `config.json` or record, a missing
    file), to delete it to train it again. Nothing is deleted here: the cache may be a folder the user gave."""
    from safetensors import SafetensorError

    from .errors import UserInputError

    try:
        extra = read() if read is not None else None
        return load_causal_lm(path, device=device), extra
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:  # ValueError: UserInputError too
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise UserInputError(f"the cached model {str(path)!r} cannot be loaded ({reason}): it is corrupt or "
                             "incomplete; delete that folder to train it again") from err


def _weights_mismatch_message(source: str, folder: Path | None, info: Mapping[str, Any],
                              model: nn.Module) -> str | None:
    """The message for a model whose `config.json` does not match its weights, from `from_pretrained`'s loading
    info (None when it matches): how many weights the config's model lacks in the file (they would be random), the
    file has beyond it (they would be dropped) or holds in another shape, the first few of each by name.

    transformers has already removed the keys it ignores itself (tied `lm_head` weights, the keys of the model
    class's `_keys_to_ignore_on_load_*`); buffers are not weights either (computed, never learned: the model's own,
    and those older transformers saved, `_BUFFER_NAMES`), so they are left out too. What is left is a real
    disagreement."""
    buffers = {name for name, _ in model.named_buffers()}

    def weights(keys: Any) -> list[str]:
        return sorted((k for k in keys or () if k not in buffers and k.rsplit(".", 1)[-1] not in _BUFFER_NAMES),
                      key=_natural_key)

    missing = weights(info.get("missing_keys"))
    unexpected = weights(info.get("unexpected_keys"))
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: _natural_key(item[0]))
    if not (missing or unexpected or mismatched):
        return None
    parts = []
    if missing:
        parts.append(f"{_count(missing)} of the config's model not in the file ({_first(missing)}; they would be "
                     "random)")
    if unexpected:
        parts.append(f"{_count(unexpected)} in the file that the config's model has no place for "
                     f"({_first(unexpected)}; they would be dropped)")
    if mismatched:
        shapes = [f"{name}: {_shape(file)} in the file, {_shape(config)} in the config"
                  for name, file, config in mismatched[:_SHOWN]]
        more = f", and {len(mismatched) - _SHOWN} more" if len(mismatched) > _SHOWN else ""
        parts.append(f"{_count(mismatched)} of another shape ({'; '.join(shapes)}{more})")
    return (f"config.json does not match the weights in {_weights_files(folder)} of {source!r}: "
            + ", ".join(parts) + ". The config and the weights come from different models (compare the config's "
            "layer count, hidden size and vocab_size with the weights): put the config.json saved with these weights "
            "beside them, or save the model again with save_pretrained")


#: how many weight names a mismatch message shows of each kind
_SHOWN = 3
#: the last name of buffers that older transformers versions saved with the weights (attention masks, rotary
#: frequencies, position ids): left in a checkpoint, they are no weight the config's model lacks
_BUFFER_NAMES = frozenset({"masked_bias", "inv_freq", "original_inv_freq", "position_ids", "_float_tensor"})


def _natural_key(name: str) -> list[Any]:
    """A sort key that orders `h.2` before `h.10` (digit runs compared as numbers), so the first names shown are
    those of the first layers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _count(names: Sequence[Any]) -> str:
    """"1 weight" / "12 weights": the size of each kind of disagreement, which tells a layer count from a width."""
    return f"{len(names)} weight{'s' if len(names) != 1 else ''}"


def _first(names: Sequence[str]) -> str:
    """The first `_SHOWN` names, and how many more there are."""
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _shape(shape: Any) -> str:
    """A tensor shape as "128x384" ("scalar" for none): shorter in a one-line message than `torch.Size([128, 384])`."""
    return "x".join(str(int(n)) for n in shape) if len(shape) else "scalar"


def _weights_files(folder: Path | None) -> str:
    """The weight files of a saved model's folder, for a message ("model.safetensors"; the first shard and a count
    for a sharded model); "the weights" for a hub id."""
    if folder is None:
        return "the weights"
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return "the weights"
    more = f" (and {len(files) - 1} more shard{'s' if len(files) > 2 else ''})" if len(files) > 1 else ""
    return files[0].name + more


def load_model_config(name_or_path: str | Path) -> Any:
    """The transformers config of a saved model or hub id (`AutoConfig.from_pretrained`): a cheap check that the
    model can be loaded (raises `OSError` / `ValueError` when it cannot)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(name_or_path))


def has_saved_model(path: Path) -> bool:
    """Whether `path` holds a saved model (`config.json` and safetensors or bin weights)."""
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def unreadable_model_files(folder: Path) -> list[tuple[Path, str]]:
    """The files of a saved model that cannot be opened (permissions, a link to a missing file, a folder in place of a
    file), each with why."""
    problems = []
    for file in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), folder / "config.json"]):
        if not (file.exists() or file.is_symlink()):
            continue
        try:
            with file.open("rb") as handle:
                handle.read(8)
        except OSError as err:
            why = err.strerror or type(err).__name__
            if file.is_symlink() and not file.exists():
                why += f": it is a link to {os.readlink(file)!r}, which does not exist"
            problems.append((file, why))
    return problems


def atomic_save_pretrained(model: nn.Module, path: Path, tokenizer: Any = None, *,
                           state_dict: Mapping[str, torch.Tensor] | None = None, files_from: Path | None = None,
                           extra_files: Mapping[str, str] | None = None) -> Path:
    """`save_pretrained` (safetensors) into a temporary sibling folder, then renamed: no half-written model.

    `state_dict`: the weights to write instead of the model's own (the full tensors of an FSDP-sharded model);
    a model without `save_pretrained` is written as `model.safetensors`. `files_from`: a saved model's folder whose
    tokenizer files (`TOKENIZER_FILES`) are copied along; `extra_files`: name -> text written into the folder
    before it appears."""
    from .io import atomic_directory

    with atomic_directory(path) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        elif state_dict is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"))
        else:
            from safetensors.torch import save_model

            save_model(model, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if files_from is not None and files_from.is_dir():
            for name in TOKENIZER_FILES:
                if (files_from / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(files_from / name, tmp / name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return path


def resolve_device(accelerator: str) -> torch.device:
    """The torch device of a Lightning accelerator name: "auto" is CUDA when available, else the CPU. Asking for CUDA
    where torch has none is refused here, naming the devices there are (torch would fail later with an assertion)."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
            raise ValueError(f"accelerator {accelerator!r} asked for, but {why}; the only device available is the "
                             "cpu: pass 'cpu' (or 'auto'), or install a CUDA build of torch on a machine with a GPU")
        return torch.device("cuda")
    if accelerator == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("auto", "cpu"):
        return torch.device("cpu")
    raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu' or 'cuda', got {accelerator!r}")
