"""Formatting templates: Jinja rendered per row in a sandbox, split into prompt and completion.

The split point is the completion field: `completion_column` when given, else the column the template
prints last (`{{ column }}`). Everything the template renders from that field on is the completion.
"""

from __future__ import annotations

from typing import Any, ClassVar

from jinja2 import StrictUndefined, TemplateError, TemplateNotFound, TemplateSyntaxError, UndefinedError, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidConfig, RowProblem, problem

# No letters or spaces: filters such as `lower` or `trim` on the completion column leave it intact.
_SENTINEL = "\ue000\ue001\ue000"


def _blank_none(value: Any) -> Any:
    # A null cell prints as nothing, never as the word "None" (`{% if input %}` already treats it as empty).
    return "" if value is None else value


def _environment() -> ImmutableSandboxedEnvironment:
    # No loader: {% include %}/{% import %} cannot reach files. The sandbox blocks attribute escapes.
    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False, finalize=_blank_none
    )


def syntax_problem(source: str) -> str | None:
    """What is wrong with a template's Jinja syntax, or None (no rendering, no torch: fit for --check)."""
    try:
        _environment().parse(source)
    except TemplateSyntaxError as exc:
        return f"is not valid Jinja (line {exc.lineno}: {exc.message})"
    return None


def printed_columns(source: str) -> list[str]:
    """Names the template prints in {{ ... }} outputs, in order of appearance (inside any expression)."""
    tree = _environment().parse(source)
    names = []
    for output in tree.find_all(nodes.Output):
        for child in output.nodes:
            if not isinstance(child, nodes.TemplateData):
                names.extend(n.name for n in child.find_all(nodes.Name) if n.ctx == "load")
                if isinstance(child, nodes.Name):
                    names.append(child.name)
    return names


def _printed_once_plainly(source: str, column: str) -> bool:
    """Whether the column's only appearance in the template is one bare `{{ column }}` output."""
    tree = _environment().parse(source)
    uses = [n for n in tree.find_all(nodes.Name) if n.name == column]
    return len(uses) == 1 and any(c is uses[0] for out in tree.find_all(nodes.Output) for c in out.nodes)


def referenced_columns(source: str) -> set[str]:
    from jinja2 import meta

    return meta.find_undeclared_variables(_environment().parse(source))


class RowTemplate:
    """A compiled formatting template bound to a dataset's columns."""

    def __init__(self, source: str, columns: list[str], completion_column: str = "", *, split: bool):
        self._args = (source, list(columns), completion_column, split)
        found = syntax_problem(source)
        if found:
            raise InvalidConfig([problem("formatting_template", found, "Fix the template")])
        self._template = _environment().from_string(source)
        missing = sorted(referenced_columns(source) - set(columns))
        if missing:
            raise InvalidConfig(
                [
                    problem(
                        "formatting_template",
                        f"uses {', '.join(missing)}, which the dataset does not have (columns: {', '.join(columns)})",
                        "Use the dataset's column names in the template",
                    )
                ]
            )
        self.completion_column = ""
        self.printed_plainly = False
        if split:
            if completion_column:
                if completion_column not in columns:
                    raise InvalidConfig(
                        [
                            problem(
                                "completion_column",
                                f"{completion_column!r} is not a column (columns: {', '.join(columns)})",
                                "Name the column that holds the answer",
                            )
                        ]
                    )
                self.completion_column = completion_column
            else:
                printed = [c for c in printed_columns(source) if c in columns]
                if not printed:
                    raise InvalidConfig(
                        [
                            problem(
                                "formatting_template",
                                "prints no column, so there is no completion to train on",
                                "Print the answer column with {{ column }}, or set completion_only_loss=false",
                            )
                        ]
                    )
                self.completion_column = printed[-1]
            self.printed_plainly = _printed_once_plainly(source, self.completion_column)

    # Compiled templates do not pickle; worker processes of a parallel map recompile from the source.
    def __getstate__(self):
        return self._args

    def __setstate__(self, state):
        source, columns, completion_column, split = state
        self.__init__(source, columns, completion_column, split=split)

    def render(self, row: dict[str, Any]) -> str:
        try:
            return self._template.render(**row)
        except UndefinedError as exc:
            raise RowProblem("formatting_template", "", f"failed: {exc.message}", "Check the names it uses") from None
        except (SecurityError, TemplateNotFound) as exc:
            # A blocked attribute escape, or {% include %} with no loader to read files.
            raise RowProblem(
                "formatting_template", "", f"is not allowed here ({exc})", "Use only the row's columns"
            ) from None
        except (TemplateError, TypeError, ValueError, ArithmeticError) as exc:
            # The template's own logic failing on this row's values (raise_exception, a filter on a number).
            raise RowProblem("formatting_template", "", f"failed ({exc})", "Fix the row or the template") from None

    def split(self, row: dict[str, Any]) -> tuple[str, str]:
        """(prompt, completion) whose concatenation is exactly the rendered row."""
        answer = row.get(self.completion_column)
        if answer is None:
            raise RowProblem(
                "completion_column",
                self.completion_column,
                "is empty (null), so the row has no completion",
                "Give every row its answer, or remove the row",
            )
        marked = self.render({**row, self.completion_column: _SENTINEL})
        cut = marked.find(_SENTINEL)
        if self.printed_plainly:
            # The column's one use is a bare {{ column }}: the row's text is the marked text with the value in
            # place of the marker (what Jinja prints for it), so one rendering is enough.
            return marked[:cut], str(answer) + marked[cut + len(_SENTINEL) :]
        full = self.render(row)
        prompt = marked[:cut] if cut >= 0 else None
        if prompt is None or not full.startswith(prompt):
            raise RowProblem(
                "completion_column",
                "",
                f"the template's output before {self.completion_column!r} depends on that column itself",
                "Print the completion column after everything that belongs to the prompt",
            )
        return prompt, full[len(prompt) :]


def chat_syntax_problem(source: str) -> str | None:
    """What is wrong with a chat template's Jinja syntax, or None; parsed the way transformers compiles
    chat templates (loop controls, the generation tag), without importing it."""
    from jinja2.ext import Extension  # here: a formatting template's check never needs it

    class _GenerationTag(Extension):
        """Lets `{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) parse; rendering
        happens in transformers, which defines the tag itself."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    try:
        ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
        ).parse(source)
    except TemplateSyntaxError as exc:
        return f"is not valid Jinja (line {exc.lineno}: {exc.message})"
    return None
