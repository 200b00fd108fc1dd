"""plugin_utils.templates: sandboxed per-row Jinja, split into prompt and completion at the completion field."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from plugin_utils.errors import InvalidConfig, RowProblem  # noqa: E402
from plugin_utils.templates import RowTemplate, printed_columns  # noqa: E402

ALPACA = (
    "### Instruction:\n{{ instruction }}\n{% if input %}### Input:\n{{ input }}\n{% endif %}### Response:\n{{ output }}"
)
ALPACA_COLUMNS = ["instruction", "input", "output"]


def _parameters(exc: pytest.ExceptionInfo) -> list[str]:
    return [p.parameter for p in exc.value.errors]


# --- splitting -------------------------------------------------------------------------------------


def test_split_happens_at_the_last_printed_column():
    template = RowTemplate("Question: {{ prompt }}\nAnswer:{{ completion }}", ["prompt", "completion"], split=True)
    assert template.completion_column == "completion"
    prompt, completion = template.split({"prompt": "What is 2+2?", "completion": " 4"})
    assert prompt == "Question: What is 2+2?\nAnswer:"
    assert completion == " 4"


def test_split_keeps_text_after_the_completion_field_in_the_completion():
    template = RowTemplate("<q>{{ q }}</q><a>{{ a }}</a>\n", ["q", "a"], split=True)
    prompt, completion = template.split({"q": "hi", "a": "there"})
    assert (prompt, completion) == ("<q>hi</q><a>", "there</a>\n")


def test_split_happens_at_an_explicit_completion_column_even_if_not_last():
    source = "{{ question }}\n=> {{ answer }}\n(source: {{ source }})"
    template = RowTemplate(source, ["question", "answer", "source"], "answer", split=True)
    assert template.completion_column == "answer"
    prompt, completion = template.split({"question": "Why?", "answer": "Because.", "source": "wiki"})
    assert prompt == "Why?\n=> "
    assert completion == "Because.\n(source: wiki)"


def test_explicit_completion_column_that_does_not_exist_is_invalid_and_lists_columns():
    with pytest.raises(InvalidConfig) as exc:
        RowTemplate("{{ q }} {{ a }}", ["q", "a"], "answer", split=True)
    assert _parameters(exc) == ["completion_column"]
    message = str(exc.value)
    assert "'answer'" in message
    assert "q, a" in message


def test_prompt_plus_completion_is_exactly_the_rendered_row():
    template = RowTemplate(ALPACA, ALPACA_COLUMNS, split=True)
    row = {"instruction": "Add.", "input": "1 and 2", "output": "3"}
    prompt, completion = template.split(row)
    assert prompt + completion == template.render(row)


def test_split_false_does_not_choose_a_completion_column():
    template = RowTemplate("{{ text }}", ["text"], split=False)
    assert template.completion_column == ""
    assert template.render({"text": "plain"}) == "plain"


@pytest.mark.parametrize(
    ("row", "expected_prompt"),
    [
        (
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            "### Instruction:\nAdd the numbers.\n### Input:\n2 and 3\n### Response:\n",
        ),
        (
            {"instruction": "Say hello.", "input": "", "output": "Hello!"},
            "### Instruction:\nSay hello.\n### Response:\n",
        ),
    ],
    ids=["with-input", "without-input"],
)
def test_if_input_conditional_renders_with_and_without_input(row, expected_prompt):
    template = RowTemplate(ALPACA, ALPACA_COLUMNS, split=True)
    assert template.completion_column == "output"
    prompt, completion = template.split(row)
    assert prompt == expected_prompt
    assert completion == row["output"]
    if not row["input"]:
        assert "### Input" not in template.render(row)


def test_unicode_content_survives_render_and_split():
    template = RowTemplate("Frage: {{ prompt }}\nAntwort: {{ completion }}", ["prompt", "completion"], split=True)
    row = {"prompt": "Wie heißt 東京 auf Ελληνικά? 🤔", "completion": "Τόκιο — ça va ✓ 😀\u200d"}
    prompt, completion = template.split(row)
    assert prompt == "Frage: Wie heißt 東京 auf Ελληνικά? 🤔\nAntwort: "
    assert completion == "Τόκιο — ça va ✓ 😀\u200d"
    assert template.render(row) == prompt + completion


def test_trailing_newline_is_kept():
    template = RowTemplate("{{ a }}\n", ["a"], split=False)
    assert template.render({"a": "x"}) == "x\n"


def test_completion_that_is_a_concatenated_expression_is_the_completion_field():
    # `{{ 'prefix' ~ answer }}` prints the answer column: it is the template's last column output.
    source = "Q: {{ question }}\nA: {{ 'The answer is ' ~ answer }}"
    assert printed_columns(source)[-1] == "answer"
    template = RowTemplate(source, ["question", "answer"], split=True)
    assert template.completion_column == "answer"
    prompt, completion = template.split({"question": "2+2?", "answer": "4"})
    assert prompt == "Q: 2+2?\nA: The answer is "
    assert completion == "4"


def test_completion_column_through_a_case_filter_still_splits():
    template = RowTemplate("Q: {{ question }} A: {{ answer | lower }}", ["question", "answer"], split=True)
    assert template.completion_column == "answer"
    assert template.split({"question": "2+2?", "answer": "FOUR"}) == ("Q: 2+2? A: ", "four")


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_column_is_invalid_and_lists_existing_columns():
    with pytest.raises(InvalidConfig) as exc:
        RowTemplate("{{ question }} {{ answr }}", ["question", "answer", "id"], split=False)
    assert _parameters(exc) == ["formatting_template"]
    message = str(exc.value)
    assert "answr" in message
    assert "question, answer, id" in message


def test_invalid_jinja_syntax_is_invalid_config_naming_formatting_template():
    with pytest.raises(InvalidConfig) as exc:
        RowTemplate("{{ prompt }} {% if %}", ["prompt"], split=False)
    assert _parameters(exc) == ["formatting_template"]
    assert "Jinja" in str(exc.value)


def test_unclosed_block_is_invalid_config_naming_formatting_template():
    with pytest.raises(InvalidConfig) as exc:
        RowTemplate("{% for x in prompt %}{{ x }}", ["prompt"], split=True)
    assert _parameters(exc) == ["formatting_template"]


def test_template_printing_no_column_with_split_is_invalid():
    with pytest.raises(InvalidConfig) as exc:
        RowTemplate("Just constant text.", ["prompt", "completion"], split=True)
    assert _parameters(exc) == ["formatting_template"]
    assert "no column" in str(exc.value)


def test_template_printing_no_column_without_split_renders():
    assert RowTemplate("constant", ["prompt"], split=False).render({"prompt": "x"}) == "constant"


# --- sandbox ---------------------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ prompt.__class__ }}",
    "{{ prompt.__class__.__base__.__subclasses__() }}",
    "{{ prompt.format.__globals__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ prompt.__len__() }}",
]


def _must_not_render(source: str, columns: list[str], row: dict, split: bool) -> None:
    try:
        template = RowTemplate(source, columns, split=split)
    except InvalidConfig:
        return
    with pytest.raises((SecurityError, InvalidConfig, RowProblem), match=r"not allowed|unsafe"):
        template.split(row) if split else template.render(row)


@pytest.mark.parametrize("source", ESCAPES)
def test_attribute_escapes_are_rejected_not_rendered(source):
    _must_not_render(source, ["prompt"], {"prompt": "hello"}, split=False)


@pytest.mark.parametrize("source", ESCAPES)
def test_attribute_escapes_are_rejected_when_splitting(source):
    _must_not_render(source + "{{ completion }}", ["prompt", "completion"], {"prompt": "a", "completion": "b"}, True)


def test_templates_cannot_mutate_row_values():
    template = RowTemplate("{{ items.append(1) }}{{ items }}", ["items"], split=False)
    with pytest.raises(RowProblem, match="is not allowed here") as exc:
        template.render({"items": [0]})
    assert exc.value.parameter == "formatting_template"


@pytest.mark.parametrize(
    "source",
    [
        "{% include '/etc/passwd' %}",
        "{% import '/etc/passwd' as x %}{{ prompt }}",
        "{% extends '/etc/passwd' %}",
        "{% from '/etc/hostname' import x %}{{ prompt }}",
    ],
)
def test_templates_cannot_read_files(source):
    secret = Path("/etc/passwd").read_text() if Path("/etc/passwd").exists() else "root:"
    try:
        template = RowTemplate(source, ["prompt"], split=False)
    except InvalidConfig:
        return
    rendered = None
    with pytest.raises(Exception):  # noqa: B017 - any failure is fine; rendering the file is not
        rendered = template.render({"prompt": "x"})
    assert rendered is None or secret not in rendered


@pytest.mark.parametrize(
    ("source", "plain"),
    [
        ("Q: {{ q }}\nA: {{ a }}", True),
        ("Q: {{ q }}\nA: {{ a }} (end)", True),
        ("Q: {{ q }}\nA: {{ a | trim }}", False),
        ("Q: {{ q }}{% if a %}\nA: {{ a }}{% endif %}", False),
        ("Q: {{ q }}\nA: {{ a }} / {{ a }}", False),
    ],
)
def test_one_rendering_splits_exactly_like_two(source, plain):
    rows = [{"q": "2+2?", "a": " 4 "}, {"q": "x", "a": ""}, {"q": "y", "a": 7}, {"q": "z", "a": "line\nline"}]
    fast = RowTemplate(source, ["q", "a"], "a", split=True)
    assert fast.printed_plainly is plain
    slow = RowTemplate(source, ["q", "a"], "a", split=True)
    slow.printed_plainly = False
    for row in rows:
        outcomes = []
        for template in (fast, slow):
            try:
                outcomes.append(template.split(row))
            except RowProblem as exc:  # `{% if a %}` with an empty answer: the prompt depends on it
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1]
        if isinstance(outcomes[0], tuple):
            assert "".join(outcomes[0]) == fast.render(row)
