"""compactlm: Minitron-style structured pruning and knowledge distillation for Hugging Face causal LMs."""

__version__ = "0.1.0"
