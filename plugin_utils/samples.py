"""Sample answers of the trained model, so that a run shows what the model learned, not only its loss.

A few held-out rows of the prepared data (the eval split's first rows, then the training split's last ones) are
split where their last trained span begins: the tokens before it are the prompt, the span is the reference answer.
That is exactly what was trained, for every row format (a chat row carries its template and generation prompt up
to the answer) without rendering anything again. Of a multi-turn conversation the last trained assistant turn is
taken: its prompt holds the whole conversation before it, as a chat model is used, earlier answers included as
they were trained. Rank 0 answers them greedily after the final save (worker.py); the parent logs them, writes
samples.jsonl beside the adapter and gives a lab SDK job its evals. Torch is imported only to generate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SAMPLES_FILE = "samples.jsonl"
# The longest answer generated, whatever the references' length: it bounds the time samples cost.
MAX_NEW_TOKENS = 256
IGNORED = -100  # a label that takes no loss (data/encoding.py)
# Prompts answered in one generate call: the KV cache grows with the batch (64 prompts of 2k tokens would hold tens of
# GiB on a 7B model), while a few fill the device as well as many.
BATCH = 8
SHOWN_LINES = 3
SHOWN_CHARS = 240


@dataclass(frozen=True)
class Prompted:
    """One held-out row, split where its answer begins."""

    prompt: list[int]
    reference: list[int]


def split_row(input_ids: Sequence[int], labels: Sequence[int]) -> Prompted | None:
    """The row's prompt (every token before its last trained span) and reference (that span); None when nothing
    of it is trained."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORED:
        end -= 1
    if end == 0:
        return None
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORED:
        start -= 1
    return Prompted(list(input_ids[:start]), list(input_ids[start:end]))


def held_out(splits: Any, count: int) -> tuple[list[dict[str, list[int]]], str]:
    """Up to `count` prepared rows (input_ids and labels): the eval split's first rows, made up with the training
    split's last ones; and where they came from, in words."""
    rows: list[dict[str, list[int]]] = []
    sources = []
    for name, take_last in (("eval", False), ("train", True)):
        split = splits.get(name)
        wanted = min(count - len(rows), len(split) if split is not None else 0)
        if wanted <= 0:
            continue
        picked = range(len(split) - wanted, len(split)) if take_last else range(wanted)
        rows += split.select(picked).select_columns(["input_ids", "labels"]).to_list()
        sources.append("the eval split" if name == "eval" else "the last training rows")
    return rows, " and ".join(sources)


def prompts_of(rows: list[dict[str, list[int]]], special_ids: set[int]) -> list[Prompted]:
    """The rows that have a prompt to answer: a row trained on every token (text rows; completion_only_loss off)
    has none, or only special tokens (a BOS) before its answer."""
    found = []
    for row in rows:
        split = split_row(row["input_ids"], row["labels"])
        if split is not None and any(token not in special_ids for token in split.prompt):
            found.append(split)
    return found


def stop_ids(prompts: list[Prompted], tokenizer, generation_eos: int | list[int] | None) -> list[int]:
    """The tokens that end an answer: the model's and tokenizer's EOS, and each trained answer's own closing
    special token (a chat template's end of turn, which need not be the EOS)."""
    ids = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    special = set(tokenizer.all_special_ids)
    closing = [p.reference[-1] for p in prompts if p.reference and p.reference[-1] in special]
    found = [*ids, tokenizer.eos_token_id, *closing]
    return list(dict.fromkeys(token for token in found if token is not None))


def new_tokens_for(prompts: list[Prompted], max_length: int) -> int:
    """As many new tokens as the longest reference answer, within MAX_NEW_TOKENS and the context length."""
    longest = max(len(p.reference) for p in prompts)
    room = max_length - max(len(p.prompt) for p in prompts)
    return max(1, min(MAX_NEW_TOKENS, longest, room))


def answer(model, tokenizer, prompts: list[Prompted], max_length: int) -> list[list[int]]:
    """Each prompt's greedy answer, its stop token excluded: in left-padded batches of BATCH, in eval mode (no
    dropout) with the KV cache, on the device the model is on."""
    from transformers import GenerationConfig

    stops = stop_ids(prompts, tokenizer, model.generation_config.eos_token_id)
    config = GenerationConfig(
        max_new_tokens=new_tokens_for(prompts, max_length),
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
    )
    model.eval()
    answers = []
    for first in range(0, len(prompts), BATCH):
        for row in _generate(model, prompts[first : first + BATCH], config):
            end = next((i for i, token in enumerate(row) if token in stops), len(row))
            answers.append(row[:end])
    return answers


def _generate(model, batch: list[Prompted], config) -> list[list[int]]:
    """The new tokens of one left-padded batch."""
    import torch

    width = max(len(p.prompt) for p in batch)
    device = next(model.parameters()).device
    pads = [width - len(p.prompt) for p in batch]
    ids = torch.tensor([[config.pad_token_id] * pad + p.prompt for p, pad in zip(batch, pads, strict=True)])
    mask = torch.tensor([[0] * pad + [1] * len(p.prompt) for p, pad in zip(batch, pads, strict=True)])
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return out[:, width:].tolist()


def records(tokenizer, prompts: list[Prompted], answers: list[list[int]]) -> list[dict[str, str]]:
    """The samples as samples.jsonl and the job's evals hold them: input, expected_output, output (text)."""

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    return [
        {"input": text(p.prompt), "expected_output": text(p.reference), "output": text(answered)}
        for p, answered in zip(prompts, answers, strict=True)
    ]


def exact_match(sample: dict[str, str]) -> int:
    """The score a sample gets among a job's evals: 1 when the answer is the reference, word for word."""
    return int(sample["output"] == sample["expected_output"])


def shortened(text: str) -> str:
    """A text cut to a few lines for the log, saying when it was cut."""
    lines = text.splitlines() or [""]
    kept = "\n".join(lines[:SHOWN_LINES])
    if len(kept) > SHOWN_CHARS:
        kept = kept[:SHOWN_CHARS]
    return kept + (" [...]" if kept != text else "")


def log_lines(samples: list[dict[str, str]], source: str) -> list[str]:
    """The samples as the job's log shows them: each prompt, reference and answer, shortened."""
    lines = [f"sample answers of the trained model ({len(samples)}, greedy, from {source}):"]
    for number, sample in enumerate(samples, 1):
        lines.append(f"sample {number}/{len(samples)}")
        for label, key in (("prompt", "input"), ("reference", "expected_output"), ("answer", "output")):
            lines.append(f"  {label}: " + shortened(sample[key]).replace("\n", "\n    "))
    return lines


def to_jsonl(samples: list[dict[str, str]]) -> str:
    return "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
