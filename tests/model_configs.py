"""The config.json files real models publish on the Hugging Face Hub (the fields that size and build them, as
published), and a model folder holding one: for the tests that size a model or build it on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

# meta-llama/Meta-Llama-3-8B
LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
# Qwen/Qwen2.5-0.5B
QWEN2_5_0_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}


def model_folder(tmp_path: Path, config: dict, name: str = "model") -> str:
    """A model folder with this config.json and nothing else (no weights, no tokenizer)."""
    folder = Path(tmp_path) / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)
