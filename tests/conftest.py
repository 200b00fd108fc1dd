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
# bitsandbytes, installed apart by `make setup` (beside peft, every rank would import it): on PYTHONPATH for QLoRA.
BITSANDBYTES = ROOT / ".bitsandbytes"


def with_bitsandbytes(env: dict[str, str]) -> dict[str, str]:
    """An environment whose processes (main.py and the ranks it starts) can import bitsandbytes."""
    path = os.pathsep.join(filter(None, [str(BITSANDBYTES), env.get("PYTHONPATH", os.environ.get("PYTHONPATH"))]))
    return {**env, "PYTHONPATH": path}


TEMPLATE = "Question: {{ prompt }}\nAnswer:{{ completion }}"

# The keys the Train tab and the host fill (info.md, "Parameters"); never form parameters.
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


def pytest_collection_modifyitems(config, items):
    """The end-to-end runs first: on two workers the long ones then overlap, and the quick tests fill the end.

    Tests marked `xdist_group` share a session-scoped launch, so they must run on one worker. pytest-xdist 3.8
    groups them by suffixing each test's id with "@group", but writes the id where pytest 9 no longer keeps it:
    without this the group's tests were spread over both workers, and each worker repeated the launch."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if not getattr(config.option, "loadgroup", False):  # set on the workers of --dist loadgroup
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(mark.args[0]) for mark in item.iter_markers("xdist_group") if mark.args})
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


@pytest.fixture(scope="session")
def _layers_cache(tmp_path_factory) -> Path:
    """One folder for every xdist worker of this run: the descriptions are keyed by the model's config, not its
    path, and written whole, so a model one worker described is read by the others."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "layers-cache"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, _layers_cache):
    """No hub, and every test gets its own lab workspace and prepared-data cache. The models' layer descriptions
    (layers.describe) are kept for the session: the first run of a model builds it, as a user's first run does,
    and the later ones read it (tests/test_layers.py proves both ways give the same)."""
    monkeypatch.setenv("SFT_LAYERS_CACHE", str(_layers_cache))
    home = tmp_path / "tflhome"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TFL_HOME_DIR", str(home))
    monkeypatch.delenv("TFL_WORKSPACE_DIR", raising=False)
    monkeypatch.delenv("_TFL_JOB_ID", raising=False)
    monkeypatch.delenv("_TFL_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("SFT_PREPARED_CACHE", str(tmp_path / "prepared"))


@pytest.fixture
def worker():
    """plugin_utils.worker, for the tests that call it: importing it imports transformers and torch (seconds of
    CPU), which collection would otherwise pay on every xdist worker, whether or not it runs those tests."""
    from plugin_utils import worker

    return worker


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from demo.tiny_model import build

    return str(build(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The real base tokenizers (real_tokenizers.py), built once per worker for the data and sample tests (which
    share the worker: xdist_group "token_exact")."""
    from . import real_tokenizers as rt

    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "byte-bpe": rt.byte_bpe_dir(root / "bpe"),
        "sentencepiece": rt.sentencepiece_dir(root / "spm", "tokenizer.model.v1"),
        "mistral-instruct-v3": rt.sentencepiece_dir(root / "v3", "mistral_instruct_tokenizer_240323.model.v3"),
    }


def tensor_dtypes(path: Path) -> dict[str, str]:
    """Each tensor's dtype in a safetensors file, as stored ("F32", "BF16")."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118 - not a dict


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


def resolve(raw: dict, *, headless: bool, nodes=None):
    """Read parameters as main.py does; single-value errors raise (with the warnings), else (params, warnings)."""
    from plugin_utils import params
    from plugin_utils.errors import InvalidConfig

    reading = params.read(raw, headless=headless, nodes=nodes)
    if reading.errors:
        raise InvalidConfig(reading.errors, reading.warnings)
    return reading.params, reading.warnings


def params_of(**raw):
    """Parameters as a host's values are read (strings and all: "2", "0,1", "on"), the rest at their defaults,
    with a model, a dataset and an adaptor name."""
    from plugin_utils import params

    return params.defaults().replace(**{"model_name": "m", "dataset_name": "d", "adaptor_name": "a", **raw})


def plan_of(**decisions):
    """A plan with these decisions (the rest as on one CPU process): for GPU plans, which cannot be built on
    this CPU-only machine from a real nvidia-smi, and for tests of what a plan leads to."""
    from plugin_utils.planning import Plan

    values = {
        "device": "cpu",
        "gpu_ids": (),
        "num_processes": 1,
        "num_machines": 1,
        "machine_rank": 0,
        "main_process_ip": "",
        "main_process_port": 0,
        "precision": "fp32",
        "strategy": "ddp",
    }
    values.update(decisions)
    values.setdefault("weights_precision", values["precision"])
    values["gpu_ids"] = tuple(values["gpu_ids"])
    return Plan(**values)


def spec_of(folder: str, p=None, plan=None, **fields):
    """The run spec main.py would write for these parameters and plan, with `fields` replaced."""
    import dataclasses

    from plugin_utils.runfolder import RunFolder, RunSpec

    spec = RunSpec.of(
        params_of(**(p or {})),
        plan or plan_of(),
        RunFolder(folder),
        prepared_path=folder,
        has_eval=False,
        checkpoint_dir=folder,
        checkpoint_staging=f"{folder}/saving",
        resume_from=None,
        adapter_staging=f"{folder}/adapter",
        merged_staging=None,
    )
    return dataclasses.replace(spec, **fields)


def prepare_data(p, preview: int = 3):
    """Prepare the data as main.py does: load, the data rules, the plan's loss mode, tokenize, the statistics
    rules. Errors raise InvalidConfig, as they end a run with exit 2."""
    from plugin_utils import data, machine, params, planning, validation

    p = p if isinstance(p, params.Params) else params.defaults().replace(**p)
    dataset = data.load(p.data)
    validation.check(("data",), p=p, out=None, data=dataset.facts()).raise_errors()  # no output folders here
    plan = planning.build(p, machine.detect()).with_loss_mode(p, dataset.format)
    prepared = data.prepare(p.data, dataset, plan.completion_only, preview=preview)
    found = validation.check(("statistics",), p=p, plan=plan, stats=prepared.stats)
    found.raise_errors()
    return prepared


def stats_of(**values):
    """Prepared rows' statistics (data.PreparedStats) for the statistics rules: 100 rows, 90 used for training
    and 10 for evaluation, none dropped, unless `values` says otherwise."""
    from plugin_utils.data import PreparedStats

    defaults = {
        "format": "prompt_completion",
        "rows": 100,
        "dropped": 0,
        "truncated": 0,
        "length_percentiles": {"p50": 10, "p90": 20, "p99": 30, "max": 40},
        "empty_answers": 0,
        "no_answer": 0,
        "reasoning_dropped": 0,
        "open_turns": 0,
        "rows_used": 90,
        "eval_rows": 10,
        "trainable_tokens": 0,
        "total_tokens": 0,
        "eval_source": None,
        "own_eval_split": None,
        "own_eval_rows": 0,
    }
    return PreparedStats(**{**defaults, **values})
