"""The Tokenizer protocol over a Hugging Face tokenizer (shared with the onnxruntime
backend: :mod:`backends._hf_tokenizer`)."""

from __future__ import annotations

from .._hf_tokenizer import HFTokenizer, end_of_generation_ids, load_hf_tokenizer

__all__ = ["HFTokenizer", "end_of_generation_ids", "load_hf_tokenizer"]
