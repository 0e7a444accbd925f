"""Architecture presets: the transformers config values of real models, and tiny CPU variants.

Models are built from these with random weights (``from_config``): weights change neither memory nor speed.
RoPE scaling details are left out because they change neither.
"""

from __future__ import annotations

from typing import Any

_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8, "rope_theta": 500000.0,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 131072}
_QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "num_key_value_heads": 8, "head_dim": 128,
          "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960}

PRESETS: dict[str, dict[str, Any]] = {
    # byte-level vocabularies (256): the built-in corpora are bytes. Wide enough (256) that LoRA matrices of
    # rank >= 16 reach bitsandbytes' 4096-element threshold for 8-bit state.
    "tiny-llama": {"model_type": "llama", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 688,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 1024, "tie_word_embeddings": False},
    "tiny-qwen2": {"model_type": "qwen2", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 688,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 1024, "tie_word_embeddings": True},
    # Qwen3's attention is wider than its hidden size (heads x head_dim 128), as Qwen3-0.6B's is, and it normalises
    # each q and k head
    "tiny-qwen3": {"model_type": "qwen3", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 688,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
                   "max_position_embeddings": 1024, "tie_word_embeddings": True},
    "small-llama": {"model_type": "llama", "vocab_size": 256, "hidden_size": 512, "intermediate_size": 1376,
                    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "head_dim": 64, "tie_word_embeddings": True},
    "llama-3.2-3b": {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "head_dim": 128, "tie_word_embeddings": True},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "tie_word_embeddings": False},
    "llama-3.1-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "tie_word_embeddings": False},
    # LLaMA-1 65B, the model of the QLoRA paper's "65B on one 48 GB GPU": 32k vocabulary, no grouped KV heads
    "llama-65b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 22016,
                  "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 64,
                  "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "qwen2.5-0.5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                     "tie_word_embeddings": True},
    "qwen2.5-7b": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                   "tie_word_embeddings": False},
    "qwen3-0.6b": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "tie_word_embeddings": False},
    "mistral-7b": {"model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
                   "sliding_window": None, "tie_word_embeddings": False},
}
