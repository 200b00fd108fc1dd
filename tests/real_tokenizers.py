"""Real tokenizers and real chat templates for the data tests, all offline.

- SentencePiece models with a dummy prefix and byte fallback, from the `mistral-common` package (Apache-2.0):
  `tokenizer.model.v1` is Mistral-7B v0.1's Llama-2-style tokenizer; `mistral_instruct_tokenizer_240323.model.v3`
  is the instruct tokenizer with [INST]/[/INST] and tool control tokens. They load through transformers'
  `LlamaTokenizer` (converted to a fast tokenizer with `sentencepiece` and `protobuf`).
- A byte-level BPE tokenizer (GPT-2/Llama-3/Qwen style) trained here on a small corpus.
- The chat templates in `fixtures/chat_templates/` are the published templates, byte for byte (SOURCES.md).

Each chat template is paired with a tokenizer that has that family's special tokens (as added special
tokens, so they tokenize atomically, as in the real vocabularies) and BOS/EOS.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"

_QWEN_ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
_LLAMA3 = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
_PHI3 = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
_MISTRAL_CONTROL = [
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
]

# Per template: BOS, EOS, special tokens, other added tokens, the special tokens that open a turn (never
# trained), and the token that ends an assistant turn (None: the template has none).
FAMILIES: dict[str, dict] = {
    "llama-3.1": dict(bos="<|begin_of_text|>", eos="<|eot_id|>", specials=_LLAMA3, header="<|start_header_id|>"),
    "llama-3.2": dict(bos="<|begin_of_text|>", eos="<|eot_id|>", specials=_LLAMA3, header="<|start_header_id|>"),
    "gemma-2": dict(bos="<bos>", eos="<eos>", specials=["<start_of_turn>", "<end_of_turn>"], header="<start_of_turn>"),
    "gemma-3": dict(bos="<bos>", eos="<eos>", specials=["<start_of_turn>", "<end_of_turn>"], header="<start_of_turn>"),
    "mistral-v0.3": dict(bos="<s>", eos="</s>", specials=_MISTRAL_CONTROL, header="[INST]"),
    "mistral-v0.1": dict(bos="<s>", eos="</s>", specials=["[INST]", "[/INST]"], header="[INST]"),
    "llama-2": dict(bos="<s>", eos="</s>", specials=["[INST]", "[/INST]"], header="[INST]"),
    "phi-3": dict(bos="<s>", eos="<|endoftext|>", specials=_PHI3, header="<|user|>"),
    "phi-3.5": dict(bos="<s>", eos="<|endoftext|>", specials=_PHI3, header="<|user|>"),
    "qwen2.5": dict(
        eos="<|im_end|>",
        specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        added=_QWEN_ADDED,
        header="<|im_start|>",
    ),
    "qwen3": dict(
        eos="<|im_end|>",
        specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        added=_QWEN_ADDED,
        header="<|im_start|>",
    ),
    "qwen3-original": dict(
        eos="<|im_end|>",
        specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        added=_QWEN_ADDED,
        header="<|im_start|>",
    ),
    "deepseek-r1-distill": dict(
        bos="<｜begin▁of▁sentence｜>",
        eos="<｜end▁of▁sentence｜>",
        specials=["<｜User｜>", "<｜Assistant｜>"],
        added=["<think>", "</think>"],
        header="<｜User｜>",
    ),
    "smollm3": dict(eos="<|im_end|>", specials=["<|im_start|>", "<|im_end|>"], added=["<think>", "</think>"]),
    "solar": dict(bos="<s>", eos="</s>", specials=[], ends=False),
    "zephyr": dict(bos="<s>", eos="</s>", specials=["<|user|>", "<|assistant|>", "<|system|>"], header="<|user|>"),
    "gpt-oss": dict(
        eos="<|return|>",
        specials=["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|final|>"],
    ),
    "command-r7b": dict(
        bos="<BOS_TOKEN>",
        eos="<|END_OF_TURN_TOKEN|>",
        specials=[
            "<|START_OF_TURN_TOKEN|>",
            "<|END_OF_TURN_TOKEN|>",
            "<|USER_TOKEN|>",
            "<|CHATBOT_TOKEN|>",
            "<|SYSTEM_TOKEN|>",
            "<|START_RESPONSE|>",
            "<|END_RESPONSE|>",
            "<|START_THINKING|>",
            "<|END_THINKING|>",
            "<|START_ACTION|>",
            "<|END_ACTION|>",
            "<|START_TOOL_RESULT|>",
            "<|END_TOOL_RESULT|>",
        ],
    ),
    "granite-3.3": dict(
        bos="<|end_of_text|>",  # as Granite's tokenizer has it: BOS and EOS are one token
        eos="<|end_of_text|>",
        specials=["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"],
    ),
    "kimi-k2": dict(
        eos="<|im_end|>",
        specials=[
            "<|im_user|>",
            "<|im_assistant|>",
            "<|im_system|>",
            "<|im_middle|>",
            "<|im_end|>",
            "<|tool_calls_section_begin|>",
            "<|tool_calls_section_end|>",
            "<|tool_call_begin|>",
            "<|tool_call_argument_begin|>",
            "<|tool_call_end|>",
        ],
    ),
}
for _family in FAMILIES.values():
    _family.setdefault("ends", True)
    _family.setdefault("header", None)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Answer yes or no. yes no maybe. Reverse the word stone: enots.",
    "system user assistant tool model human gpt reasoning think answer question",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "Grüße aus Köln, naïve café, 你好世界, Привет мир, 😀 🚀",
    "### Instruction:\n### Input:\n### Response:\n### User:\n### Assistant:\n",
]


def mistral_common_file(name: str) -> Path:
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None and spec.submodule_search_locations, "mistral-common is a test dependency (make setup)"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def sentencepiece_dir(target: Path, model_file: str, **config) -> Path:
    """A model folder as Llama-2/Mistral ship it: tokenizer.model and a tokenizer_config.json naming
    LlamaTokenizer. Converted once to a fast tokenizer (tokenizer.json) so later loads are quick."""
    from transformers import AutoTokenizer

    raw = target / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    shutil.copy(mistral_common_file(model_file), raw / "tokenizer.model")
    base = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (raw / "tokenizer_config.json").write_text(json.dumps({**base, "add_bos_token": True, **config}))
    out = target / "fast"
    AutoTokenizer.from_pretrained(str(raw)).save_pretrained(str(out))
    return out


def byte_bpe_dir(target: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)  # GPT-2's: offsets trimmed of spaces
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(str(target))
    return target


def for_family(base_dir: Path, family: str):
    """The base tokenizer with the family's special tokens, BOS/EOS and its published chat template."""
    from transformers import AutoTokenizer

    spec = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    specials = [t for t in [spec.get("bos"), spec["eos"], *spec["specials"]] if t]
    tok.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    if spec.get("added"):
        tok.add_tokens(spec["added"])
    tok.eos_token = spec["eos"]
    tok.bos_token = spec.get("bos")
    tok.chat_template = (FIXTURES / f"{family}.jinja").read_text()
    return tok
