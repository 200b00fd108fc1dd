"""What a finished or stopped run leaves for a person to look at: the loss curve as a picture (`loss_curve.png`),
drawn with Pillow so that no plotting library has to be installed, and the adapter's model card (`README.md`)."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from . import samples as sampling
from .sources import write_whole

CURVE_FILE = "loss_curve.png"
# What the loss curve draws of each logged step, under the names TRL logs them with.
CURVE_KEYS = ("loss", "eval_loss", "learning_rate")
SIZE = (1000, 600)
# Plot area inside the picture: room on the left for the loss ticks, on the right for the learning rate's.
LEFT, RIGHT, TOP, BOTTOM = 90, 910, 60, 520
BACKGROUND, INK, GRID = (255, 255, 255), (40, 40, 40), (225, 225, 225)
TRAIN_COLOUR, EVAL_COLOUR, LR_COLOUR = (31, 119, 180), (214, 39, 40), (44, 160, 44)


def nice_ticks(low: float, high: float, count: int = 6, *, whole: bool = False) -> list[float]:
    """Round tick values covering [low, high]: steps of 1, 2 or 5 times a power of ten (at least 1 when `whole`).
    A single value gets a range around it, so that one logged step still shows as a point on a scale."""
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = (low, low + pad) if whole else (low - pad, high + pad)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(power * m for m in (1, 2, 5, 10) if power * m >= raw)
    step = max(step, 1.0) if whole else step
    first = math.floor(low / step) * step
    return [first + i * step for i in range(math.ceil((high - first) / step - 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _series(history: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(h["step"]), float(h[key])) for h in history if h.get(key) is not None and "step" in h]


def earlier_points(checkpoint: str | None) -> list[dict[str, float]]:
    """The loss curve's points from before a resume: the steps the checkpoint's trainer state logged (its
    log_history, which the resumed trainer carries on), so that a resumed run's picture shows the whole run.
    No checkpoint, or a state that cannot be read, gives none: the picture then starts at the resume."""
    if not checkpoint:
        return []
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
            history = json.load(handle)["log_history"]
        return [
            {"step": int(row["step"]), **{key: float(row[key]) for key in CURVE_KEYS if row.get(key) is not None}}
            for row in history
            if isinstance(row, dict) and "step" in row and ("loss" in row or "eval_loss" in row)
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def draw_loss_curve(history: Sequence[dict[str, Any]], path: str) -> str | None:
    """Train loss (and eval loss, when there is one) against the step on the left axis, the learning rate on
    the right one; None when no step logged a loss (nothing worth a picture)."""
    from PIL import Image, ImageDraw, ImageFont  # only once a run has something to draw

    train, evals, rates = (_series(history, key) for key in CURVE_KEYS)
    if not train and not evals:
        return None
    rates = rates if len(rates) > 1 else []  # one value is no schedule: no second axis for it
    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, title_font = ImageFont.load_default(size=14), ImageFont.load_default(size=18)

    steps = [s for s, _ in train + evals + rates]
    x_ticks = nice_ticks(min(0.0, min(steps)), max(steps), whole=True)
    losses = [v for _, v in train + evals]
    y_ticks = nice_ticks(min(losses), max(losses))
    lr_ticks = nice_ticks(0.0, max(v for _, v in rates)) if rates else []

    def scale(value: float, ticks: list[float], start: int, end: int) -> float:
        return start + (value - ticks[0]) / (ticks[-1] - ticks[0]) * (end - start)

    def point(step: float, value: float, ticks: list[float]) -> tuple[float, float]:
        return scale(step, x_ticks, LEFT, RIGHT), scale(value, ticks, BOTTOM, TOP)

    for tick in x_ticks:
        x = scale(tick, x_ticks, LEFT, RIGHT)
        draw.line([(x, TOP), (x, BOTTOM)], fill=GRID)
        draw.line([(x, BOTTOM), (x, BOTTOM + 5)], fill=INK)
        draw.text((x, BOTTOM + 8), f"{tick:g}", fill=INK, font=font, anchor="mt")
    for tick in y_ticks:
        y = scale(tick, y_ticks, BOTTOM, TOP)
        draw.line([(LEFT, y), (RIGHT, y)], fill=GRID)
        draw.line([(LEFT - 5, y), (LEFT, y)], fill=INK)
        draw.text((LEFT - 8, y), _label(tick), fill=INK, font=font, anchor="rm")
    for tick in lr_ticks:
        y = scale(tick, lr_ticks, BOTTOM, TOP)
        draw.line([(RIGHT, y), (RIGHT + 5, y)], fill=LR_COLOUR)
        draw.text((RIGHT + 8, y), _label(tick), fill=LR_COLOUR, font=font, anchor="lm")
    draw.rectangle([(LEFT, TOP), (RIGHT, BOTTOM)], outline=INK)

    if rates:
        draw.line([point(s, v, lr_ticks) for s, v in rates], fill=LR_COLOUR, width=2, joint="curve")
    for series, colour in ((train, TRAIN_COLOUR), (evals, EVAL_COLOUR)):
        points = [point(s, v, y_ticks) for s, v in series]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3, joint="curve")
        for x, y in points if len(points) <= 60 or colour == EVAL_COLOUR else ():
            draw.ellipse([(x - 4, y - 4), (x + 4, y + 4)], fill=colour)

    draw.text(((LEFT + RIGHT) / 2, TOP - 30), "Training loss", fill=INK, font=title_font, anchor="mm")
    draw.text(((LEFT + RIGHT) / 2, BOTTOM + 40), "step", fill=INK, font=font, anchor="mt")
    _vertical_text(image, "loss", (22, (TOP + BOTTOM) // 2), INK, font)
    if rates:
        _vertical_text(image, "learning rate", (SIZE[0] - 18, (TOP + BOTTOM) // 2), LR_COLOUR, font)
    legend = [("train loss", TRAIN_COLOUR, train), ("eval loss", EVAL_COLOUR, evals)]
    legend.append(("learning rate", LR_COLOUR, rates))
    _legend(draw, font, legend)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Whole or not at all: a task's host kills the run seconds after a Stop, maybe while this is written.
    picture = io.BytesIO()
    image.save(picture, format="PNG")
    write_whole(path, picture.getvalue())
    return path


def _vertical_text(image, text: str, centre: tuple[int, int], colour, font) -> None:
    from PIL import Image, ImageDraw

    width = int(font.getlength(text)) + 4
    label = Image.new("RGBA", (width, 20), (0, 0, 0, 0))
    ImageDraw.Draw(label).text((2, 10), text, fill=colour, font=font, anchor="lm")
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (centre[0] - rotated.width // 2, centre[1] - rotated.height // 2), rotated)


def _legend(draw, font, entries) -> None:
    """The series drawn, top right inside the plot area, on white so the curves behind it never blur a name."""
    shown = [(name, colour) for name, colour, series in entries if series]
    width = 40 + max(int(font.getlength(name)) for name, _ in shown)
    right, top = RIGHT - 10, TOP + 10
    draw.rectangle([(right - width - 10, top), (right, top + 10 + 22 * len(shown))], fill=BACKGROUND, outline=INK)
    for i, (name, colour) in enumerate(shown):
        y = top + 16 + 22 * i
        draw.line([(right - width, y), (right - width + 24, y)], fill=colour, width=3)
        draw.text((right - width + 32, y), name, fill=INK, font=font, anchor="lm")


CARD_FILE = "README.md"


def model_card(summary: dict[str, Any], *, peft: bool, folder: str, samples: Sequence[dict[str, str]] = ()) -> str:
    """The model card (Hugging Face's format: YAML front matter, then Markdown) of what this run published, from its
    training summary: what it was trained from and on, with which parameters and why, how well, and how to load it.
    `peft`: an adapter (loaded on its base model); else a whole model (full fine-tuning, or the merged model).
    `folder`: the name of the folder it is published as, which the loading code names. `samples`: the trained
    model's answers to held-out prompts (samples.py), shown shortened."""
    asked, plan, data = summary["parameters"], summary["plan"], summary["dataset"]
    name, base, mode = asked["adaptor_name"], asked["model_name"], asked["training_mode"]
    tags = ["sft", "trl", "transformerlab"] + ([mode] if mode in ("lora", "qlora") else ["full-fine-tuning"])
    front = [
        "---",
        f"base_model: {json.dumps(base)}",
        f"library_name: {'peft' if peft else 'transformers'}",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "---",
    ]
    what = (
        f"A {'QLoRA' if mode == 'qlora' else 'LoRA'} adapter for `{base}`"
        if peft
        else f"`{base}` {'with a LoRA adapter merged in' if mode != 'full' else 'fully fine-tuned'}"
    )
    results = [
        ("final train loss", summary.get("final_loss")),
        ("final eval loss", summary.get("eval_loss")),
        ("steps", f"{summary.get('steps')} of {summary.get('max_steps')}"),
        ("processes", summary.get("world_size")),
        ("runtime", f"{summary.get('runtime_seconds')} s"),
    ]
    dataset = [
        ("dataset", f"`{asked.get('dataset_name')}` ({data['format']})"),
        ("rows", data["rows"]),
        ("rows trained on", data["rows_used"]),
        ("rows left out (nothing left to train)", data["dropped"]),
        ("truncated to maximum_sequence_length", data["truncated"]),
        ("evaluation rows", f"{data['eval_rows']}" + (f" ({data['eval_source']})" if data.get("eval_source") else "")),
        ("trained tokens per epoch", data["trainable_tokens"]),
        ("tokens per epoch", data["total_tokens"]),
    ]
    lines = [
        *front,
        "",
        f"# {name}",
        "",
        f"{what}, trained by supervised fine-tuning with TRL {summary.get('versions', {}).get('trl', '')} "
        "through the TransformerLab SFT trainer plugin.",
        "",
        "## Results",
        "",
        *_table(results),
        "",
        "![loss curve](loss_curve.png)",
        "",
        *_sample_answers(samples),
        "## Data",
        "",
        *_table(dataset),
        "",
        "## Training",
        "",
        "The plan, and why:",
        "",
        *(f"- {reason}" for reason in plan.get("reasons", [])),
        "",
        "Effective parameters (defaults filled in):",
        "",
        "```json",
        json.dumps(asked, indent=2, default=str),
        "```",
        "",
        "## Use it",
        "",
        "```python",
        *(_peft_loading(base, folder) if peft else _transformers_loading(folder)),
        "```",
        "",
        'In TransformerLab the run registered this model with the job: publish it from the job ("Save to registry", '
        "or `lab job publish model`), then pick it on the Interact tab"
        + (", with its base model as the foundation." if peft else "."),
        "",
    ]
    return "\n".join(lines)


def write_card(
    staging: str, final: str, summary: dict[str, Any], *, peft: bool, samples: Sequence[dict[str, str]] = ()
) -> None:
    """The card in the staged folder that becomes `final`, in place of the generic one TRL writes when it saves."""
    with open(os.path.join(staging, CARD_FILE), "w", encoding="utf-8") as handle:
        handle.write(model_card(summary, peft=peft, folder=os.path.basename(final.rstrip(os.sep)), samples=samples))


def _sample_answers(samples: Sequence[dict[str, str]]) -> list[str]:
    """The card's section of sample answers (none: no section), each text fenced as it is, shortened."""
    if not samples:
        return []
    lines = [
        "## Sample answers",
        "",
        f"Greedy answers to held-out prompts, whole in the adapter's `{sampling.SAMPLES_FILE}`.",
        "",
    ]
    for number, sample in enumerate(samples, 1):
        lines += [f"### {number}", ""]
        for label, key in (("Prompt", "input"), ("Reference", "expected_output"), ("Answer", "output")):
            lines += [f"{label}:", "", "````text", sampling.shortened(sample[key]), "````", ""]
    return lines


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    shown = [(key, value) for key, value in rows if value is not None]
    return ["| | |", "|---|---|", *(f"| {key} | {_cell(value)} |" for key, value in shown)]


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _peft_loading(base: str, folder: str) -> list[str]:
    return [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'adapter = "./{folder}"  # this folder',
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(base)})",
        "model = PeftModel.from_pretrained(model, adapter)",
        "tokenizer = AutoTokenizer.from_pretrained(adapter)",
    ]


def _transformers_loading(folder: str) -> list[str]:
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "./{folder}"  # this folder',
        "model = AutoModelForCausalLM.from_pretrained(path)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
    ]
