"""Running a model for matrix-free curvature products (`hessian_free.py`): with its parameters substituted
(`torch.func.functional_call`, keeping a Hugging Face model's `.config` visible), and on eager attention and eager
experts, which fused kernels (`sdpa`, flash attention, grouped matrix products) need for forward-mode AD and double
backward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from ..errors import UserInputError

EAGER_HINT = ('load the model with attn_implementation="eager" (e.g. AutoModelForCausalLM.from_pretrained(..., '
              'attn_implementation="eager"), or lightning_unlearn.models.load_causal_lm), or use curvature="kfac"')


#: (the config attribute, the model's setter, what it names) of each kernel choice a Hugging Face model makes that
#: forward-mode AD needs eager for: attention (`sdpa`, flash attention) and mixture-of-experts products (`grouped_mm`
#: has no forward-mode AD)
KERNELS = (("_attn_implementation", "set_attn_implementation", "attention"),
           ("_experts_implementation", "set_experts_implementation", "experts"))
EXPERTS_HINT = ('load the model with experts_implementation="eager" (AutoModelForCausalLM.from_pretrained(..., '
                'experts_implementation="eager")), or use curvature="kfac"')


def _implementation(module: nn.Module, attribute: str) -> str | None:
    """A Hugging Face model's implementation choice `attribute` (None for other modules, or a model without it)."""
    config = getattr(module, "config", None)
    return getattr(config, attribute, None) if config is not None else None


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run the block with every Hugging Face model inside `model` on eager attention and eager experts (forward-mode
    AD and double backward need them); each is switched back to its own implementation afterwards, also on error.

    Raises `UserInputError` when a model's attention cannot switch (transformers without `set_attn_implementation`,
    or a model that does not support switching), or its experts (`set_experts_implementation`)."""
    switched: list[tuple[nn.Module, str, str]] = []
    try:
        for module in model.modules():
            for attribute, setter_name, kind in KERNELS:
                hint = EAGER_HINT if kind == "attention" else EXPERTS_HINT
                original = _implementation(module, attribute)
                if original is None or original == "eager":  # not an HF model, or eager (also: a submodel,
                    continue                                # switched with its parent through the shared config)
                setter = getattr(module, setter_name, None)
                if not callable(setter):
                    raise UserInputError(f"cg: the model uses {original!r} {kind}, which has no forward-mode AD, and "
                                         f"this transformers version cannot switch it; {hint}")
                try:
                    setter("eager")
                except (ValueError, ImportError, NotImplementedError) as err:
                    raise UserInputError(f"cg: the model uses {original!r} {kind}, which has no forward-mode AD, and "
                                         f"could not be switched to eager ({type(err).__name__}); {hint}"
                                         ) from err
                switched.append((module, setter_name, original))
                if _implementation(module, attribute) != "eager":
                    raise UserInputError(f"cg: the model uses {original!r} {kind}, which has no forward-mode AD, and "
                                         f"does not support switching to eager; {hint}")
        yield
    finally:
        for module, setter_name, original in reversed(switched):
            getattr(module, setter_name)(original)


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
