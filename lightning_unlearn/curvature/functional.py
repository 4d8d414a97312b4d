"""Running a model for matrix-free curvature products (`hessian_free.py`): with its parameters substituted
(`torch.func.functional_call`, keeping a Hugging Face model's `.config` visible), and on eager attention, which
fused kernels (`sdpa`, flash attention) need for forward-mode AD and double backward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from ..errors import UserInputError

EAGER_HINT = ('load the model with attn_implementation="eager" (e.g. AutoModelForCausalLM.from_pretrained(..., '
              'attn_implementation="eager"), or lightning_unlearn.models.load_causal_lm), or use curvature="kfac"')


def _attn_implementation(module: nn.Module) -> str | None:
    """The attention implementation of a Hugging Face model (None for other modules)."""
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run the block with every Hugging Face model inside `model` on eager attention (forward-mode AD and double
    backward need it); each is switched back to its own implementation afterwards, also on error.

    Raises `UserInputError` when a model cannot switch (transformers without `set_attn_implementation`, or a
    model that does not support switching)."""
    switched: list[tuple[nn.Module, str]] = []
    try:
        for module in model.modules():
            original = _attn_implementation(module)
            if original is None or original == "eager":  # not an HF model, or eager (also: a submodel, switched
                continue                                # with its parent through the shared config)
            setter = getattr(module, "set_attn_implementation", None)
            if not callable(setter):
                raise UserInputError(f"cg: the model uses {original!r} attention, which has no forward-mode AD, and "
                                     f"this transformers version cannot switch it; {EAGER_HINT}")
            try:
                setter("eager")
            except (ValueError, ImportError, NotImplementedError) as err:
                raise UserInputError(f"cg: the model uses {original!r} attention, which has no forward-mode AD, and "
                                     f"could not be switched to eager ({type(err).__name__}); {EAGER_HINT}") from err
            switched.append((module, original))
            if _attn_implementation(module) != "eager":
                raise UserInputError(f"cg: the model uses {original!r} attention, which has no forward-mode AD, and "
                                     f"does not support switching to eager; {EAGER_HINT}")
        yield
    finally:
        for module, original in reversed(switched):
            module.set_attn_implementation(original)


class FunctionalModel:
    """Calls `module` with `params` substituted (torch.func.functional_call), keeping `.config` visible so that
    `model_logits` passes Hugging Face keywords."""

    def __init__(self, module: nn.Module, params: Mapping[str, Tensor]) -> None:
        self.module = module
        self.params = dict(params)
        if hasattr(module, "config"):
            self.config = module.config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, self.params, args, kwargs, strict=False)
