"""Token-exact training data, proven on real chat templates and real tokenizers (info.md, "Data").

The property test renders conversations of several shapes for every published chat template in
fixtures/chat_templates × two real tokenizer kinds (byte-level BPE; Llama-2/Mistral SentencePiece with a
dummy prefix and byte fallback; plus Mistral's instruct tokenizer with control tokens for the [INST]
templates), and checks at token level:
- input_ids are exactly what `apply_chat_template(..., tokenize=True)` gives at inference;
- labels are -100 or the token itself;
- no token of a user, system or tool message, and no role marker, is ever trained;
- every answer the template renders is trained, each turn closed by its end-of-turn token;
- an answer whose words also fill the question trains exactly the same tokens;
- every turn located from two renderings trains exactly the tokens the per-turn method trains.
A conversation the template itself refuses is a RowProblem (exit 2 with the row), never a wrong row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_tokenizers as rt  # noqa: E402

from plugin_utils import chat, params, planning  # noqa: E402
from plugin_utils.data import encoding  # noqa: E402
from plugin_utils.errors import RowProblem  # noqa: E402
from tests.conftest import prepare_data  # noqa: E402

# One worker runs this file: its tokenizers are built once per worker, so spreading it would build them twice.
pytestmark = pytest.mark.xdist_group("token_exact")

# Words that appear only in user, system and tool messages: none of them may ever be trained.
PROMPT_WORDS = ["Zebra", "Quartz", "Violin", "Walrus", "Maple", "Cobalt", "Falcon", "Nectar"]


def _user(i: int, extra: str = "") -> dict:
    return {"role": "user", "content": f"{PROMPT_WORDS[i % len(PROMPT_WORDS)]} question {i}?{extra}"}


SHAPES: dict[str, list[dict]] = {
    "single": [_user(0), {"role": "assistant", "content": "The answer is four."}],
    "system": [
        {"role": "system", "content": "Cobalt rules apply."},
        _user(1),
        {"role": "assistant", "content": "Sure, here it is."},
    ],
    "multi-turn": [
        {"role": "system", "content": "Falcon mode."},
        _user(2),
        {"role": "assistant", "content": "First answer."},
        _user(3),
        {"role": "assistant", "content": "Second answer."},
        _user(4),
        {"role": "assistant", "content": "Third answer."},
    ],
    "assistant-first": [
        {"role": "assistant", "content": "Hello, how can I help?"},
        _user(5),
        {"role": "assistant", "content": "Glad to help."},
    ],
    "repeated-answer": [
        _user(6, " Answer yes or no: yes"),
        {"role": "assistant", "content": "yes"},
        _user(7, " yes yes yes"),
        {"role": "assistant", "content": "yes"},
    ],
    "tool-calls": [
        _user(0, " What is the weather in Paris?"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call00001",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "name": "get_weather", "tool_call_id": "call00001", "content": "Walrus 20 degrees"},
        {"role": "assistant", "content": "It is 20 degrees."},
    ],
    "reasoning": [
        _user(1),
        {"role": "assistant", "content": "<think>\nearly thought\n</think>\n\nEarly answer."},
        _user(2),
        {"role": "assistant", "content": "<think>\nlate thought\n</think>\n\nLate answer."},
    ],
    "reasoning-field": [
        _user(3),
        {"role": "assistant", "content": "Early answer.", "reasoning_content": "early thought"},
        _user(4),
        {"role": "assistant", "content": "Late answer.", "reasoning_content": "late thought"},
    ],
    "trailing-newlines": [_user(5), {"role": "assistant", "content": "An answer.\n\n"}, _user(6)],
    "unicode": [_user(7, " Grüße 😀"), {"role": "assistant", "content": "Grüße aus Köln 你好 😀 naïve."}],
}

# Added tokens answers may contain (reasoning and tool-call tags), besides each family's own (real_tokenizers).
CONTENT_TOKENS = {"<think>", "</think>", "<tool_call>", "</tool_call>"}
TEMPLATES = sorted(path.stem for path in rt.FIXTURES.glob("*.jinja"))


def test_every_fixture_template_has_a_family():
    assert set(TEMPLATES) == set(rt.FAMILIES)


@pytest.fixture(scope="session")
def family_tokenizers(bases):
    cache = {}

    def get(base: str, family: str):
        if (base, family) not in cache:
            cache[base, family] = rt.for_family(bases[base], family)
        return cache[base, family]

    return get


_ENCODERS: dict = {}


def _stop_ids(tok, family: str) -> tuple[int, ...]:
    """The ids the family's generation_config.json lists as eos_token_id."""
    return tuple(tok.convert_tokens_to_ids(t) for t in rt.FAMILIES[family].get("stops", ()))


def _encoder(tok, columns=("messages",), stop_ids: tuple[int, ...] = ()):
    """One encoder per tokenizer and format, as one preparation has (building one copies the tokenizer)."""
    key = (id(tok), columns, stop_ids)
    if key not in _ENCODERS:
        fmt = "chat_prompt_completion" if "prompt" in columns else "chat"
        encoder = encoding.Encoder(params.defaults().data, fmt, tok, list(columns), True, stop_ids)
        _ENCODERS[key] = (tok, encoder)
    return _ENCODERS[key][1]


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, run = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [*runs, run] if run else runs


def _answer(message: dict) -> str:
    """The part of an answer every template renders: the final answer without reasoning, stripped."""
    return message["content"].split("</think>")[-1].strip()


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("family", TEMPLATES)
@pytest.mark.parametrize("base", ["byte-bpe", "sentencepiece"])
def test_chat_rows_train_exactly_the_assistant_tokens(family_tokenizers, base, family, shape):
    _check_chat_row(family_tokenizers(base, family), family, shape)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("family", ["mistral-v0.1", "mistral-v0.3", "llama-2"])
def test_mistral_templates_on_the_instruct_tokenizer_with_control_tokens(family_tokenizers, family, shape):
    """Mistral's instruct tokenizer v3, whose [INST], [/INST] and tool tokens are real control tokens."""
    tok = family_tokenizers("mistral-instruct-v3", family)
    assert tok.convert_ids_to_tokens(tok("[INST]", add_special_tokens=False)["input_ids"]) == ["[INST]"]
    _check_chat_row(tok, family, shape)


def _check_chat_row(tok, family: str, shape: str) -> None:
    messages = chat.normalize(json.loads(json.dumps(SHAPES[shape])), "messages")
    spec = rt.FAMILIES[family]
    encoder = _encoder(tok, stop_ids=_stop_ids(tok, family))
    try:
        inference = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    except Exception as exc:  # the template refuses this conversation: so must the plugin, in its words
        with pytest.raises(RowProblem, match="the chat template refused this conversation") as refused:
            encoder.encode({"messages": messages})
        assert str(exc).strip() in str(refused.value)
        return
    encoded = encoder.encode({"messages": messages})
    ids, labels = encoded["input_ids"], encoded["labels"]

    if spec.get("stops") and messages[-1]["role"] == "assistant":
        # The template writes nothing after the last answer; the model ends it with the next turn's opener,
        # which it stops on at inference: that token is appended and trained.
        inference = [*inference, tok.convert_tokens_to_ids(spec["stops"][1])]
    assert ids == inference  # exactly the tokens of inference, one tokenization
    assert all(label in (-100, token) for token, label in zip(ids, labels, strict=True))

    specials = set(tok.all_special_tokens) | set(tok.get_added_vocab())
    trained_pieces = [tok.convert_ids_to_tokens(run) for run in _runs(ids, labels)]
    flat = [piece for run in trained_pieces for piece in run]
    allowed = spec["closers"] | spec["inside"] | CONTENT_TOKENS
    assert not [p for p in flat if p in specials and p not in allowed], trained_pieces

    trained_text = "".join(tok.decode(run) for run in _runs(ids, labels))
    for word in PROMPT_WORDS:
        assert word not in trained_text, (word, trained_text)
    full = encoded["text"]
    for message in messages:
        answer = _answer(message)
        if message["role"] == "assistant" and answer and answer in full:
            assert answer.replace(" ", "") in trained_text.replace(" ", ""), (answer, trained_text)

    rendered = [m for m in messages if m["content"] or not spec.get("skips_empty")]
    assistant_turns = sum(1 for m in rendered if m["role"] == "assistant")
    if spec["ends"]:
        runs = _runs(ids, labels)
        assert len(runs) == assistant_turns, trained_pieces
        for run in trained_pieces:
            assert run[-1] in spec["closers"], run  # each turn is closed by its end-of-turn token
        assert not encoded["planned"].open_turn
    else:
        assert encoded["planned"].open_turn  # no stop token to learn: flagged for the warning


@pytest.mark.parametrize("family", TEMPLATES)
@pytest.mark.parametrize("base", ["byte-bpe", "sentencepiece"])
def test_an_answer_repeated_in_the_question_trains_the_same_tokens(family_tokenizers, base, family):
    tok = family_tokenizers(base, family)
    plain = [_user(0), {"role": "assistant", "content": "yes"}, _user(1), {"role": "assistant", "content": "no"}]
    echoed = [
        _user(0, " yes or no? yes, yes."),
        {"role": "assistant", "content": "yes"},
        _user(1, " no no yes no"),
        {"role": "assistant", "content": "no"},
    ]
    encoder = _encoder(tok)
    try:
        first, second = (encoder.encode({"messages": conversation}) for conversation in (plain, echoed))
    except RowProblem:
        pytest.skip(f"{family} refuses this conversation shape")
    trained = [
        [token for token, label in zip(e["input_ids"], e["labels"], strict=True) if label != -100]
        for e in (first, second)
    ]
    assert trained[0] == trained[1]
    assert trained[0]


def test_trl_conversational_prompt_completion_trains_only_the_completion(family_tokenizers):
    tok = family_tokenizers("byte-bpe", "qwen2.5")
    prompt = [_user(0), {"role": "assistant", "content": "Earlier answer."}, _user(1)]
    completion = [{"role": "assistant", "content": "The real answer."}]
    encoded = _encoder(tok, columns=("prompt", "completion")).encode({"prompt": prompt, "completion": completion})
    assert encoded["input_ids"] == tok.apply_chat_template(prompt + completion, tokenize=True)["input_ids"]
    runs = [tok.decode(run) for run in _runs(encoded["input_ids"], encoded["labels"])]
    assert runs == ["The real answer.<|im_end|>"]


# --- prompt/completion, template and text rows on a SentencePiece tokenizer ---------------------------


@pytest.fixture(scope="session")
def spm_appending_eos_tokenizer(spm_appending_eos):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(spm_appending_eos))


@pytest.fixture(scope="session")
def spm_appending_eos(tmp_path_factory) -> Path:
    """Mistral-7B v0.1's Llama-2-style tokenizer, set to append EOS itself (add_eos_token)."""
    return rt.sentencepiece_dir(tmp_path_factory.mktemp("spm-eos"), "tokenizer.model.v1", add_eos_token=True)


def _text_encoder(tok, fmt: str, columns: list[str], **overrides):
    p = params.defaults().replace(**overrides)
    train_part_only, _ = planning.loss_mode(p, fmt)
    return encoding.Encoder(p.data, fmt, tok, columns, train_part_only)


def test_a_completion_is_tokenized_with_its_prompt_not_on_its_own(bases):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bases["sentencepiece"]))
    prompt, completion = "### Response:\n", "hi there"
    # The bug this replaces: tokenized apart, the completion gets a dummy-prefix "▁hi" never seen at inference.
    assert tok.convert_ids_to_tokens(tok(completion, add_special_tokens=False)["input_ids"])[0] == "▁hi"
    encoded = _text_encoder(tok, "prompt_completion", ["prompt", "completion"]).encode(
        {"prompt": prompt, "completion": completion}
    )
    assert encoded["input_ids"] == tok(prompt + completion)["input_ids"] + [tok.eos_token_id]
    trained = [t for t, lab in zip(encoded["input_ids"], encoded["labels"], strict=True) if lab != -100]
    assert tok.convert_ids_to_tokens(trained) == ["hi", "▁there", "</s>"]
    assert encoded["labels"][0] == -100 and encoded["input_ids"][0] == tok.bos_token_id  # BOS once, not trained


@pytest.mark.parametrize(
    ("fmt", "row", "overrides"),
    [
        ("prompt_completion", {"prompt": "Question: 2+2?\nAnswer:", "completion": " 4"}, {}),
        ("prompt_completion", {"prompt": "Question: 2+2?\nAnswer:", "completion": " 4</s>"}, {}),
        ("text", {"text": "Just some text."}, {}),
        ("template", {"q": "2+2?", "a": "4"}, {"formatting_template": "Q: {{ q }}\nA: {{ a }}"}),
    ],
    ids=["pair", "pair-typed-eos", "text", "template"],
)
def test_a_tokenizer_that_appends_eos_gets_exactly_one(spm_appending_eos_tokenizer, fmt, row, overrides):
    tok = spm_appending_eos_tokenizer
    assert tok("x")["input_ids"][-1] == tok.eos_token_id  # the tokenizer really appends EOS
    encoded = _text_encoder(tok, fmt, list(row), **overrides).encode(row)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert ids.count(tok.bos_token_id) == 1 and labels[0] == -100
    assert ids == tok(encoded["text"])["input_ids"]  # one call, the tokenizer's own BOS and EOS
    pieces = tok.convert_ids_to_tokens([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
    assert "<s>" not in pieces


def test_the_boundary_rule_trains_a_token_that_straddles_the_answer_start(bases):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bases["byte-bpe"]))
    # The answer starts inside the token " yes" (its space belongs to the prompt).
    encoded = _text_encoder(tok, "prompt_completion", ["prompt", "completion"]).encode(
        {"prompt": "Answer: ", "completion": "yes"}
    )
    pieces = tok.convert_ids_to_tokens(encoded["input_ids"])
    trained = [p for p, lab in zip(pieces, encoded["labels"], strict=True) if lab != -100]
    assert trained == ["Ġyes", "<|endoftext|>"]
    # A token wholly inside the prompt, even right before the answer, is not trained.
    encoded = _text_encoder(tok, "prompt_completion", ["prompt", "completion"]).encode(
        {"prompt": "Answer:", "completion": " yes"}
    )
    pieces = tok.convert_ids_to_tokens(encoded["input_ids"])
    assert [p for p, lab in zip(pieces, encoded["labels"], strict=True) if lab != -100] == ["Ġyes", "<|endoftext|>"]
    assert pieces[-3] == ":"


def test_whitespace_tokens_inside_an_answer_are_trained_despite_trimmed_offsets(bases):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bases["byte-bpe"]))  # GPT-2's post-processor trims offsets
    completion = " a\n\n\n  b   "
    encoded = _text_encoder(tok, "prompt_completion", ["prompt", "completion"]).encode(
        {"prompt": "Q:", "completion": completion}
    )
    trained = [t for t, lab in zip(encoded["input_ids"], encoded["labels"], strict=True) if lab != -100]
    assert tok.decode(trained) == completion + tok.eos_token


def test_a_model_folder_with_only_a_sentencepiece_model_prepares_token_exact(tmp_path):
    """A Llama-2/Mistral-style folder (tokenizer.model + tokenizer_config.json naming LlamaTokenizer, no
    tokenizer.json) through the whole preparation: loaded with AutoTokenizer, one tokenization per row."""
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(rt.mistral_common_file("tokenizer.model.v1").read_bytes())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    rows = [{"prompt": "### Response:\n", "completion": "hi there"}, {"prompt": "Q: yes?\nA:", "completion": " yes"}]
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in rows))
    p = params.defaults().replace(model_name=str(folder), dataset_name=str(dataset), adaptor_name="a")
    prepared = prepare_data(p)
    first, second = prepared.samples
    assert first["trained_tokens"] == ["hi", "▁there", "</s>"]
    assert second["trained_tokens"] == ["▁yes", "</s>"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    import datasets

    saved = datasets.load_from_disk(prepared.path)["train"]
    assert saved[0]["input_ids"] == tok(rows[0]["prompt"] + rows[0]["completion"])["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("base", ["byte-bpe", "sentencepiece"])
@pytest.mark.parametrize("answer", [" Line one\nLine two\n", "\n  indented  \n\n", "Plain answer."])
def test_a_turn_opening_token_that_swallows_the_answers_whitespace_is_never_trained(bases, base, answer):
    """Phi-3's `<|assistant|>`, `<|user|>`, `<|system|>` and `<|end|>` are added with rstrip=True, as in the
    published tokenizer.json: the header token absorbs the whitespace an answer starts with, so it covers
    characters of the trained span. It opens the turn and is part of the prompt at inference: never trained."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bases[base]))
    tokens = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, rstrip=True, normalized=False) for t in tokens]},
        replace_extra_special_tokens=False,
    )
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "<|endoftext|>"})
    tok.chat_template = (rt.FIXTURES / "phi-3.jinja").read_text()
    messages = [_user(0), {"role": "assistant", "content": answer}, _user(1), {"role": "assistant", "content": answer}]
    encoded = encoding.Encoder(params.defaults().data, "chat", tok, ["messages"], train_part_only=True).encode(
        {"messages": messages}
    )
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    pieces = [tok.convert_ids_to_tokens(run) for run in _runs(ids, labels)]
    assert len(pieces) == 2, pieces
    opener = tok.convert_tokens_to_ids("<|assistant|>")
    assert opener in ids and not [t for t, lab in zip(ids, labels, strict=True) if t == opener and lab != -100]
    assert pieces[0][-1] == "<|end|>" and pieces[1][-2:] == ["<|end|>", "<|endoftext|>"], pieces
    for run in pieces:
        assert "<|user|>" not in run and "<|assistant|>" not in run, run
    # What the answer holds beyond the whitespace the header token absorbed is trained.
    trained = "".join(tok.decode(run) for run in _runs(ids, labels))
    assert trained.count(answer.strip()) == 2, trained


def test_glm4_answers_end_with_the_stop_token_its_generation_config_lists(bases, tmp_path, monkeypatch):
    """GLM-4 closes an answer with the next turn's `<|user|>`, which its generation_config.json lists among the
    stop ids (eos_token_id [151329, 151336, 151338]): the model stops by writing it. Prepared from the model
    folder, each answer trains that token, the last answer (after which the template writes nothing) gets it
    appended, and no row is counted as ending without a special token. Without the stop ids (no
    generation_config.json), the answers stay open and the warning says so."""
    monkeypatch.setenv("SFT_PREPARED_CACHE", str(tmp_path / "prepared"))
    tok = rt.for_family(bases["byte-bpe"], "glm-4")
    model = tmp_path / "glm"
    tok.save_pretrained(str(model))
    rows = tmp_path / "rows.jsonl"
    conversation = [
        _user(0),
        {"role": "assistant", "content": "First."},
        _user(1),
        {"role": "assistant", "content": "Second."},
    ]
    rows.write_text(json.dumps({"messages": conversation}) + "\n" + json.dumps({"messages": conversation[:2]}) + "\n")
    p = params.defaults().replace(model_name=str(model), dataset_name=str(rows), adaptor_name="a")
    user = tok.convert_tokens_to_ids("<|user|>")

    def trained_runs():
        from datasets import load_from_disk

        prepared = prepare_data(p)
        saved = load_from_disk(prepared.path)["train"]
        runs = [[tok.convert_ids_to_tokens(r) for r in _runs(row["input_ids"], row["labels"])] for row in saved]
        return prepared, runs

    prepared, runs = trained_runs()
    assert prepared.stats.open_turns == 2
    assert [len(r) for r in runs] == [2, 1] and all(run[-1] != "<|user|>" for row in runs for run in row)

    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, user, 7]}))
    prepared, runs = trained_runs()
    assert prepared.stats.open_turns == 0
    assert [[run[-1] for run in row] for row in runs] == [["<|user|>", "<|user|>"], ["<|user|>"]], runs
    assert all("<|assistant|>" not in run for row in runs for run in row)


def test_a_generic_tokenizer_read_without_transformers_gives_the_same_ids_tokens_and_text(bases, tmp_path):
    """The parent prepares text, prompt/completion and template rows with a generic fast tokenizer read by the
    `tokenizers` library alone (sources.PlainTokenizer), skipping transformers' import. Where it serves, it gives
    what transformers' PreTrainedTokenizerFast gives: the same BOS/EOS and ids, the same ids for every text with
    and without special tokens, the same pieces and decoded text, and so the same prepared rows. Folders as
    transformers 5 saves them (each family's special tokens on the byte-level tokenizer, the demo model's), and as
    Hub models saved by transformers 4 ship (added_tokens_decoder, special_tokens_map.json). Where transformers
    would change something, it does not serve."""
    from transformers import PreTrainedTokenizerFast

    from demo.tiny_model import build
    from plugin_utils.sources import PlainTokenizer, data_tokenizer

    folders = {"demo": build(tmp_path / "demo")}
    for family in TEMPLATES:
        rt.for_family(bases["byte-bpe"], family).save_pretrained(str(tmp_path / family))
        folders[family] = tmp_path / family
    hub = tmp_path / "saved-by-transformers-4"
    hub.mkdir()
    (hub / "tokenizer.json").write_text((tmp_path / "llama-3.1" / "tokenizer.json").read_text())
    backend_tokens = json.loads((hub / "tokenizer.json").read_text())["added_tokens"]
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "rstrip", "special")} for t in backend_tokens}
    (hub / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "added_tokens_decoder": decoder,
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
            }
        )
    )
    specials = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "special": True}}
    (hub / "special_tokens_map.json").write_text(json.dumps(specials))
    folders["hub"] = hub

    texts = [
        "Plain words, and more words.",
        "  leading spaces\n\ttabs\n\nnewlines  ",
        "Grüße aus Köln 你好 😀",
        "<|endoftext|>inside<|eot_id|> <|im_start|>user\nhi<|im_end|>",
        "",
    ]
    for name, folder in folders.items():
        plain, real = PlainTokenizer.read(Path(folder)), PreTrainedTokenizerFast.from_pretrained(str(folder))
        assert plain is not None, name
        assert data_tokenizer(str(folder), chat=False).__class__ is PlainTokenizer
        assert (plain.eos_token, plain.eos_token_id, plain.bos_token, plain.bos_token_id) == (
            real.eos_token,
            real.eos_token_id,
            real.bos_token,
            real.bos_token_id,
        ), name
        for text in [*texts, *real.all_special_tokens]:
            for add in (True, False):
                ids = real(text, add_special_tokens=add)["input_ids"]
                assert plain._tokenizer.encode(text, add_special_tokens=add).ids == ids, (name, text, add)
                assert real._tokenizer.encode(text, add_special_tokens=add).ids == ids, (name, text, add)
                assert plain.convert_ids_to_tokens(ids) == real.convert_ids_to_tokens(ids)
                for skip in (False, True):
                    assert plain.decode(ids, skip_special_tokens=skip) == real.decode(ids, skip_special_tokens=skip)
        data = params.defaults().data
        for fmt, columns, train_part_only in (
            ("prompt_completion", ["prompt", "completion"], True),
            ("text", ["text"], False),
        ):
            rows = [{"prompt": t, "completion": f" {t}!", "text": t} for t in texts]
            rows = [{k: row[k] for k in columns} for row in rows]
            ours = encoding.Encoder(data, fmt, plain, columns, train_part_only).encode_many(rows)
            theirs = encoding.Encoder(data, fmt, real, columns, train_part_only).encode_many(rows)
            assert [(r["input_ids"], r["labels"]) for r in ours] == [(r["input_ids"], r["labels"]) for r in theirs]

    refused = {
        "sentencepiece": bases["sentencepiece"],  # LlamaTokenizer: transformers builds its own backend
        "add_bos_token": {"add_bos_token": True},
        "a token the backend lacks": {"added_tokens_decoder": {"9999": {"content": "<extra>", "special": True}}},
        "clean-up": {"clean_up_tokenization_spaces": True},
        "two EOS": {"eos_token": "<|endoftext|>"},
    }
    for why, change in refused.items():
        if isinstance(change, Path):
            assert PlainTokenizer.read(change) is None, why
            continue
        folder = tmp_path / f"refused-{len(why)}"
        folder.mkdir()
        for file in ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"):
            (folder / file).write_text((hub / file).read_text())
        config = json.loads((hub / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
        assert PlainTokenizer.read(folder) is None, why
    assert data_tokenizer(str(hub), chat=True).__class__ is not PlainTokenizer  # chat templates need transformers


# --- every turn from two renderings, against the per-turn method (chat.ChatRenderer.locate) -------------

# The fixture templates whose check finds two renderings enough for plain conversations.
AT_ONCE = {
    "command-r7b",
    "deepseek-r1-distill",
    "gemma-2",
    "gemma-3",
    "glm-4",
    "gpt-oss",
    "granite-3.3",
    "kimi-k2",
    "llama-2",
    "llama-3.1",
    "llama-3.2",
    "mistral-v0.1",
    "mistral-v0.3",
    "phi-3",
    "phi-3.5",
    "qwen2.5",
    "qwen3",
    "qwen3-original",
    "smollm3",
    "solar",
    "zephyr",
}
# Conversations of user and assistant turns only, which all of them locate from two renderings.
PLAIN_SHAPES = ["single", "repeated-answer", "unicode"]


def _encoded_both_ways(encoder, messages) -> list:
    """The row's token ids, labels and flags as `locate` finds its turns, and as the per-turn method does."""
    results = []
    for fast in (True, False):
        encoder.chat.fast = fast
        try:
            encoded = encoder.encode({"messages": messages})
            flags = [
                getattr(encoded["planned"], flag) for flag in ("empty", "no_answer", "reasoning_dropped", "open_turn")
            ]
            results.append((encoded["input_ids"], encoded["labels"], flags))
        except RowProblem as exc:
            results.append(str(exc))
        finally:
            encoder.chat.fast = True
    return results


@pytest.mark.parametrize(
    ("base", "family"),
    [(base, family) for base in ("byte-bpe", "sentencepiece") for family in TEMPLATES]
    + [("mistral-instruct-v3", family) for family in ("mistral-v0.1", "mistral-v0.3", "llama-2")],
)
def test_two_renderings_train_exactly_the_tokens_the_per_turn_method_trains(family_tokenizers, base, family):
    tok = family_tokenizers(base, family)
    encoder = _encoder(tok, stop_ids=_stop_ids(tok, family))
    renderer = encoder.chat
    shape = renderer.shape()
    for name, conversation in SHAPES.items():
        messages = chat.normalize(json.loads(json.dumps(conversation)), "messages")
        fast, reference = _encoded_both_ways(encoder, messages)
        assert fast == reference, name
        if family in AT_ONCE and name in PLAIN_SHAPES and not isinstance(reference, str):
            assert chat._features(messages, None, 0, renderer._special) <= shape.allowed, name
            assert renderer._located_at_once(messages, 0, shape) == renderer.locate_per_turn(messages), name


def test_a_two_turn_conversation_is_rendered_twice_not_six_times(family_tokenizers, monkeypatch):
    renderer = _encoder(family_tokenizers("byte-bpe", "qwen2.5")).chat
    renderer.shape()  # the template's check, once
    messages = chat.normalize(SHAPES["repeated-answer"], "messages")
    rendered, render = [], renderer.render
    monkeypatch.setattr(renderer, "render", lambda *args, **kwargs: rendered.append(1) or render(*args, **kwargs))
    fast = renderer.locate(messages)
    assert len(rendered) == 2
    rendered.clear()
    assert renderer.locate_per_turn(messages) == fast
    assert len(rendered) == 6


# The answer's header changes after the first answer: its generation prompt is no header of later answers.
RELABELLING = (
    "{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ 'assistant' if loop.index0 < 2 else 'assistant again' }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_the_check_rejects_is_located_turn_by_turn(family_tokenizers, monkeypatch):
    renderer = chat.ChatRenderer(family_tokenizers("byte-bpe", "qwen2.5"), RELABELLING, "messages")
    assert renderer.shape() is None
    messages = chat.normalize(SHAPES["repeated-answer"], "messages")
    rendered, render = [], renderer.render
    monkeypatch.setattr(renderer, "render", lambda *args, **kwargs: rendered.append(1) or render(*args, **kwargs))
    located = renderer.locate(messages)
    renders = len(rendered)
    assert located == renderer.locate_per_turn(messages)
    assert len(rendered) == 2 * renders > 2 * 2
    assert [located.text[t.start : t.end] for t in located.turns] == [
        "yes<|im_end|>",
        " again\nyes<|im_end|>",  # the per-turn method's own reading of this template
    ]


def test_a_row_feature_whose_probes_disagree_is_located_turn_by_turn(family_tokenizers):
    """Qwen2.5 closes a tool call after its arguments: the text after a final plain answer is no guide there."""
    renderer = _encoder(family_tokenizers("byte-bpe", "qwen2.5")).chat
    shape = renderer.shape()
    assert shape is not None and "tools" not in shape.allowed
    messages = chat.normalize(json.loads(json.dumps(SHAPES["tool-calls"])), "messages")
    reference = renderer.locate_per_turn(messages)
    assert renderer.locate(messages) == reference
    assert renderer._located_at_once(messages, 0, shape) != reference  # what the check kept out
    assert [t.closed for t in reference.turns] == [True, True]


@pytest.mark.parametrize("family", TEMPLATES)
def test_plain_messages_render_directly_exactly_as_apply_chat_template(family_tokenizers, family):
    """Every plain conversation of the matrix, cut after every message, with and without the generation
    prompt, with each answer marked: the same text or the same refusal."""
    for base in ("byte-bpe", "sentencepiece"):
        tok = family_tokenizers(base, family)
        renderer = _encoder(tok).chat
        renderer.shape()
        assert renderer._direct is not None
        for conversation in SHAPES.values():
            messages = chat.normalize(json.loads(json.dumps(conversation)), "messages")
            answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            marked = [messages[i] if i not in answers else chat._marked(m, f"<{i}>") for i, m in enumerate(messages)]
            for variant in (messages, marked, [chat._marked(m) if m["role"] == "assistant" else m for m in messages]):
                if not chat._plain(variant):
                    continue
                for end in range(1, len(variant) + 1):
                    for generation in (False, True):
                        outcomes = []
                        for direct in (True, False):
                            try:
                                outcomes.append(
                                    renderer._render_directly(variant[:end], generation, *renderer._direct)
                                    if direct
                                    else tok.apply_chat_template(
                                        variant[:end], tokenize=False, add_generation_prompt=generation
                                    )
                                )
                            except Exception as exc:
                                outcomes.append((type(exc), str(exc)))
                        assert outcomes[0] == outcomes[1], (base, end, generation)


@pytest.mark.parametrize("base", ["byte-bpe", "sentencepiece"])
def test_chat_rows_prepared_in_one_process_per_cpu_match_one_process(bases, tmp_path, monkeypatch, base):
    """Chat rows go to worker processes from encoding.PARALLEL_CHAT_ROWS on, fewer rows than other rows need:
    the rows those processes prepare with a real tokenizer and template are exactly the ones a single process
    prepares."""
    from datasets import load_from_disk

    tok = rt.for_family(bases[base], "qwen2.5")
    model = tmp_path / "model"
    tok.save_pretrained(str(model))
    conversations = [
        [
            _user(i),
            {"role": "assistant", "content": f"Answer {i}."},
            _user(i + 1),
            {"role": "assistant", "content": "Ok"},
        ]
        for i in range(24)
    ]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    p = params.defaults().replace(model_name=str(model), dataset_name=str(rows), adaptor_name="a")

    def prepared(cache: str, threshold: int):
        monkeypatch.setenv("SFT_PREPARED_CACHE", str(tmp_path / cache))
        monkeypatch.setattr(encoding, "PARALLEL_CHAT_ROWS", threshold)
        return load_from_disk(prepare_data(p).path)["train"]

    single, parallel = prepared("single", 10**9), prepared("parallel", 8)
    assert parallel["input_ids"] == single["input_ids"]
    assert parallel["labels"] == single["labels"]
    assert any(label != -100 for row in single["labels"] for label in row)
