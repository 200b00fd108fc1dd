"""Run outputs: the adapter folder is written under a temporary name and renamed into place, with
`training_summary.json` inside; checkpoints are found for resuming."""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

SUMMARY_FILE = "training_summary.json"
LIBRARIES = ("trl", "transformers", "accelerate", "peft", "datasets", "torch", "transformerlab")


def staging_path(final: str) -> str:
    return f"{final.rstrip(os.sep)}.partial-{os.getpid()}"


def is_complete_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SUMMARY_FILE))


def versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    manifest = Path(__file__).resolve().parent.parent / "index.json"
    found["plugin"] = json.loads(manifest.read_text()).get("version", "")
    return found


def publish(staging: str, final: str, summary: dict[str, Any]) -> str:
    """Write the summary into the staged folder, then move it into place in one rename."""
    Path(staging, SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    old = None
    if os.path.isdir(final):
        if os.listdir(final):
            old = f"{final}.old-{os.getpid()}"
            os.replace(final, old)
        else:
            os.rmdir(final)  # hosts may create the folder beforehand
    os.replace(staging, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return os.path.abspath(final)


def latest_checkpoint(folder: str) -> str | None:
    """The newest checkpoint whose save finished (trainer_state.json is written last)."""
    if not os.path.isdir(folder):
        return None
    found = []
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        step = entry.removeprefix("checkpoint-")
        if step.isdigit() and os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(step), path))
    return max(found)[1] if found else None


def resume_point(adapter_dir: str, checkpoint_dir: str, *, overwrite: bool) -> str | None:
    """Where an interrupted run left off; a run that replaces a finished adapter starts afresh."""
    if overwrite and is_complete_adapter(adapter_dir):
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return None
    return latest_checkpoint(checkpoint_dir)


def write_plot(path: str, history: list[dict[str, Any]]) -> str | None:
    if not history:
        return None
    figure = {
        "data": [
            {
                "x": [h["step"] for h in history],
                "y": [h["loss"] for h in history],
                "type": "scatter",
                "mode": "lines",
                "name": "train loss",
            }
        ],
        "layout": {"title": "Training loss", "xaxis": {"title": "step"}, "yaxis": {"title": "loss"}},
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Path(path).write_text(json.dumps(figure))
    return path


def summary(p: dict[str, Any], plan, result, stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parameters": p,
        "plan": plan.as_dict(),
        "world_size": result.world_size,
        "steps": result.steps,
        "max_steps": result.max_steps,
        "final_loss": result.final_loss,
        "eval_loss": result.eval_loss,
        "runtime_seconds": round(result.runtime, 2),
        "seconds_to_first_step": result.startup_seconds,
        "dataset": stats,
        "versions": versions(),
    }
