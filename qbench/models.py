"""Model loading: tiny random llamas for tests, the SmolLM2-135M demo model, local/hub directories."""
from __future__ import annotations

import torch
from torch import nn


class ByteTokenizer:
    """A tokenizer for the tiny random models: UTF-8 bytes offset by the 3 special ids.

    Same calling convention as the parts of a Hugging Face tokenizer qbench uses."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 176,
               heads: int = 4, kv_heads: int = 2, vocab: int = 259, max_len: int = 512) -> nn.Module:
    """A llama-architecture model with random weights, built from a config (no files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_len, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model
