"""Chat rows: conversations as people store them, rendered by the chat template, and the characters of
every assistant turn located from the template's own structure, never by searching for the answer's text.

Where an assistant turn is, in the rendering of the whole conversation:
- its fields: the conversation is rendered again with that message's content (and reasoning, and tool-call
  arguments) replaced by a marker that cannot occur in real text. The two renderings differ exactly where
  the template printed those fields, however it rewrote them (trimmed, reasoning stripped, system folded in);
- its start: where the generation prompt for that turn ends (render the turns before it with
  add_generation_prompt). Text the template puts between the generation prompt and the content (a space,
  an empty <think></think>) is the model's to produce, so it is trained. Where the history is rendered
  differently once the turn is there, the turn's own header (or what the template puts between header and
  content when the message is last) marks the start instead;
- its end: the text the template emits right after the message when the message is the last one, as far as
  the whole conversation emits the same text, through its last special token (<|im_end|>, <|eot_id|>, </s>,
  <|end|>); where the last answer closes differently, the closer the template gives earlier messages.
  A token that opens a turn (BOS, a header, start or role token) ends the search: what belongs to the next
  turn is never part of it.

That takes about three renderings per assistant turn. Where a template allows it, two renderings locate every
turn of a conversation: the conversation, and the conversation with each assistant turn's fields replaced by a
marker of its own. The text between two turns' markers occurs exactly once where it can in the whole rendering,
and each turn's fields lie between; the generation prompt's header before the fields and the text the template
emits after a last answer, rendered once per template, give the start and the closing text. Whether a template
allows it is checked once per template and special tokens: both ways must locate the same turns on probe
conversations. A row holding anything the probes did not cover, or whose renderings do not fit together, is
located turn by turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import RowProblem

ROLES = {"system", "developer", "user", "assistant", "tool", "ipython", "function"}
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}
# Special tokens that open a turn rather than close one: a header, a start or beginning marker, a role.
_OPENER = re.compile(
    r"(?i)start|begin|header|\[INST\]|user|system|assistant|human|chatbot|^<[|｜]?(model|bot|tool)[|｜]?>$"
)
# Characters of Unicode's private use area: no tokenizer's text contains them by accident.
MARK = "\ue000\ue001mark\ue001\ue000"


CHAT = "chatml_formatted_column"


def kind(value: Any) -> str:
    """A value's type in a user's words."""
    if isinstance(value, bool):
        return "a true/false value"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _text_of(content: Any, where: str, column: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # OpenAI's list of parts; text parts joined by newlines, as vLLM's OpenAI server joins them.
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                part_kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowProblem(
                    CHAT,
                    column,
                    f"{where} has a content part of type {part_kind!r}; only text parts can be trained here",
                    "Keep only text parts in the content lists",
                )
        return "\n".join(texts)
    raise RowProblem(CHAT, column, f"{where} has {kind(content)} as content, not text", "Make it a string")


def normalize(value: Any, column: str) -> list[dict[str, Any]]:
    """The messages of one row with every field kept, roles mapped, content made text.

    Accepts role/content and ShareGPT from/value messages, a JSON string holding the list (CSV cells),
    and OpenAI content lists of text parts. Fields that are null are left out: Arrow gives every message
    every field any message has, and a template testing `'tool_calls' in message` must not see them.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowProblem(
                CHAT,
                column,
                "holds text that is not a JSON list of messages",
                "Store a list of {role, content} objects",
            ) from None
    if value is None:
        raise RowProblem(CHAT, column, "is empty (null)", "Give every row a list of messages, or remove the row")
    if not isinstance(value, list):
        raise RowProblem(
            CHAT,
            column,
            f"holds {kind(value)}, not a list of messages",
            "Store a list of {role, content} objects",
        )
    messages = []
    for number, raw in enumerate(value, 1):
        where = f"message {number}"
        if not isinstance(raw, dict):
            raise RowProblem(CHAT, column, f"{where} is not an object", "Make every message a {role, content} object")
        message = {k: v for k, v in raw.items() if v is not None and k not in ("from", "value")}
        role = raw.get("role") if raw.get("role") is not None else raw.get("from")
        if not isinstance(role, str) or not role:
            raise RowProblem(CHAT, column, f"{where} has no role", "Give every message a role (or ShareGPT 'from')")
        name = ROLE_ALIASES.get(role.strip().lower(), role.strip().lower())
        if name not in ROLES:
            raise RowProblem(
                CHAT,
                column,
                f"{where} has the unknown role {role!r}",
                "Use system, user, assistant or tool (human, gpt, model and bot are mapped)",
            )
        content = raw.get("content") if "content" in raw and raw.get("content") is not None else raw.get("value")
        message["role"] = name
        message["content"] = _text_of(content, where, column)
        if not message.get("tool_calls"):
            message.pop("tool_calls", None)
        messages.append(message)
    return messages


def tools_of(value: Any, column: str) -> list | None:
    """A row's tool definitions (TRL's `tools` column), given to the chat template as `tools`."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowProblem(
                CHAT, column, "holds text that is not JSON", "Store the tool definitions as a JSON list"
            ) from None
    if not isinstance(value, list):
        raise RowProblem(CHAT, column, "is not a list of tool definitions", "Store the tool definitions as a list")
    return value or None


def _marked(message: dict[str, Any], mark: str = MARK) -> dict[str, Any]:
    """The message with every field the model writes replaced by `mark`."""
    marked = {**message, "content": mark}
    for reasoning in ("reasoning_content", "thinking"):  # Qwen3/DeepSeek's field, gpt-oss's field
        if isinstance(message.get(reasoning), str) and message[reasoning]:
            marked[reasoning] = mark
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            call = dict(call) if isinstance(call, dict) else call
            if isinstance(call, dict):
                holder = call
                if isinstance(call.get("function"), dict):
                    holder = call["function"] = dict(call["function"])
                if "arguments" in holder:
                    holder["arguments"] = {mark: mark} if isinstance(holder["arguments"], dict) else mark
            calls.append(call)
        marked["tool_calls"] = calls
    return marked


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix (binary search over slices: C comparisons, not a Python loop)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def differing(text: str, other: str) -> tuple[int, int]:
    """(start, end) of the part of `text` that differs from `other`: their common prefix and suffix removed."""
    start = common_prefix(text, other)
    return start, len(text) - common_suffix(text, other, min(len(text), len(other)) - start)


@dataclass
class Turn:
    """One assistant turn located in the rendering: the trained characters and what was seen on the way."""

    start: int
    end: int
    empty: bool = False
    closed: bool = True  # ends with a special token the model can learn to stop on
    reasoning_dropped: bool = False


@dataclass
class Rendered:
    text: str
    turns: list[Turn] = field(default_factory=list)


class ChatRenderer:
    """Renders conversations with the tokenizer's chat template (or an override), exactly as
    `apply_chat_template` does at inference, and locates each assistant turn."""

    def __init__(self, tokenizer, chat_template: str | None, column: str, stop_tokens=frozenset()):
        self.tok = tokenizer
        self.template = chat_template
        self.column = column
        # The special tokens generation stops on (generation_config's eos_token_id): one that opens the turn after
        # an answer is how the model ends that answer at inference (GLM-4's <|user|>), so it closes the answer.
        self.stop_tokens = frozenset(stop_tokens)
        # Read once: each read of a transformers tokenizer's special token goes through its __getattr__, and
        # _opens_turn asks for both for every special token of every answer's closing.
        self._eos, self._bos = tokenizer.eos_token, tokenizer.bos_token
        self._turn_stop: list[str | None] = []
        specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        ordered = sorted((s for s in specials if s), key=len, reverse=True)
        self._special = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None
        # False: every row turn by turn, every rendering by apply_chat_template (the reference the fast ways are
        # checked against).
        self.fast = True
        self._shape: _Shape | bool | None = False  # False until the template's check has run
        # The template source and keyword arguments that render plain messages exactly as apply_chat_template
        # does, once the template's check has proved it; None until then, or where it is not so.
        self._direct: tuple[str, dict[str, Any]] | None = None

    def render(self, messages: list[dict[str, Any]], tools: list | None = None, *, generation: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            if self.fast and self._direct is not None and tools is None and _plain(messages):
                return self._render_directly(messages, generation, *self._direct)
            return self.tok.apply_chat_template(
                messages,
                tools=tools,
                tokenize=False,
                chat_template=self.template,
                add_generation_prompt=generation,
            )
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            # raise_exception(...) in a template raises TemplateError with the template's own words.
            reason = str(exc).strip() or type(exc).__name__
            raise RowProblem(
                CHAT,
                self.column,
                f"the chat template refused this conversation ({reason})",
                "Fix the conversation, or set formatting_chat_template to a template that accepts it",
            ) from None

    @staticmethod
    def _render_directly(messages, generation: bool, source: str, kwargs: dict[str, Any]) -> str:
        """What apply_chat_template(tokenize=False) renders for plain messages (role and content strings only,
        no tools), without its copying and normalizing of every message: its own compiled template (cached by
        transformers), given the arguments it gives."""
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(source).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=generation, **kwargs
        )

    def _direct_rendering(self) -> tuple[str, dict[str, Any]] | None:
        """The template source and keyword arguments for `_render_directly`, where it renders every plain probe
        conversation, and its generation prompt after every message, as apply_chat_template does (the same
        text, or the same refusal); else None."""
        try:
            source, kwargs = self.tok.get_chat_template(self.template), dict(self.tok.special_tokens_map)
            self._render_directly([{"role": "user", "content": "?"}], False, source, kwargs)
        except Exception:  # a transformers without that function, or a template it cannot compile
            return None

        def outcome(messages, generation: bool, direct: bool):
            try:
                if direct:
                    return self._render_directly(messages, generation, source, kwargs)
                return self.tok.apply_chat_template(
                    messages, tokenize=False, chat_template=self.template, add_generation_prompt=generation
                )
            except Exception as exc:  # compared, not handled
                return type(exc), str(exc)

        for messages, _ in _PROBES:
            for end in range(1, len(messages) + 1) if _plain(messages) else ():
                for generation in (False, True):
                    if outcome(messages[:end], generation, False) != outcome(messages[:end], generation, True):
                        return None
        return source, kwargs

    def _try(self, messages, tools, *, generation: bool = False) -> str | None:
        try:
            return self.render(messages, tools, generation=generation)
        except RowProblem:
            return None

    def _pieces(self, text: str):
        """The text as special tokens and the runs of text between them, in order."""
        pos = 0
        if self._special is not None:
            for match in self._special.finditer(text):
                if match.start() > pos:
                    yield text[pos : match.start()]
                yield match.group()
                pos = match.end()
        if pos < len(text):
            yield text[pos:]

    def closing(self, own_tail: str, after: str, previous_closer: str | None = None) -> tuple[int, bool]:
        """How much of `after`, the text that follows an answer's fields in the whole rendering, closes that
        answer; and whether it closes with a special token the model can learn to stop on.

        `own_tail` is what the template emits after the fields when the message is the last one. The
        closing text is the run of pieces of `after` that the template also emits there, in order (a
        template may add something before them only when the message is last), through the last special
        token; without one, the matched text up to trailing whitespace. It never reaches a token that
        opens a turn (a template that always ends with the assistant's header emits one there too).
        `previous_closer` is the special token that closed the message before this turn: a template that
        closes a final answer differently (gpt-oss: <|return|>, else <|end|>) closes this one with it."""
        own = list(self._pieces(own_tail))
        at, matched, closed_at = 0, 0, None
        for piece in self._pieces(after):
            special = self._is_special(piece)
            if special and self._opens_turn(piece):
                if piece in self.stop_tokens and closed_at is None:
                    matched += len(piece)
                    closed_at = matched
                break
            try:
                at = own.index(piece, at) + 1
            except ValueError:
                if matched == 0 and special and piece == previous_closer:
                    matched = closed_at = len(piece)
                    continue
                # Plain text runs on into the next turn where no special token separates them.
                if at < len(own) and piece.startswith(own[at]):
                    matched += len(own[at])
                break
            matched += len(piece)
            if special:
                closed_at = matched
        if closed_at is not None:
            return closed_at, True
        return len(after[:matched].rstrip()), False

    def turn_stop(self) -> str | None:
        """The turn-opening stop token the template writes right after an answer that another turn follows, or
        None: what the model writes to end an answer where the template ends a conversation's last answer with
        nothing. Found once, from a probe conversation."""
        if not self._turn_stop:
            probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": MARK}]
            text = self._try([*probe, {"role": "user", "content": "b"}], None)
            after = text[text.find(MARK) + len(MARK) :] if text and MARK in text else ""
            first = next(iter(self._pieces(after)), None)
            found = first if first in self.stop_tokens and self._opens_turn(first) else None
            self._turn_stop.append(found)
        return self._turn_stop[0]

    def _opens_turn(self, token: str) -> bool:
        if token == self._eos:  # never, even where BOS and EOS are one token (GPT-2, Granite)
            return False
        return token == self._bos or bool(_OPENER.search(token))

    def closer_before(self, text: str) -> str | None:
        """The special token that closed an earlier message: the last one followed (whitespace aside) by a
        special token that opens a turn."""
        pieces = [p for p in self._pieces(text) if p.strip()]
        for k in range(len(pieces) - 2, -1, -1):
            current, following = pieces[k], pieces[k + 1]
            closes = self._is_special(current) and not self._opens_turn(current)
            if closes and self._is_special(following) and self._opens_turn(following):
                return current
        return None

    def _is_special(self, piece: str) -> bool:
        return self._special is not None and self._special.fullmatch(piece) is not None

    def _lead(self, messages, i: int, gen: str | None, full: str, a: int, alone: _Alone) -> int:
        """How many characters before the fields belong to the turn when the generation prompt is not a
        prefix of the whole rendering."""
        if gen is None:
            return 0
        before = self._try(messages[:i], alone.tools)
        header = gen[len(before) :] if before is not None and gen.startswith(before) else None
        if header is not None and len(before) <= a and full.startswith(before):
            # Same history, but the template writes the turn's header differently when the turn is there
            # (DeepSeek-R1's generation prompt adds "<think>\n"): the header's text is not trained, what
            # follows it up to the fields is.
            return a - len(before) - common_prefix(header, full[len(before) : a])
        # History rewritten before this turn (a system message folded into the last user turn): keep what
        # the template puts between its generation prompt and the fields when this message is the last one
        # (a space, an empty <think></think>), where the whole rendering has the same text.
        text, (a_alone, _) = alone.rendered(), alone.fields()
        if text.startswith(gen) and len(gen) <= a_alone:
            allowance = a_alone - len(gen)
        else:
            found = text.rfind(header, 0, a_alone) if header else -1
            allowance = a_alone - (found + len(header)) if found >= 0 else 0
        return common_suffix(full[:a], text[:a_alone], allowance)

    def locate(self, messages: list[dict[str, Any]], tools: list | None = None, *, first: int = 0) -> Rendered:
        """The rendering and the assistant turns from message `first` on (TRL's conversational
        prompt/completion rows train only the completion's turns): from two renderings where the template's
        check allows it and the row holds only what that check covered, else turn by turn."""
        shape = self.shape() if self.fast else None
        if shape is not None:
            features = _features(messages, tools, first, self._special)
            if features is not None and features <= shape.allowed:
                rendered = self._located_at_once(messages, first, shape)
                if rendered is not None:
                    return rendered
        return self.locate_per_turn(messages, tools, first=first)

    def locate_per_turn(self, messages: list[dict[str, Any]], tools: list | None = None, *, first: int = 0) -> Rendered:
        """`locate` the reference way: each assistant turn from renderings of its own (the conversation with that
        turn marked, its generation prompt, the conversation cut after it)."""
        full = self.render(messages, tools)
        rendered = Rendered(full)
        done = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < first:
                continue
            marked = _marked(message)
            a, b = differing(full, self.render([*messages[:i], marked, *messages[i + 1 :]], tools))
            alone = _Alone(self, messages[: i + 1], marked, tools)
            if i == len(messages) - 1:
                alone.text, alone.span = full, (a, b)

            gen = self._try(messages[:i], tools, generation=True)
            if gen is not None and len(gen) <= a and full.startswith(gen):
                start = len(gen)
            else:
                start = a - self._lead(messages, i, gen, full, a, alone)

            text = alone.rendered()
            b_alone = b if text.startswith(full[:b]) else alone.fields()[1]
            closing, closed = self.closing(text[b_alone:], full[b:])
            if not closed and i < len(messages) - 1:
                closing, closed = self.closing(text[b_alone:], full[b:], self.closer_before(full[:start]))
            end = b + closing

            start = max(start, done)
            if a < done or end < start:
                raise RowProblem(
                    CHAT,
                    self.column,
                    "the chat template renders the assistant turns out of order",
                    "Use a chat template that renders messages in order",
                )
            # Empty: the template rendered nothing of the message's fields (an empty answer, or tool calls it ignores).
            empty = not full[a:b].strip()
            rendered.turns.append(Turn(start, end, empty, closed, _reasoning_dropped(message, full[start:end])))
            done = end
        return rendered

    # --- every turn at once ---

    def shape(self) -> _Shape | None:
        """What the template writes around an answer, and the rows whose turns two renderings locate exactly
        as `locate_per_turn` does; None where the template's check found none. Checked once per template, special
        tokens and model folder (in this process)."""
        if self._shape is False:
            try:
                source = self.tok.get_chat_template(self.template)
            except ValueError:  # no template: every render says so, row by row
                self._shape = None
                return None
            key = (
                source,
                getattr(self.tok, "name_or_path", None),  # the model folder
                tuple(sorted(self.stop_tokens)),  # what closing reads beside the special tokens
                repr(sorted(self.tok.special_tokens_map.items())),
                self._special.pattern if self._special else None,
                self.tok.bos_token,
                self.tok.eos_token,
            )
            if key not in _SHAPES:
                _SHAPES[key] = (self._checked_shape(), self._direct_rendering())
            self._shape, self._direct = _SHAPES[key]
        return self._shape

    def _checked_shape(self) -> _Shape | None:
        """The template's shape from probe renderings, and the row features with which locating every turn at
        once gave the same turns as `locate_per_turn` on every probe conversation. None when even the plainest
        conversations differ, or the template's shape cannot be read."""
        question = [{"role": "user", "content": "Which river is the longest?"}]
        history, generation = self._try(question, None), self._try(question, None, generation=True)
        whole = self._try([*question, {"role": "assistant", "content": MARK}], None)
        if history is None or generation is None or whole is None or whole.count(MARK) != 1:
            return None
        # The history ends where the generation prompt starts. Phi-3 ends a history with <|endoftext|> that its
        # generation prompt leaves out: there, the last piece boundary the two share.
        shared, ends = common_prefix(history, generation), 0
        if shared == len(history):
            ends = shared
        else:
            for piece in self._pieces(generation):
                if ends + len(piece) > shared:
                    break
                ends += len(piece)
        if not whole.startswith(generation[:ends]):
            return None
        prompt = generation[ends:]
        header = prompt[: common_prefix(prompt, whole[ends:])]
        fields = whole.index(MARK)
        shape = _Shape(prompt, header if header.strip() else "", whole[ends:fields], whole[fields + len(MARK) :])
        agreed: dict[str, bool] = {}
        for messages, first in _PROBES:
            features = _features(messages, None, first, self._special)
            try:
                expected = self.locate_per_turn(messages, first=first)
            except RowProblem:
                expected = None
            try:
                found = self._located_at_once(messages, first, shape)
            except RowProblem:
                found = None
            if expected is None and found is None:
                continue  # the template refuses this conversation: no evidence either way
            same = found is not None and found == expected
            for feature in features or ("",):
                agreed[feature] = agreed.get(feature, True) and same
        if not agreed.get(""):
            return None
        return replace(shape, allowed=frozenset(feature for feature, ok in agreed.items() if ok))

    def _located_at_once(self, messages: list[dict[str, Any]], first: int, shape: _Shape) -> Rendered | None:
        """The turns from two renderings: the conversation, and the conversation with each assistant turn's
        fields replaced by a marker of its own. The text between two turns' markers is found once, and only
        once, in the conversation: the fields of each turn lie between. The start and the closing text come from
        the template's shape. None (locate turn by turn) wherever the renderings do not fit together."""
        full = self.render(messages, None)
        rendered = Rendered(full)
        indices = [i for i, message in enumerate(messages) if message["role"] == "assistant" and i >= first]
        if not indices:
            return rendered
        if len(indices) > 999 or _PRIVATE.search(full):
            return None
        marks = [f"\ue000\ue001m{k:03d}\ue001\ue000" for k in range(len(indices))]
        marked = list(messages)
        for i, mark in zip(indices, marks, strict=True):
            marked[i] = _marked(messages[i], mark)
        spans = _fields(full, self._try(marked, None), marks)
        if spans is None:
            return None
        done, last = 0, len(messages) - 1
        for i, (a, b) in zip(indices, spans, strict=True):
            if i == 0:
                start = a  # no history, no generation prompt
            elif shape.header:
                # The history ends where the generation prompt's header does, last before the fields.
                at = full.rfind(shape.header, done, a)
                if at < 0:
                    return None
                start = at + common_prefix(shape.generation, full[at:a])
            else:
                start = a - len(shape.before)
                if start < done or full[start:a] != shape.before:
                    return None
            own = full[b:] if i == last else shape.tail
            closing, closed = self.closing(own, full[b:])
            if not closed and i < last:
                closing, closed = self.closing(own, full[b:], self.closer_before(full[:start]))
            end = b + closing
            start = max(start, done)
            if a < done or end < start:
                return None
            empty = not full[a:b].strip()
            rendered.turns.append(Turn(start, end, empty, closed, _reasoning_dropped(messages[i], full[start:end])))
            done = end
        return rendered


class _Alone:
    """The conversation cut after one assistant message (that message last), rendered when needed, and
    where that message's fields are in it."""

    def __init__(self, renderer: ChatRenderer, messages, marked, tools):
        self.renderer, self.messages, self.marked, self.tools = renderer, messages, marked, tools
        self.text: str | None = None
        self.span: tuple[int, int] | None = None

    def rendered(self) -> str:
        if self.text is None:
            self.text = self.renderer.render(self.messages, self.tools)
        return self.text

    def fields(self) -> tuple[int, int]:
        if self.span is None:
            self.span = differing(self.rendered(), self.renderer.render([*self.messages[:-1], self.marked], self.tools))
        return self.span


def _reasoning_dropped(message: dict[str, Any], trained: str) -> bool:
    """Whether the message carried reasoning that the template did not render into its turn."""
    reasoning = message.get("reasoning_content") or message.get("thinking")
    if not isinstance(reasoning, str) or not reasoning.strip():
        content = message["content"]
        if "</think>" not in content:
            return False
        reasoning = content.split("</think>")[0].split("<think>")[-1]
    return bool(reasoning.strip()) and reasoning.strip() not in trained


# --- locating every turn from two renderings ---

# Private use characters in a rendering would be taken for markers.
_PRIVATE = re.compile("[\ue000-\uf8ff]")


@dataclass(frozen=True)
class _Shape:
    """What a template writes around an assistant answer, read from probe renderings, and the row features
    (`_features`) for which its check found two renderings enough."""

    generation: str  # what add_generation_prompt appends to a history
    header: str  # as much of it as the whole rendering shows before an answer ("" when none, or only whitespace)
    before: str  # the text between the history and the answer's content
    tail: str  # what follows an answer's content when it is the last message
    allowed: frozenset[str] = frozenset()


# Template source and special tokens -> its shape (None: every row turn by turn), and how to render plain
# messages directly (None: through apply_chat_template).
_SHAPES: dict[tuple, tuple[_Shape | None, tuple[str, dict[str, Any]] | None]] = {}

# Which message fields the check's probes cover, per role; a row with any other field is located turn by turn.
_COVERED = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls", "reasoning_content", "thinking"},
    "tool": {"role", "content", "name", "tool_call_id"},
}
_THINK = ("<think>", "</think>")


def _plain(messages: list[dict[str, Any]]) -> bool:
    """Messages of a role and a content string each, and nothing else: what apply_chat_template passes to the
    template unchanged (it copies them, drops null fields and aliases reasoning fields)."""
    return bool(messages) and all(
        type(m) is dict and len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str
        for m in messages
    )


def _features(messages: list[dict[str, Any]], tools, first: int, special: re.Pattern | None) -> frozenset[str] | None:
    """What a conversation holds that a template may render differently, as the check's probes name it; None
    for what no probe covers (tool definitions, other fields or roles, a system message later on, two messages
    of one role in a row, special tokens in the text)."""
    if tools:
        return None
    found = {"prompt"} if first else set()
    previous = None
    for number, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role not in _COVERED or not _COVERED[role].issuperset(message) or not isinstance(content, str):
            return None
        texts = [content]
        if role == "assistant":
            reasoning = [message[key] for key in ("reasoning_content", "thinking") if key in message]
            if not all(isinstance(r, str) for r in reasoning):
                return None
            texts += reasoning
            found.update({"reasoning"} if reasoning else ())
            found.update({"tools"} if message.get("tool_calls") else ())
            found.update({"think"} if any(tag in content for tag in _THINK) else ())
            if not message.get("tool_calls"):
                found.update({"empty"} if not content.strip() else {"edges"} if content != content.strip() else ())
            found.update({"assistant_first"} if previous in (None, "system") else ())
        if special is not None:
            tokens = {token for text in texts for token in special.findall(text)}
            if tokens - (set(_THINK) if role == "assistant" else set()):
                return None
        if role == "system":
            if number:
                return None
            found.add("system")
        elif role == "tool":
            found.add("tools")
        elif role == previous:
            return None
        previous = role
    if previous != "assistant":
        found.add("open_end")
    return frozenset(found)


def _fields(full: str, marked: str | None, marks: list[str]) -> list[tuple[int, int]] | None:
    """Where each turn's fields are in `full`, from `marked`, the rendering with turn k's fields replaced by
    marks[k]: the text between two turns' markers must occur exactly once where it can in `full` (its leftmost
    and rightmost placements agree). None where the renderings do not fit together that way."""
    if marked is None:
        return None
    regions, at = [], 0
    for mark in marks:
        start = marked.find(mark)
        if start < at:
            return None  # missing, or out of order
        end = marked.rfind(mark) + len(mark)
        if _PRIVATE.search(marked[start:end].replace(mark, "")):
            return None  # another turn's marker inside this turn's fields
        regions.append((start, end))
        at = end
    edges = [0, *(at for region in regions for at in region), len(marked)]
    gaps = [marked[edges[j] : edges[j + 1]] for j in range(0, len(edges), 2)]
    head, tail, inner = gaps[0], gaps[-1], gaps[1:-1]
    limit = len(full) - len(tail)
    if limit < len(head) or not full.startswith(head) or not full.endswith(tail):
        return None
    if any(_PRIVATE.search(gap) for gap in inner):
        return None
    leftmost, at = [], len(head)
    for gap in inner:
        found = full.find(gap, at, limit)
        if found < 0:
            return None
        leftmost.append(found)
        at = found + len(gap)
    rightmost, at = [], limit
    for gap in reversed(inner):
        at = full.rfind(gap, len(head), at)
        rightmost.append(at)
    if leftmost != rightmost[::-1]:
        return None
    starts = [len(head)] + [found + len(gap) for found, gap in zip(leftmost, inner, strict=True)]
    return list(zip(starts, [*leftmost, limit], strict=True))


def _probe_conversations() -> list[tuple[list[dict[str, Any]], int]]:
    """The conversations a template's check locates both ways, with the message from which turns are trained.
    Each row feature is covered by several: a feature is trusted only where all of its probes agree."""

    def user(n: int, extra: str = "") -> dict[str, Any]:
        return {"role": "user", "content": f"Question {n}: how far is the {['river', 'lake', 'hill'][n % 3]}?{extra}"}

    def answer(text: str, **fields: Any) -> dict[str, Any]:
        return {"role": "assistant", "content": text, **fields}

    system = {"role": "system", "content": "Answer briefly."}
    call = {"id": "call1", "type": "function", "function": {"name": "distance", "arguments": {"to": "lake"}}}
    result = {"role": "tool", "name": "distance", "tool_call_id": "call1", "content": "12 km"}
    plain = [user(1), answer("About two miles."), user(2), answer("Nine miles, by the\nnorth road.")]
    return [
        ([user(0), answer("It is 4 km away.")], 0),
        (plain, 0),
        ([*plain, user(3), answer("Twelve.")], 0),
        ([user(4, " Say yes: yes"), answer("yes"), user(5, " yes yes"), answer("yes")], 0),
        ([user(6), answer("```\nprint(1)\n```\nDone. 😀 Grüße")], 0),
        ([system, user(7), answer("Far.")], 0),
        ([system, *plain], 0),
        ([answer("Hello, ask me."), user(8), answer("Three km.")], 0),
        ([system, answer("Hello."), user(9), answer("Two km.")], 0),
        ([user(10), answer("Near."), user(11)], 0),
        ([system, *plain, user(12)], 0),
        (plain, 2),
        ([*plain, user(3), answer("Twelve.")], 4),
        ([user(13), answer(""), user(14), answer("Far away.")], 0),
        ([user(15), answer("Far away."), user(16), answer("")], 0),
        ([user(17), answer("  \n "), user(18), answer("Close.")], 0),
        ([user(19), answer(" Leading space."), user(20), answer("Trailing newlines.\n\n")], 0),
        ([user(21), answer("\nBoth ends \n"), user(22), answer("\t Tab first.")], 0),
        (
            [
                user(23),
                answer("<think>\nfirst thought\n</think>\n\nFirst."),
                user(24),
                answer("<think>\nnext\n</think>\n\nNext."),
            ],
            0,
        ),
        ([user(25), answer("Plain first."), user(26), answer("<think>\nlate\n</think>\nLate.")], 0),
        (
            [
                user(27),
                answer("First.", reasoning_content="early thought"),
                user(28),
                answer("Next.", reasoning_content="late thought"),
            ],
            0,
        ),
        ([user(29), answer("First."), user(30), answer("Next.", reasoning_content="only late")], 0),
        ([user(31), answer("First.", thinking="early"), user(32), answer("Next.", thinking="late")], 0),
        ([user(33), answer("", tool_calls=[call]), result, answer("It is 12 km.")], 0),
        (
            [user(34), answer("Let me check.", tool_calls=[call]), result, answer("12 km."), user(35), answer("Fine.")],
            0,
        ),
    ]


_PROBES = _probe_conversations()
