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

_QWEN = dict(
    eos="<|im_end|>",
    specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    added=["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"],
    closers={"<|im_end|>"},
)
_LLAMA3 = dict(
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
    closers={"<|eot_id|>", "<|eom_id|>", "<|python_tag|>"},
)
_GEMMA = dict(bos="<bos>", eos="<eos>", specials=["<start_of_turn>", "<end_of_turn>"], closers={"<end_of_turn>"})
_INST = dict(bos="<s>", eos="</s>", specials=["[INST]", "[/INST]"], closers={"</s>"})
_PHI3 = dict(
    bos="<s>",
    eos="<|endoftext|>",
    specials=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
    closers={"<|end|>", "<|endoftext|>"},
)

# Per template: BOS, EOS, its special tokens, other added tokens; the special tokens that may close an
# assistant turn (`closers`) and those a template writes inside one (`inside`); `ends`: whether the template
# closes assistant turns with a special token at all.
FAMILIES: dict[str, dict] = {
    "llama-3.1": _LLAMA3,
    "llama-3.2": _LLAMA3,
    "gemma-2": _GEMMA,
    "gemma-3": _GEMMA,
    "mistral-v0.3": dict(
        bos="<s>",
        eos="</s>",
        specials=[
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ],
        closers={"</s>", "[TOOL_CALLS]"},
    ),
    "mistral-v0.1": _INST,
    "llama-2": _INST,
    "phi-3": _PHI3,
    "phi-3.5": _PHI3,
    "qwen2.5": _QWEN,
    "qwen3": _QWEN,
    "qwen3-original": _QWEN,
    "deepseek-r1-distill": dict(
        bos="<｜begin▁of▁sentence｜>",
        eos="<｜end▁of▁sentence｜>",
        specials=["<｜User｜>", "<｜Assistant｜>"],
        added=["<think>", "</think>"],
        closers={"<｜end▁of▁sentence｜>"},
    ),
    "smollm3": dict(
        eos="<|im_end|>", specials=["<|im_start|>", "<|im_end|>"], added=["<think>", "</think>"], closers={"<|im_end|>"}
    ),
    "solar": dict(bos="<s>", eos="</s>", specials=[], closers=set(), ends=False),
    # GLM-4 ends an answer with the next turn's opener, which generation_config.json lists as a stop id (`stops`).
    "glm-4": dict(
        eos="<|endoftext|>",
        specials=["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
        closers={"<|user|>", "<|observation|>"},
        stops=["<|endoftext|>", "<|user|>", "<|observation|>"],
        skips_empty=True,  # renders no message without content (an assistant turn of tool calls alone)
    ),
    "zephyr": dict(bos="<s>", eos="</s>", specials=["<|user|>", "<|assistant|>", "<|system|>"], closers={"</s>"}),
    "gpt-oss": dict(
        eos="<|return|>",
        specials=["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|final|>"],
        closers={"<|end|>", "<|return|>", "<|call|>"},
        # The final message of a turn with reasoning restarts as "<|start|>assistant<|channel|>final...".
        inside={"<|channel|>", "<|message|>", "<|start|>"},
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
        closers={"<|END_OF_TURN_TOKEN|>"},
        inside={
            "<|START_RESPONSE|>",
            "<|END_RESPONSE|>",
            "<|START_THINKING|>",
            "<|END_THINKING|>",
            "<|START_ACTION|>",
            "<|END_ACTION|>",
        },
    ),
    "granite-3.3": dict(
        bos="<|end_of_text|>",  # as Granite's tokenizer has it: BOS and EOS are one token
        eos="<|end_of_text|>",
        specials=["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"],
        closers={"<|end_of_text|>"},
        inside={"<|tool_call|>"},
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
        closers={"<|im_end|>"},
        inside={
            "<|tool_calls_section_begin|>",
            "<|tool_call_begin|>",
            "<|tool_call_argument_begin|>",
            "<|tool_call_end|>",
            "<|tool_calls_section_end|>",
        },
    ),
}
FAMILIES = {name: {"ends": True, "inside": set(), **spec} for name, spec in FAMILIES.items()}

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
