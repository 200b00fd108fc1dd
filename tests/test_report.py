"""The loss curve a person opens: a real PNG, read back with Pillow."""

from __future__ import annotations

import math

import yaml
from PIL import Image

from plugin_utils import report


def history(steps: int, *, eval_every: int = 0) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        rate = 2e-4 * min(1.0, step / 3) * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows.append({"step": step, "loss": 2.5 * math.exp(-step / 10) + 0.3, "learning_rate": rate})
        if eval_every and step % eval_every == 0:
            rows.append({"step": step, "eval_loss": 2.7 * math.exp(-step / 12) + 0.4})
    return rows


def pixels_of(image: Image.Image, colour: tuple[int, int, int]) -> int:
    """Pixels of exactly this colour in the plot area, the legend (a sample of every colour drawn) blanked out."""
    area = image.convert("RGB").crop((report.LEFT + 1, report.TOP + 1, report.RIGHT + 5, report.BOTTOM))
    area.paste(report.BACKGROUND, (area.width - 260, 0, area.width, 100))
    return sum(count for count, rgb in area.getcolors(maxcolors=1 << 20) if rgb == colour)


def test_loss_curve_with_eval_loss_draws_train_eval_and_learning_rate(tmp_path):
    path = report.draw_loss_curve(history(40, eval_every=10), str(tmp_path / report.CURVE_FILE))
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (1000, 600)
    rgb = image.convert("RGB")
    assert len(rgb.getcolors(maxcolors=1 << 20)) > 20, "axes, text and three curves: not a blank picture"
    assert pixels_of(rgb, report.TRAIN_COLOUR) > 200
    assert pixels_of(rgb, report.EVAL_COLOUR) > 100
    assert pixels_of(rgb, report.LR_COLOUR) > 100
    assert rgb.getpixel((5, 5)) == report.BACKGROUND, "a light background"


def test_loss_curve_without_eval_loss_has_no_eval_line(tmp_path):
    rgb = Image.open(report.draw_loss_curve(history(8), str(tmp_path / "curve.png"))).convert("RGB")
    assert rgb.size == (1000, 600)
    assert pixels_of(rgb, report.TRAIN_COLOUR) > 100
    assert pixels_of(rgb, report.EVAL_COLOUR) == 0


def test_one_logged_step_is_still_a_point_on_a_scale(tmp_path):
    rgb = Image.open(report.draw_loss_curve([{"step": 1, "loss": 2.0}], str(tmp_path / "c.png"))).convert("RGB")
    assert pixels_of(rgb, report.TRAIN_COLOUR) > 10


def test_no_logged_loss_draws_nothing(tmp_path):
    assert report.draw_loss_curve([{"step": 1, "learning_rate": 1e-4}], str(tmp_path / "c.png")) is None
    assert not (tmp_path / "c.png").exists()


def test_a_resumed_run_takes_the_steps_before_the_resume_from_its_checkpoints_trainer_state(tmp_path):
    """The rows of trainer_state.json's log_history as Trainer writes them (the closing summary row and rows
    without a loss are not points); a checkpoint without a readable state gives no earlier points, never an
    error. test_lifecycle's resumed task job checks it on real checkpoints."""
    import json

    state = {
        "global_step": 4,
        "log_history": [
            {"epoch": 0.1, "grad_norm": 1.5, "learning_rate": 2e-4, "loss": 2.5, "step": 2},
            {"epoch": 0.2, "eval_loss": 2.7, "eval_runtime": 0.1, "step": 2},
            {"epoch": 0.3, "learning_rate": 1e-4, "loss": 2.1, "step": 4},
            {"epoch": 0.3, "step": 4, "total_flos": 10.0, "train_loss": 2.3, "train_runtime": 1.0},
        ],
    }
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert report.earlier_points(str(tmp_path)) == [
        {"step": 2, "loss": 2.5, "learning_rate": 2e-4},
        {"step": 2, "eval_loss": 2.7},
        {"step": 4, "loss": 2.1, "learning_rate": 1e-4},
    ]
    assert report.earlier_points(None) == []
    assert report.earlier_points(str(tmp_path / "missing")) == []
    (tmp_path / "trainer_state.json").write_text('{"log_history": [{"step": 2, "loss": null')
    assert report.earlier_points(str(tmp_path)) == []


def test_ticks_are_round_and_cover_the_range():
    assert report.nice_ticks(0.31, 2.64) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert report.nice_ticks(0, 8, whole=True) == [0, 2, 4, 6, 8]
    assert report.nice_ticks(0, 1, whole=True) == [0, 1]


def summary(**parameters) -> dict:
    """A training summary as outputs.summary writes it, trimmed to what the card reads."""
    asked = {"adaptor_name": "my-adapter", "model_name": "org/base-model", "training_mode": "lora"}
    asked.update(dataset_name="data/train.jsonl", learning_rate=2e-4, **parameters)
    return {
        "parameters": asked,
        "plan": {"reasons": ["precision: fp32 (auto: the CPU trains in fp32)", "loss: on completions only (auto)"]},
        "dataset": {
            "format": "prompt_completion",
            "rows": 120,
            "rows_used": 118,
            "dropped": 2,
            "truncated": 5,
            "eval_rows": 12,
            "eval_source": "a seeded 10% of the training rows",
            "trainable_tokens": 4321,
            "total_tokens": 9876,
        },
        "steps": 30,
        "max_steps": 30,
        "world_size": 2,
        "runtime_seconds": 12.5,
        "final_loss": 1.2345678,
        "eval_loss": 1.5,
        "versions": {"trl": "1.16.0"},
    }


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_adapter_card_is_a_hugging_face_card_that_loads_the_adapter_with_peft(tmp_path):
    staging = tmp_path / "my-adapter.partial-1"
    staging.mkdir()
    (staging / "README.md").write_text("---\nlibrary_name: peft\n---\nIt has been trained using [TRL](x).\n")
    report.write_card(str(staging), str(tmp_path / "my-adapter"), summary(), peft=True)
    card = (staging / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "org/base-model" and meta["library_name"] == "peft"
    assert meta["tags"] == ["sft", "trl", "transformerlab", "lora"]
    assert "It has been trained using [TRL]" not in card, "TRL's generic card is replaced"
    assert "![loss curve](loss_curve.png)" in card
    for shown in (
        "| rows | 120 |",
        "| rows left out (nothing left to train) | 2 |",
        "| truncated to maximum_sequence_length | 5 |",
    ):
        assert shown in card, shown
    assert "| trained tokens per epoch | 4321 |" in card and "| final train loss | 1.2346 |" in card
    assert "| final eval loss | 1.5000 |" in card and "- loss: on completions only (auto)" in card
    assert '"learning_rate": 0.0002' in card
    assert "PeftModel.from_pretrained(model, adapter)" in card and 'adapter = "./my-adapter"' in card
    assert 'AutoModelForCausalLM.from_pretrained("org/base-model")' in card


def test_full_fine_tuning_and_merged_cards_are_transformers_models_without_peft(tmp_path):
    card = report.model_card(summary(training_mode="full", eval_split=0), peft=False, folder="my-adapter")
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "lora" not in meta["tags"]
    assert "peft" not in card.split("---\n", 2)[2].lower()
    assert "AutoModelForCausalLM.from_pretrained(path)" in card and 'path = "./my-adapter"' in card
    merged = report.model_card(summary(), peft=False, folder="my-adapter-merged")
    assert front_matter(merged)["library_name"] == "transformers" and "with a LoRA adapter merged in" in merged
    assert 'path = "./my-adapter-merged"' in merged


def test_a_card_shows_the_sample_answers_shortened_and_none_without_them():
    answered = [{"input": "Question: 2+2?\nAnswer:", "expected_output": "It is 4.", "output": "x" * 1000}]
    card = report.model_card(summary(), peft=True, folder="my-adapter", samples=answered)
    section = card.split("## Sample answers\n", 1)[1].split("## Data\n", 1)[0]
    assert "````text\nQuestion: 2+2?\nAnswer:\n````" in section and "````text\nIt is 4.\n````" in section
    assert "x" * 240 + " [...]\n````" in section and "x" * 241 not in section
    assert "## Sample answers" not in report.model_card(summary(), peft=True, folder="my-adapter")
