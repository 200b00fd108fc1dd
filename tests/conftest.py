"""Shared fixtures: a real tiny model built offline, an isolated workspace and cache, and a way to run
main.py the way each host does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "demo" / "sample_data.jsonl"
LEGACY_LAB = ROOT / ".legacy-lab"
LEGACY_LAB_032 = ROOT / ".legacy-lab-0.1.1"
TEMPLATE = "Question: {{ prompt }}\nAnswer:{{ completion }}"

# SPEC §3: the keys the Train tab and the host fill; never form parameters.
SPEC_HOST_KEYS = {
    "model_name",
    "model_architecture",
    "dataset_name",
    "template_name",
    "plugin_name",
    "job_id",
    "output_dir",
    "adaptor_output_dir",
    "run_sweeps",
    "sweep_config",
    "experiment_name",
    "formatting_template",
    "apply_chat_template",
    "chatml_formatted_column",
    "formatting_chat_template",
}

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No hub, and every test gets its own lab workspace and prepared-data cache."""
    home = tmp_path / "tflhome"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TFL_HOME_DIR", str(home))
    monkeypatch.delenv("TFL_WORKSPACE_DIR", raising=False)
    monkeypatch.delenv("_TFL_JOB_ID", raising=False)
    monkeypatch.delenv("_TFL_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("SFT_PREPARED_CACHE", str(tmp_path / "prepared"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from demo.tiny_model import build

    return str(build(tmp_path_factory.mktemp("tiny-model")))


def base_config(tiny_model: str, tmp_path: Path, **overrides) -> dict:
    config = {
        "model_name": tiny_model,
        "dataset_name": str(SAMPLE),
        "adaptor_name": "test-adaptor",
        "formatting_template": TEMPLATE,
        "output_dir": str(tmp_path / "outputs"),
        "train_device": "cpu",
        "num_processes": 1,
        "max_steps": 6,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "logging_steps": 2,
        "save_steps": 3,
        "maximum_sequence_length": 128,
        "learning_rate": 1e-3,
        "gradient_checkpointing": False,
    }
    config.update(overrides)
    return config


# Every process a test starts carries this tag in its environment, and so do the processes those start:
# a test looks for leftovers among the processes with its own tag, never at every process on the machine.
RUN_TAG = "SFT_TEST_RUN_TAG"


def tagged_processes(tag: str, marker: str = "plugin_utils") -> list:
    """Live processes started under `tag` whose command line names `marker`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and proc.environ().get(RUN_TAG) == tag:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def run_main(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=str(ROOT),
    )


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    assert lines, "no output on stdout"
    return json.loads(lines[-1])


def write_config(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    return str(path)
