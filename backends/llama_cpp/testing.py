"""Tiny random-weight llama GGUF files for fast tests (needs the ``gguf`` package).

The file has a real SentencePiece-style vocabulary (control tokens, 256 byte tokens and
a few word pieces), so llama.cpp loads it with a working tokenizer, and a ChatML chat
template. Weights are float32 from a seeded generator: the same arguments write the
same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["TINY_CHAT_TEMPLATE", "write_tiny_llama_gguf"]

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
)


def _vocab(extra_words: int) -> tuple[list[str], list[float], list[int]]:
    # Token types (llama.cpp): 1 normal, 2 unknown, 3 control, 6 byte.
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, 3, 3]
    tokens += [f"<0x{i:02X}>" for i in range(256)]
    types += [6] * 256
    words = ["\u2581" + w for w in _WORDS] + list("abcdefghijklmnopqrstuvwxyz") + ["\u2581"]
    words = words[: max(extra_words, 0)] if extra_words < len(words) else words
    tokens += words
    types += [1] * len(words)
    scores = [0.0] * (len(tokens) - len(words)) + [-float(i) for i in range(len(words))]
    return tokens, scores, types


def write_tiny_llama_gguf(
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_ff: int = 128,
    context_length: int = 4096,
    seed: int = 0,
    weight_scale: float = 1.0,
    quantized: bool = True,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
) -> Path:
    """Write a tiny random llama-architecture GGUF that llama.cpp loads.

    Args:
        path: where to write the file.
        n_layers: transformer blocks.
        d_model: embedding width (``n_heads`` must divide it).
        n_heads: attention heads.
        n_kv_heads: key/value heads (grouped-query attention when fewer than heads).
        d_ff: feed-forward width.
        context_length: the model's trained context length (metadata).
        seed: the weights are a pure function of the arguments.
        weight_scale: multiplies every weight matrix; larger gives peakier logits.
        quantized: store the matrices as Q8_0 (like real quantised GGUFs, whose
            logits are batch-invariant in llama.cpp) instead of float32 (whose logits
            change with the batch size).
        chat_template: the ``tokenizer.chat_template`` metadata (ChatML by default;
            ``None`` writes none). Tests pass hostile templates here.

    Returns:
        The path written. The vocabulary has 324 tokens: ``<unk>`` 0, BOS 1, EOS 2,
        ``<|im_start|>`` 3, ``<|im_end|>`` 4 (end of turn), 256 byte tokens, word pieces.
    """
    import gguf  # optional dependency, only for writing fixtures

    path = Path(path)
    tokens, scores, types = _vocab(10_000)
    vocab = len(tokens)
    head_dim = d_model // n_heads
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float | None = None) -> np.ndarray:
        s = (1.0 / np.sqrt(shape[-1])) if scale is None else scale
        return (rng.standard_normal(shape) * s * weight_scale).astype(np.float32)

    def add_matrix(name: str, data: np.ndarray) -> None:
        if not quantized:
            writer.add_tensor(name, data)
            return
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(context_length)
    writer.add_embedding_length(d_model)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(d_ff)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32
    )
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(4)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    add_matrix("token_embd.weight", w(vocab, d_model, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(d_model, dtype=np.float32))
    add_matrix("output.weight", w(vocab, d_model))
    for i in range(n_layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(d_model, dtype=np.float32))
        add_matrix(p + "attn_q.weight", w(d_model, d_model))
        add_matrix(p + "attn_k.weight", w(n_kv_heads * head_dim, d_model))
        add_matrix(p + "attn_v.weight", w(n_kv_heads * head_dim, d_model))
        add_matrix(p + "attn_output.weight", w(d_model, d_model))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(d_model, dtype=np.float32))
        add_matrix(p + "ffn_gate.weight", w(d_ff, d_model))
        add_matrix(p + "ffn_up.weight", w(d_ff, d_model))
        add_matrix(p + "ffn_down.weight", w(d_model, d_ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
