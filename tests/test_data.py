"""plugin_utils.data: format detection, templating, tokenization with loss masks, truncation, cache, splits.

Everything runs against a real tiny byte-level BPE tokenizer built offline (demo/tiny_model.py). Its chat
template is ChatML WITHOUT {% generation %} markers, and its EOS (<|endoftext|>) differs from the turn end
marker (<|im_end|>).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402

from demo import tiny_model  # noqa: E402
from plugin_utils import data, params, validation  # noqa: E402
from plugin_utils.data import encoding  # noqa: E402
from plugin_utils.errors import InvalidConfig  # noqa: E402
from tests.conftest import prepare_data  # noqa: E402

SAMPLE = ROOT / "demo" / "sample_data.jsonl"
EOS = "<|endoftext|>"
END = "<|im_end|>"
TEMPLATE = "Question: {{ prompt }}\nAnswer:{{ completion }}"

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 9 plus 2?"},
    {"role": "assistant", "content": "It is 11."},
    {"role": "user", "content": "Spell stone backwards."},
    {"role": "assistant", "content": "enots"},
]
SHAREGPT = [
    {"from": "system", "value": "You are a terse assistant."},
    {"from": "human", "value": "What is the capital of Peru?"},
    {"from": "gpt", "value": "Lima."},
]


# --- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return str(tiny_model.build(tmp_path_factory.mktemp("m")))


@pytest.fixture(scope="session")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(autouse=True)
def _offline_isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SFT_PREPARED_CACHE", str(tmp_path / "prepared-cache"))
    monkeypatch.setenv("TFL_HOME_DIR", str(tmp_path / "tflhome"))
    monkeypatch.delenv("TFL_WORKSPACE_DIR", raising=False)


def write_jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def make_params(model_dir: str, dataset: str, **overrides) -> params.Params:
    return params.defaults().replace(
        **{
            "model_name": model_dir,
            "dataset_name": dataset,
            "adaptor_name": "test-adaptor",
            "maximum_sequence_length": 256,
            **overrides,
        }
    )


def saved(prepared: data.Prepared) -> datasets.DatasetDict:
    return datasets.load_from_disk(prepared.path)


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of tokens the loss is taken on."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            assert label == token, "a trained label must be the input token itself"
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def first_row(prepared: data.Prepared) -> tuple[list[int], list[int]]:
    row = saved(prepared)["train"][0]
    return row["input_ids"], row["labels"]


# --- format detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "overrides", "fmt", "text"),
    [
        ([{"text": "Plain training text."}], {}, "text", "Plain training text."),
        ([{"prompt": "Hi?", "completion": " Hello."}], {}, "prompt_completion", "Hi? Hello."),
        (
            [{"messages": CHAT}],
            {},
            "chat",
            "".join(f"<|im_start|>{m['role']}\n{m['content']}{END}\n" for m in CHAT),
        ),
        (
            [{"conversations": SHAREGPT}],
            {},
            "chat",
            "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n"
            "<|im_start|>assistant\nLima.<|im_end|>\n",
        ),
        (
            [{"question": "2+2?", "answer": "4", "id": 7}],
            {"formatting_template": "Q: {{ question }}\nA: {{ answer }}"},
            "template",
            "Q: 2+2?\nA: 4",
        ),
    ],
    ids=["text", "prompt_completion", "messages", "sharegpt", "template"],
)
def test_format_is_detected_and_rendered(tmp_path, model_dir, rows, overrides, fmt, text):
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare_data(make_params(model_dir, dataset, **overrides))
    assert prepared.stats.format == fmt
    assert prepared.samples[0]["text"] == text
    assert prepared.stats.rows == prepared.stats.rows_used == len(rows)


def test_sharegpt_roles_map_human_to_user_gpt_to_assistant_and_keep_system(tmp_path, model_dir, tok):
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"conversations": SHAREGPT}])
    prepared = prepare_data(make_params(model_dir, dataset))
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    mapped = [{"role": roles[m["from"]], "content": m["value"]} for m in SHAREGPT]
    assert prepared.samples[0]["text"] == tok.apply_chat_template(mapped, tokenize=False)
    ids, labels = first_row(prepared)
    runs = [decode(tok, run) for run in trained_runs(ids, labels)]
    assert len(runs) == 1
    assert runs[0] in ("Lima." + END, "Lima." + END + "\n")


def test_unknown_sharegpt_role_is_invalid(tmp_path, model_dir):
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "robot", "value": "beep"}]}])
    with pytest.raises(InvalidConfig):
        prepare_data(make_params(model_dir, dataset))


def test_rows_with_no_known_format_are_invalid_naming_dataset_name(tmp_path, model_dir):
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, dataset))
    assert [e.parameter for e in exc.value.errors] == ["dataset_name"]
    assert "foo" in str(exc.value) and "bar" in str(exc.value)


def test_apply_chat_template_wins_over_a_formatting_template(tmp_path, model_dir):
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    p = make_params(model_dir, dataset, apply_chat_template=True, formatting_template="{{ messages }}")
    assert prepare_data(p).stats.format == "chat"


@pytest.mark.parametrize("escape", ["{{ prompt.__class__ }}", "{{ ''.__class__.__mro__ }}"])
def test_sandbox_escape_in_formatting_template_is_invalid_config(tmp_path, model_dir, escape):
    # A user's template is a parameter: a blocked escape must end as InvalidConfig (exit 2), not a crash.
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "completion": " A."}])
    p = make_params(model_dir, dataset, formatting_template=escape + "{{ completion }}")
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(p)
    assert "formatting_template" in [e.parameter for e in exc.value.errors]


# --- prompt/completion and template labels ---------------------------------------------------------


@pytest.mark.parametrize("completion_suffix", ["", EOS], ids=["plain", "already-ends-with-eos"])
def test_prompt_tokens_are_masked_and_eos_ends_completion_once(tmp_path, model_dir, tok, completion_suffix):
    prompt, completion = "What is the capital of Peru?", " The capital of Peru is Lima."
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "completion": completion + completion_suffix}])
    prepared = prepare_data(make_params(model_dir, dataset))
    ids, labels = first_row(prepared)

    prompt_ids = tok(prompt)["input_ids"]
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids
    assert labels[:n] == [-100] * n  # every prompt token masked ...
    assert labels[n:] == ids[n:]  # ... and every completion token trained
    assert -100 not in labels[n:]
    assert ids[-1] == tok.eos_token_id
    assert ids.count(tok.eos_token_id) == 1
    assert decode(tok, ids[n:]) == completion + EOS
    assert prepared.samples[0]["trained_text"] == completion + EOS
    assert prepared.stats.trainable_tokens == len(ids) - n
    assert prepared.stats.total_tokens == len(ids)


def test_template_with_auto_completion_only_loss_splits_at_the_completion_field(tmp_path, model_dir, tok):
    row = {"prompt": "What is 9 plus 2?", "completion": " It is 11."}
    dataset = write_jsonl(tmp_path / "d.jsonl", [row])
    prepared = prepare_data(make_params(model_dir, dataset, formatting_template=TEMPLATE))
    assert prepared.stats.format == "template"
    sample = prepared.samples[0]
    assert sample["prompt"] == "Question: What is 9 plus 2?\nAnswer:"
    assert sample["completion"] == " It is 11."
    assert sample["trained_text"] == " It is 11." + EOS

    ids, labels = first_row(prepared)
    n = len(tok(sample["prompt"])["input_ids"])
    assert labels[:n] == [-100] * n
    assert labels[n:] == ids[n:]
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id


def test_template_splits_at_explicit_completion_column(tmp_path, model_dir):
    rows = [{"question": "2+2?", "answer": "4", "source": "math"}]
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    p = make_params(
        model_dir,
        dataset,
        formatting_template="Q: {{ question }}\nA: {{ answer }}\nSource: {{ source }}",
        completion_column="answer",
    )
    sample = prepare_data(p).samples[0]
    assert sample["prompt"] == "Q: 2+2?\nA: "
    # The byte-level token " 4" straddles the split (its space is the prompt's): it holds an answer
    # character, so it is trained whole; the prompt's other tokens are not.
    assert sample["trained_tokens"][0] == "Ġ4"
    assert sample["trained_text"] == " 4\nSource: math" + EOS


@pytest.mark.parametrize(
    ("rows", "overrides"),
    [
        ([{"prompt": "What is 9 plus 2?", "completion": " It is 11."}], {}),
        ([{"prompt": "What is 9 plus 2?", "completion": " It is 11."}], {"formatting_template": TEMPLATE}),
        ([{"messages": CHAT}], {}),
    ],
    ids=["prompt_completion", "template", "chat"],
)
def test_completion_only_loss_false_trains_every_token(tmp_path, model_dir, tok, rows, overrides):
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare_data(make_params(model_dir, dataset, completion_only_loss="false", **overrides))
    ids, labels = first_row(prepared)
    assert labels == ids
    assert prepared.stats.trainable_tokens == prepared.stats.total_tokens == len(ids)
    assert prepared.samples[0]["trained_text"] == decode(tok, ids)


def test_text_rows_train_every_token_and_end_with_one_eos(tmp_path, model_dir, tok):
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"text": "Hello! How can I help?" + EOS}])
    prepared = prepare_data(make_params(model_dir, dataset))
    ids, labels = first_row(prepared)
    assert labels == ids
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert decode(tok, ids) == "Hello! How can I help?" + EOS


def test_text_rows_with_completion_only_loss_true_are_invalid(tmp_path, model_dir):
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"text": "Plain text."}])
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, dataset, completion_only_loss="true"))
    assert [e.parameter for e in exc.value.errors] == ["completion_only_loss"]


@pytest.mark.parametrize(
    ("rows", "overrides"),
    [
        ([{"text": "Plain text."}], {}),
        ([{"prompt": "Q?", "completion": " A."}], {}),
        ([{"prompt": "Q?", "completion": " A."}], {"formatting_template": TEMPLATE}),
    ],
    ids=["text", "prompt_completion", "template"],
)
def test_assistant_only_loss_on_non_chat_data_is_invalid(tmp_path, model_dir, rows, overrides):
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, dataset, assistant_only_loss=True, **overrides))
    assert "assistant_only_loss" in [e.parameter for e in exc.value.errors]


# --- chat ------------------------------------------------------------------------------------------


def _assert_only_assistant_turns_trained(tok, ids, labels, messages, end_marker):
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = [decode(tok, run) for run in trained_runs(ids, labels)]
    assert len(runs) == len(assistant), runs
    for run, content in zip(runs, assistant, strict=True):
        # The turn's content and the template's end marker; the newline after the marker is allowed.
        assert run in (content + end_marker, content + end_marker + "\n"), (run, content)
    trained_text = "".join(runs)
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] not in trained_text
    assert "<|im_start|>" not in trained_text
    assert "user" not in trained_text and "system" not in trained_text


def test_multi_turn_chat_trains_exactly_the_assistant_turns(tmp_path, model_dir, tok):
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    prepared = prepare_data(make_params(model_dir, dataset))
    ids, labels = first_row(prepared)
    assert decode(tok, ids) == tok.apply_chat_template(CHAT, tokenize=False)
    _assert_only_assistant_turns_trained(tok, ids, labels, CHAT, END)
    assert prepared.stats.trainable_tokens == sum(1 for label in labels if label != -100)


def test_assistant_only_loss_trains_only_assistant_turns(tmp_path, model_dir, tok):
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    p = make_params(model_dir, dataset, assistant_only_loss=True, apply_chat_template=True)
    ids, labels = first_row(prepare_data(p))
    _assert_only_assistant_turns_trained(tok, ids, labels, CHAT, END)


def test_formatting_chat_template_override_trains_only_assistant_turns(tmp_path, model_dir, tok):
    override = (
        "{% for m in messages %}### {{ m['role'] | upper }}:\n{{ m['content'] }}\n[END]\n{% endfor %}"
        "{% if add_generation_prompt %}### ASSISTANT:\n{% endif %}"
    )
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"dialog": CHAT}])
    p = make_params(
        model_dir,
        dataset,
        apply_chat_template=True,
        chatml_formatted_column="dialog",
        formatting_chat_template=override,
    )
    prepared = prepare_data(p)
    assert prepared.stats.format == "chat"
    assert prepared.samples[0]["text"].startswith("### SYSTEM:\nYou are a terse assistant.\n[END]\n")
    ids, labels = first_row(prepared)
    runs = [decode(tok, run) for run in trained_runs(ids, labels)]
    # A plain-text end marker is trained with the turn; the newline after it is not the model's to write.
    assert runs == [m["content"] + "\n[END]" for m in CHAT if m["role"] == "assistant"]
    # No special token closes the turns: the model has no stop token to learn, and the statistics say so.
    assert prepared.stats.open_turns == 1


def test_chat_template_that_rewrites_earlier_turns_still_trains_each_assistant_turn(tmp_path, model_dir, tok):
    # Like templates that strip reasoning from earlier turns: the rendering of a prefix is not a prefix of
    # the whole conversation's rendering (here only the last message gets "<|last|>").
    override = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if loop.last %}<|last|>{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    p = make_params(model_dir, dataset, apply_chat_template=True, formatting_chat_template=override)
    ids, labels = first_row(prepare_data(p))
    runs = [decode(tok, run) for run in trained_runs(ids, labels)]
    contents = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert [run.split("<|")[0] for run in runs] == contents
    assert runs[0] == contents[0] + "<|im_end|>"  # the end-of-turn token is trained with the turn
    assert not any("user" in run or "system" in run for run in runs)


def test_apply_chat_template_without_the_column_is_invalid(tmp_path, model_dir):
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, dataset, apply_chat_template=True, chatml_formatted_column="dialog"))
    assert [e.parameter for e in exc.value.errors] == ["chatml_formatted_column"]


# --- cache -----------------------------------------------------------------------------------------


def test_second_prepare_with_same_inputs_is_a_cache_hit(tmp_path, model_dir):
    p = make_params(model_dir, str(SAMPLE), formatting_template=TEMPLATE)
    first = prepare_data(p)
    second = prepare_data(params.defaults().replace(**p.as_dict()))
    assert first.cached is False
    assert second.cached is True
    assert second.path == first.path
    assert second.stats == first.stats
    assert Path(first.path).is_relative_to(tmp_path / "prepared-cache")


def test_changed_template_is_a_cache_miss(tmp_path, model_dir):
    p = make_params(model_dir, str(SAMPLE), formatting_template=TEMPLATE)
    first = prepare_data(p)
    changed = prepare_data(p.replace(formatting_template="Q: {{ prompt }}\nA:{{ completion }}"))
    assert changed.cached is False
    assert changed.path != first.path
    assert saved(changed)["train"][0]["input_ids"] != saved(first)["train"][0]["input_ids"]


def test_changed_data_file_is_a_cache_miss(tmp_path, model_dir):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"prompt": "Q?", "completion": " A."}])
    first = prepare_data(make_params(model_dir, str(path)))
    write_jsonl(path, [{"prompt": "Q?", "completion": " B."}])
    second = prepare_data(make_params(model_dir, str(path)))
    assert second.cached is False and second.path != first.path


# --- bad files -------------------------------------------------------------------------------------


def test_malformed_jsonl_error_names_file_and_line(tmp_path, model_dir):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n')
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, str(path)))
    assert [e.parameter for e in exc.value.errors] == ["dataset_name"]
    assert str(path) in str(exc.value)
    assert "line 3" in str(exc.value)


def test_jsonl_line_that_is_not_an_object_is_invalid(tmp_path, model_dir):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, str(path)))
    assert "line 2" in str(exc.value)


@pytest.mark.parametrize("content", ["", "\n\n"], ids=["zero-bytes", "blank-lines"])
def test_empty_file_is_invalid(tmp_path, model_dir, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, str(path)))
    assert [e.parameter for e in exc.value.errors] == ["dataset_name"]


def test_missing_file_is_invalid(tmp_path, model_dir):
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, str(tmp_path / "nope" / "missing.jsonl")))
    assert [e.parameter for e in exc.value.errors] == ["dataset_name"]
    assert "missing.jsonl" in str(exc.value)


def test_unsupported_file_type_is_invalid(tmp_path, model_dir):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, str(path)))
    assert [e.parameter for e in exc.value.errors] == ["dataset_name"]


# --- truncation ------------------------------------------------------------------------------------

SHORT = {"prompt": "Hi?", "completion": " Hello."}
LONG_PROMPT = {"prompt": "What is the capital of Peru? " * 12, "completion": " Lima."}
LONG_COMPLETION = {"prompt": "Hi?", "completion": " The capital of Peru is Lima." * 6}


def test_rows_whose_trained_part_is_truncated_away_are_dropped_and_counted(tmp_path, model_dir, tok):
    rows = [SHORT] * 7 + [LONG_PROMPT] * 2 + [LONG_COMPLETION]
    assert len(tok(LONG_PROMPT["prompt"])["input_ids"]) > 16
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare_data(make_params(model_dir, dataset, maximum_sequence_length=16, max_dropped_fraction=0.3))
    stats = prepared.stats
    assert stats.rows == 10
    assert stats.dropped == 2
    assert stats.truncated == 3
    assert stats.rows_used == 8
    train = saved(prepared)["train"]
    assert len(train) == 8
    for row in train:
        assert 0 < len(row["input_ids"]) <= 16
        assert any(label != -100 for label in row["labels"])
    # The row with a long completion is kept, cut to the limit, still trained after its prompt.
    cut = train[7]
    n = len(tok(LONG_COMPLETION["prompt"])["input_ids"])
    assert len(cut["input_ids"]) == 16
    assert cut["labels"][:n] == [-100] * n and cut["labels"][n:] == cut["input_ids"][n:]


def test_dropping_more_than_max_dropped_fraction_is_invalid_naming_maximum_sequence_length(tmp_path, model_dir):
    rows = [SHORT] * 6 + [LONG_PROMPT] * 4
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    p = make_params(model_dir, dataset, maximum_sequence_length=16, max_dropped_fraction=0.3)
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(p)
    assert [e.parameter for e in exc.value.errors] == ["maximum_sequence_length"]
    assert "4 of 10" in str(exc.value)
    # The same rows pass once the fraction is accepted: the fraction is a rule over the prepared rows, not
    # part of preparing them, so they are reused as prepared.
    accepted = prepare_data(p.replace(max_dropped_fraction=0.5))
    assert accepted.stats.dropped == 4 and accepted.cached


# --- eval split ------------------------------------------------------------------------------------


def _row_keys(split) -> list[tuple]:
    return sorted(tuple(ids) for ids in split["input_ids"])


def test_eval_split_produces_an_eval_split_of_the_seeded_size(model_dir):
    total = sum(1 for line in SAMPLE.read_text().splitlines() if line.strip())
    whole = saved(prepare_data(make_params(model_dir, str(SAMPLE))))
    assert set(whole) == {"train"}

    p = make_params(model_dir, str(SAMPLE), eval_split=0.1, seed=42)
    prepared = prepare_data(p)
    assert prepared.stats.eval_rows > 0
    splits = saved(prepared)
    n_eval = math.ceil(0.1 * total)
    assert len(splits["eval"]) == n_eval == prepared.stats.eval_rows
    assert len(splits["train"]) == total - n_eval == prepared.stats.rows_used
    assert _row_keys(whole["train"]) == sorted(_row_keys(splits["train"]) + _row_keys(splits["eval"]))

    other_seed = saved(prepare_data(p.replace(seed=7)))
    assert len(other_seed["eval"]) == n_eval
    assert _row_keys(other_seed["eval"]) != _row_keys(splits["eval"])


@pytest.mark.parametrize("eval_name", ["validation.jsonl", "eval.jsonl", "test.jsonl"])
def test_validation_file_in_a_data_folder_is_the_eval_split(tmp_path, model_dir, tok, eval_name):
    folder = tmp_path / "data"
    train_rows = [{"prompt": f"Train question {i}?", "completion": f" Train answer {i}."} for i in range(6)]
    eval_rows = [{"prompt": f"Held-out question {i}?", "completion": f" Held-out answer {i}."} for i in range(3)]
    write_jsonl(folder / "train.jsonl", train_rows)
    write_jsonl(folder / eval_name, eval_rows)
    prepared = prepare_data(make_params(model_dir, str(folder), eval_split=0.2))
    assert prepared.stats.eval_rows > 0
    assert prepared.stats.rows == 6 and prepared.stats.eval_rows == 3
    splits = saved(prepared)
    assert sorted(decode(tok, ids) for ids in splits["eval"]["input_ids"]) == sorted(
        r["prompt"] + r["completion"] + EOS for r in eval_rows
    )
    assert sorted(decode(tok, ids) for ids in splits["train"]["input_ids"]) == sorted(
        r["prompt"] + r["completion"] + EOS for r in train_rows
    )


def test_prepared_folder_holds_only_input_ids_and_labels(model_dir):
    splits = saved(prepare_data(make_params(model_dir, str(SAMPLE))))
    assert splits["train"].column_names == ["input_ids", "labels"]


@pytest.mark.parametrize("fmt", ["template", "chat"])
def test_parallel_preparation_gives_the_same_rows_as_one_process(tmp_path, model_dir, monkeypatch, fmt):
    # Large datasets are prepared in one process per CPU: templates and tokenizers must survive pickling.
    assert encoding.PARALLEL_CHAT_ROWS > 40 and encoding.PARALLEL_ROWS > 40  # so `single` is one process
    if fmt == "template":
        rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(40)]
        extra = {"formatting_template": "Q: {{ question }}\nA: {{ answer }}"}
    else:
        rows = [{"messages": CHAT} for _ in range(40)]
        extra = {}
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    p = make_params(model_dir, dataset, **extra)
    single = saved(prepare_data(p))["train"]
    monkeypatch.setattr(encoding, "PARALLEL_ROWS", 10)
    monkeypatch.setattr(encoding, "PARALLEL_CHAT_ROWS", 10)
    monkeypatch.setenv("SFT_PREPARED_CACHE", str(tmp_path / "parallel-cache"))
    parallel = saved(prepare_data(p))["train"]
    assert parallel["input_ids"] == single["input_ids"]
    assert parallel["labels"] == single["labels"]


def _pc_rows(count: int = 6) -> list[dict]:
    return [{"prompt": f"What is {i} plus 1?", "completion": f" {i + 1}."} for i in range(count)]


def test_csv_and_parquet_files_load_like_jsonl(tmp_path, model_dir):
    import pandas as pd

    frame = pd.DataFrame(_pc_rows())
    frame.to_csv(tmp_path / "rows.csv", index=False)
    frame.to_parquet(tmp_path / "rows.parquet")
    reference = saved(prepare_data(make_params(model_dir, write_jsonl(tmp_path / "rows.jsonl", _pc_rows()))))
    for name in ("rows.csv", "rows.parquet"):
        prepared = prepare_data(make_params(model_dir, str(tmp_path / name)))
        assert prepared.stats.format == "prompt_completion"
        assert saved(prepared)["train"]["labels"] == reference["train"]["labels"]


def test_a_save_to_disk_folder_loads_with_its_validation_split(tmp_path, model_dir):
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(_pc_rows(8)), "validation": datasets.Dataset.from_list(_pc_rows(2))}
    ).save_to_disk(str(folder))
    unused = prepare_data(make_params(model_dir, str(folder)))
    assert unused.stats.eval_rows == 0 and unused.stats.own_eval_split == "validation"
    prepared = prepare_data(make_params(model_dir, str(folder), eval_split=0.1))
    assert prepared.stats.rows_used == 8 and prepared.stats.eval_rows == 2


def test_a_transformerlab_dataset_id_loads_the_files_of_its_folder(tmp_path, model_dir, monkeypatch):
    workspace = tmp_path / "ws"
    folder = workspace / "datasets" / "my-data"
    folder.mkdir(parents=True)
    (folder / "index.json").write_text('{"location": "local", "name": "my-data"}')
    write_jsonl(folder / "my-data_train.jsonl", _pc_rows(5))
    monkeypatch.setenv("TFL_WORKSPACE_DIR", str(workspace))
    prepared = prepare_data(make_params(model_dir, "my-data"))
    assert prepared.stats.rows == 5 and prepared.stats.format == "prompt_completion"


def test_an_unknown_dataset_name_offline_is_an_error_naming_dataset_name(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("TFL_WORKSPACE_DIR", str(tmp_path))
    with pytest.raises(InvalidConfig, match="dataset_name: 'someone/some-data' is not a data file"):
        prepare_data(make_params(model_dir, "someone/some-data"))


def test_a_null_in_the_first_row_does_not_hide_the_format(tmp_path, model_dir):
    rows = [{"prompt": None, "completion": "b"}, *_pc_rows(3)]
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", rows)))
    assert [e.line() for e in exc.value.errors] == [
        "dataset_name: row 1, column 'prompt' is empty (null). Give every row a prompt, or remove the row."
    ]


def test_an_eval_split_that_leaves_no_training_rows_is_an_error(tmp_path, model_dir):
    dataset = write_jsonl(tmp_path / "d.jsonl", _pc_rows(1))
    with pytest.raises(InvalidConfig, match=r"eval_split: 0\.5 of 1 rows leaves no training rows"):
        prepare_data(make_params(model_dir, dataset, eval_split=0.5))


def test_an_eval_split_always_holds_out_at_least_one_row(tmp_path, model_dir):
    prepared = prepare_data(make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", _pc_rows(5)), eval_split=0.01))
    assert (prepared.stats.rows_used, prepared.stats.eval_rows) == (4, 1)


def test_a_validation_file_whose_rows_are_all_cut_away_is_an_error(tmp_path, model_dir):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", _pc_rows(4))
    write_jsonl(folder / "validation.jsonl", [{"prompt": "word " * 400, "completion": " x"}])
    with pytest.raises(InvalidConfig, match="eval_split: the validation split has no row left"):
        prepare_data(make_params(model_dir, str(folder), maximum_sequence_length=64, eval_split=0.1))


# --- messy real rows: every bad row named, wherever it is ---------------------------------------------


def _write_csv(path: Path, rows: list[dict]) -> str:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _chat_rows(count: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(count)
    ]


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"text": 5}, "dataset_name: row 101, column 'text' holds a number (5), not text. Make it text."),
        (
            {"text": None},
            "dataset_name: row 101, column 'text' is empty (null). Give every row a text, or remove the row.",
        ),
        ({"text": ["a"]}, "dataset_name: row 101, column 'text' holds a list (['a']), not text. Make it text."),
    ],
    ids=["number", "null", "list"],
)
def test_a_bad_text_value_far_past_the_first_rows_names_its_row(tmp_path, model_dir, bad, expected):
    rows = [{"text": f"Row {i}."} for i in range(150)]
    rows[100] = bad
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, str(path)))
    assert [e.line() for e in exc.value.errors] == [expected]


def test_a_null_completion_far_past_the_first_rows_names_its_row(tmp_path, model_dir):
    rows = _pc_rows(150)
    rows[120]["completion"] = None
    with pytest.raises(InvalidConfig, match=r"dataset_name: row 121, column 'completion' is empty \(null\)"):
        prepare_data(make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", rows)))


def test_a_csv_messages_column_holding_json_text_is_parsed(tmp_path, model_dir, tok):
    rows = [{"messages": json.dumps(r["messages"])} for r in _chat_rows(80)]
    prepared = prepare_data(make_params(model_dir, _write_csv(tmp_path / "d.csv", rows)))
    assert prepared.stats.format == "chat" and prepared.stats.rows_used == 80
    assert prepared.samples[0]["trained_text"] == "Answer 0." + END


def test_a_csv_messages_cell_that_is_not_json_names_its_row(tmp_path, model_dir):
    rows = [{"messages": json.dumps(r["messages"])} for r in _chat_rows(80)]
    rows[70]["messages"] = "[{'role': 'user'"
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, _write_csv(tmp_path / "d.csv", rows)))
    assert [e.line() for e in exc.value.errors] == [
        "chatml_formatted_column: row 71, column 'messages' holds text that is not a JSON list of messages. "
        "Store a list of {role, content} objects."
    ]


def test_a_template_that_refuses_a_row_is_an_error_with_its_own_words(tmp_path, model_dir):
    rows = _chat_rows(90)
    rows[85]["messages"] = [{"role": "system", "content": "Be brief."}, *rows[85]["messages"]]
    gemma2 = (ROOT / "tests" / "fixtures" / "chat_templates" / "gemma-2.jinja").read_text()
    p = make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", rows), formatting_chat_template=gemma2)
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(p)
    [line] = [e.line() for e in exc.value.errors]
    assert line.startswith("chatml_formatted_column: row 86, column 'messages' the chat template refused this")
    assert "System role not supported" in line


def test_a_null_in_a_formatting_template_prints_nothing_never_none(tmp_path, model_dir):
    rows = [
        {"instruction": "Say hi.", "input": None, "output": "hi"},
        {"instruction": "Add.", "input": "1+1", "output": "2"},
    ]
    template = "{{ instruction }}\n{% if input %}Input: {{ input }}\n{% endif %}Context: {{ input }}|\n{{ output }}"
    prepared = prepare_data(
        make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", rows), formatting_template=template)
    )
    assert prepared.samples[0]["text"] == "Say hi.\nContext: |\nhi"
    assert "None" not in prepared.samples[0]["text"]


def test_a_null_completion_field_of_a_template_names_its_row(tmp_path, model_dir):
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(70)]
    rows[66]["a"] = None
    p = make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", rows), formatting_template="Q: {{ q }} A: {{ a }}")
    with pytest.raises(InvalidConfig, match=r"completion_column: row 67, column 'a' is empty \(null\)"):
        prepare_data(p)


@pytest.mark.parametrize("role", ["model", "gpt", "bot", "GPT"])
def test_assistant_role_aliases_inside_messages_are_trained(tmp_path, model_dir, tok, role):
    rows = [{"messages": [{"role": "human", "content": "Hi?"}, {"role": role, "content": "Hello."}]}]
    prepared = prepare_data(make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", rows)))
    assert prepared.samples[0]["trained_text"] == "Hello." + END
    assert prepared.samples[0]["text"].startswith("<|im_start|>user\nHi?")


def test_an_unknown_role_is_an_error_naming_it(tmp_path, model_dir):
    rows = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "narrator", "content": "x"}]}]
    with pytest.raises(InvalidConfig, match="message 2 has the unknown role 'narrator'"):
        prepare_data(make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", rows)))


def test_openai_content_parts_are_joined(tmp_path, model_dir):
    content = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]
    rows = [{"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "Ok."}]}]
    prepared = prepare_data(make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", rows)))
    assert "First part.\nSecond part." in prepared.samples[0]["text"]


def test_trl_conversational_prompt_completion_is_a_format(tmp_path, model_dir):
    rows = [
        {
            "prompt": [{"role": "user", "content": "Capital of Peru?"}],
            "completion": [{"role": "assistant", "content": "Lima."}],
        }
    ]
    prepared = prepare_data(make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", rows)))
    assert prepared.stats.format == "chat_prompt_completion"
    assert prepared.samples[0]["trained_text"] == "Lima." + END


def test_message_fields_reach_the_template(tmp_path, model_dir):
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}{% if m.name is defined %}({{ m.name }}){% endif %}\n"
        "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
        "{{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"city": "Lima"}}}
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "lookup", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."},
            ]
        },
        # Arrow gives this row's messages the fields of the row above, as nulls: they must not reach the template.
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
    ]
    p = make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", rows), formatting_chat_template=template)
    prepared = prepare_data(p, preview=2)
    first, second = prepared.samples
    assert first["trained_text"] == 'CALL lookup {"city": "Lima"}' + END + "Sunny." + END
    assert "<|im_start|>tool(lookup)sunny" in first["text"]  # chat templates trim the newline after a tag
    assert second["trained_text"] == "Hello." + END and "CALL" not in second["text"]


def test_empty_answers_and_rows_without_answers_are_counted_and_warned(tmp_path, model_dir):
    rows = [
        *_chat_rows(3),
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "Anyone?"}]},
    ]
    p = make_params(model_dir, write_jsonl(tmp_path / "d.jsonl", rows))
    prepared = prepare_data(p)
    assert (prepared.stats.empty_answers, prepared.stats.no_answer, prepared.stats.rows_used) == (1, 1, 4)
    warnings = [w.line() for _, w in validation.rows_with_nothing_to_train(p, prepared.stats)]
    assert warnings == [
        "dataset_name: 1 of 5 rows have no assistant turn and are left out. "
        "Check their roles (assistant, or gpt/model/bot).",
        "dataset_name: 1 of 5 rows have an empty answer (or tool calls the chat template does not render): "
        "only the end of that turn is trained. Fill in or remove those rows.",
    ]


def test_a_named_chat_column_that_does_not_exist_is_an_error_listing_the_columns(tmp_path, model_dir):
    dataset = write_jsonl(tmp_path / "d.jsonl", _chat_rows(2))
    with pytest.raises(InvalidConfig) as exc:
        prepare_data(make_params(model_dir, dataset, apply_chat_template=True, chatml_formatted_column="dialog"))
    assert [e.line() for e in exc.value.errors] == [
        "chatml_formatted_column: 'dialog' is not a column of the dataset (columns: messages). "
        "Name the column that holds the conversations."
    ]


@pytest.mark.parametrize("eval_split", [0, 0.2])
def test_a_dataset_split_and_eval_split_follow_the_written_rule(tmp_path, model_dir, eval_split):
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(_pc_rows(10)), "test": datasets.Dataset.from_list(_pc_rows(3))}
    ).save_to_disk(str(folder))
    p = make_params(model_dir, str(folder), eval_split=eval_split)
    prepared = prepare_data(p)
    warnings = [w.line() for _, w in validation.evaluation_named(p, prepared.stats)]
    if eval_split == 0:
        assert prepared.stats.eval_rows == 0 and not (prepared.stats.eval_rows > 0)
        assert warnings == [
            "eval_split: the dataset's 'test' split (3 rows) is not used because eval_split is 0. "
            "Set eval_split above 0 to evaluate on it."
        ]
    else:
        assert prepared.stats.eval_rows == 3 and prepared.stats.rows_used == 10
        assert warnings == [
            "eval_split: 0.2 is not applied: the dataset's own 'test' split (3 rows) is the evaluation set. "
            "Set eval_split to 0 to train without evaluation."
        ]


def test_encoded_batches_are_written_as_datasets_writes_python_lists(tmp_path):
    # encoding.build hands each batch to datasets as an Arrow table: its types and values must be those datasets
    # gives the same batch as Python lists (input_ids narrowed to int32), or the prepared files would change.
    out = {
        "input_ids": [[5, 6, 7], [], [8]],
        "labels": [[-100, 6, 7], [], [8]],
        "length": [3, 0, 1],
        "trained": [2, 0, 1],
        "empty": [0, 1, 0],
    }
    rows = datasets.Dataset.from_dict({"n": [1, 2, 3]})

    def written(batch_of):
        return rows.map(lambda _: batch_of(), batched=True, remove_columns=["n"], cache_file_name=None)

    as_lists, as_table = written(lambda: out), written(lambda: encoding._arrow_table(out))
    assert as_table.data.schema == as_lists.data.schema
    assert as_table.features == as_lists.features
    assert as_table.to_dict() == as_lists.to_dict() == out
