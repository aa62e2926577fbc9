"""The label of a position that is not scored, shared by data preparation (masked sources and prompts), the
training loss, validation and evaluation."""
from __future__ import annotations

IGNORE_INDEX = -100  # PyTorch's cross_entropy ignore_index and Hugging Face's convention for "no loss here"
