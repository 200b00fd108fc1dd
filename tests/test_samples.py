"""Sample answers (samples.py): each held-out row's prompt and reference taken from its prepared tokens on real
tokenizers, the trained model's greedy answers, and what the parent makes of the rank's event."""

from __future__ import annotations

import logging

import pytest

from plugin_utils import launch, params, planning, samples
from plugin_utils.data import encoding
from plugin_utils.runfolder import Event, RunFolder, Sampled

from . import real_tokenizers as rt
from .test_launch import RecordingHost, relay

# The real tokenizers (conftest.bases) are built once per worker: the one that runs test_token_exact.py.
pytestmark = pytest.mark.xdist_group("token_exact")

CONVERSATION = [
    {"role": "system", "content": "Falcon mode."},
    {"role": "user", "content": "Zebra question?"},
    {"role": "assistant", "content": "First answer."},
    {"role": "user", "content": "Quartz question?"},
    {"role": "assistant", "content": "Second answer."},
]


def encoded(tok, fmt: str, columns: list[str], row: dict, **overrides) -> dict[str, list[int]]:
    """The row as the prepared dataset holds it (data/encoding.py), under the loss mode `auto` gives its format."""
    p = params.defaults().replace(**overrides)
    train_part_only, _ = planning.loss_mode(p, fmt)
    return encoding.Encoder(p.data, fmt, tok, columns, train_part_only).encode(row)


def test_a_multi_turn_chat_row_is_prompted_with_the_conversation_up_to_its_last_answer(bases):
    tok = rt.for_family(bases["byte-bpe"], "qwen2.5")
    row = encoded(tok, "chat", ["messages"], {"messages": CONVERSATION})
    split = samples.split_row(row["input_ids"], row["labels"])
    # Exactly what a chat model is given at inference: the template up to its generation prompt.
    expected = tok.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert split.prompt == expected
    assert tok.decode(split.reference) == "Second answer.<|im_end|>"
    assert samples.prompts_of([row], set(tok.all_special_ids)) == [split]
    # The answer ends at the template's end of turn, which is not this tokenizer's EOS.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in samples.stop_ids([split], tok, None)


def test_a_prompt_completion_row_is_prompted_with_its_prompt_and_answered_with_its_completion(bases):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bases["sentencepiece"]))
    row = encoded(
        tok, "prompt_completion", ["prompt", "completion"], {"prompt": "### Response:\n", "completion": "hi there"}
    )
    split = samples.split_row(row["input_ids"], row["labels"])
    assert split.prompt == tok("### Response:\n")["input_ids"]  # BOS and the prompt, as tokenized with the answer
    assert tok.convert_ids_to_tokens(split.reference) == ["hi", "▁there", "</s>"]
    [record] = samples.records(tok, [split], [tok("hi there", add_special_tokens=False)["input_ids"]])
    assert record == {"input": "### Response:", "expected_output": "hi there", "output": "hi there"}
    assert samples.exact_match(record) == 1


def test_text_rows_train_every_token_and_have_no_prompt_to_answer(bases):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bases["sentencepiece"]))
    row = encoded(tok, "text", ["text"], {"text": "Just some text."})
    assert samples.split_row(row["input_ids"], row["labels"]).prompt == [tok.bos_token_id]  # BOS alone
    assert samples.prompts_of([row], set(tok.all_special_ids)) == []
    assert samples.split_row([1, 2], [-100, -100]) is None


def test_held_out_rows_come_from_the_eval_split_then_the_last_training_rows():
    from datasets import Dataset, DatasetDict

    def split(first: int, count: int) -> Dataset:
        return Dataset.from_dict(
            {
                "input_ids": [[i] for i in range(first, first + count)],
                "labels": [[i] for i in range(first, first + count)],
                "length": [1] * count,
            }
        )

    both = DatasetDict({"train": split(0, 10), "eval": split(100, 2)})
    rows, source = samples.held_out(both, 4)
    assert [r["input_ids"] for r in rows] == [[100], [101], [8], [9]]
    assert set(rows[0]) == {"input_ids", "labels"}
    assert source == "the eval split and the last training rows"
    rows, source = samples.held_out(DatasetDict({"train": split(0, 10)}), 3)
    assert ([r["input_ids"] for r in rows], source) == ([[7], [8], [9]], "the last training rows")


def test_new_tokens_follow_the_longest_reference_within_the_cap_and_the_context():
    short, long = samples.Prompted([1] * 10, [2] * 5), samples.Prompted([1] * 3, [2] * 40)
    assert samples.new_tokens_for([short, long], max_length=128) == 40
    assert samples.new_tokens_for([short, long], max_length=30) == 20  # the longest prompt's room
    assert samples.new_tokens_for([samples.Prompted([1], [2] * 1000)], max_length=4096) == samples.MAX_NEW_TOKENS


def test_the_tiny_model_answers_greedily_in_left_padded_batches_and_stops_at_eos(tiny_model):
    """A real generation: the batch's answers are each prompt's own greedy answer alone, and none runs past its stop
    token or the longest reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.train()
    torch.manual_seed(0)
    prompts = [
        samples.Prompted(tok("Question: What is 2 plus 2?\nAnswer:")["input_ids"], [7] * 6),
        samples.Prompted(tok("Question: Hi?\nAnswer:")["input_ids"], [7] * 3),
    ]
    together = samples.answer(model, tok, prompts, max_length=128)
    assert not model.training  # eval mode: no dropout
    alone = [samples.answer(model, tok, [p], max_length=128)[0] for p in prompts]
    assert together[1][:3] == alone[1][:3] and together[0] == alone[0]
    stops = set(samples.stop_ids(prompts, tok, model.generation_config.eos_token_id))
    assert all(len(a) <= 6 and not stops & set(a) for a in together)
    # More prompts than one batch holds: answered batch by batch, in order.
    assert samples.answer(model, tok, prompts * samples.BATCH, max_length=128) == together * samples.BATCH


def test_a_generation_that_fails_is_a_note_for_one_warning_never_an_exception(tiny_model, tmp_path, worker):
    """A real failure: under a sharded strategy the first rank loads the saved adapter again, and here none was
    saved."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from .conftest import spec_of

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok("Question: Hi?\nAnswer: Hello")["input_ids"]
    data = DatasetDict({"train": Dataset.from_dict({"input_ids": [ids], "labels": [[-100] * 5 + ids[5:]]})})
    spec = spec_of(str(tmp_path), model_name=tiny_model, strategy="fsdp", adapter_staging=str(tmp_path / "none"))
    event = worker.sample_answers(spec, data, tok, trained=None)
    assert event.failed and event.samples == () and "none" in event.note


def test_rows_without_a_prompt_are_skipped_with_one_line_and_nothing_loaded(tiny_model, tmp_path, worker):
    """Text rows: every token trained. Nothing is loaded (the spec names no model that could be)."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from .conftest import spec_of

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok("Just some text.")["input_ids"] + [tok.eos_token_id]
    text = DatasetDict({"train": Dataset.from_dict({"input_ids": [ids], "labels": [ids]})})
    event = worker.sample_answers(spec_of(str(tmp_path), strategy="fsdp"), text, tok, trained=None)
    assert (event.samples, event.failed) == ((), False) and event.note.startswith("none: no row has a prompt")
    watcher = launch.Watcher(RecordingHost(), RunFolder(str(tmp_path)))
    relay(watcher, event)
    assert watcher.host.logs == [f"sample answers of the trained model: {event.note}"]


def test_the_parent_logs_each_sample_shortened_and_warns_once_when_none_could_be_made(tmp_path, caplog):
    watcher = launch.Watcher(RecordingHost(), RunFolder(str(tmp_path)))
    long_prompt = "\n".join(f"line {i}" for i in range(10))
    sample = {"input": long_prompt, "expected_output": "It is 4.", "output": "x" * 1000}
    relay(watcher, Event.from_json(Sampled(samples=(sample,), note="the eval split").to_json()))
    assert watcher.samples == [sample]
    assert watcher.host.logs[0] == "sample answers of the trained model (1, greedy, from the eval split):"
    assert watcher.host.logs[2] == "  prompt: line 0\n    line 1\n    line 2 [...]"
    assert watcher.host.logs[3] == "  reference: It is 4."
    assert watcher.host.logs[4] == "  answer: " + "x" * samples.SHOWN_CHARS + " [...]"

    watcher = launch.Watcher(RecordingHost(), RunFolder(str(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="sft"):
        relay(watcher, Sampled(samples=(), note="OutOfMemoryError: no room", failed=True))
    assert [r.getMessage() for r in caplog.records] == [
        "could not generate sample answers of the trained model: OutOfMemoryError: no room"
    ]
    assert watcher.samples == [] and watcher.host.logs == []
