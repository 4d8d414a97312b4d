"""lightning-unlearn: second-order (Newton) unlearning for causal language models in PyTorch Lightning."""

__version__ = "0.1.0"
