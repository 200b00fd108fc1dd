"""The host behind one small interface: where parameters come from and where progress goes.

- LegacyHost: TransformerLab 0.31/0.32's plugin harness (`--input_file`), job store `lab.Job(job_id)`.
- LabHost: the lab SDK with `_TFL_JOB_ID` set (current TransformerLab tasks, remote runners).
- HeadlessHost: `main.py --config`; the run creates its own job in the local workspace through the lab SDK.

Training code never knows which host it runs under. Only the parent process uses this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .errors import InvalidConfig, problem
from .rules import model_config

log = logging.getLogger("sft")


def _sync(value):
    """The legacy job API is async in lab 0.0.98/0.1.1; run a coroutine to completion, pass values through."""
    return asyncio.run(value) if inspect.iscoroutine(value) else value


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def _end_job(job, status: str, completion: str, message: str, extra: dict[str, Any] | None = None) -> None:
    """Close a job the way TransformerLab's job store reads it: details first, then the final status."""
    for key, value in {"completion_status": completion, "completion_details": message, "end_time": _now()}.items():
        _sync(job.update_job_data_field(key, value))
    for key, value in (extra or {}).items():
        _sync(job.update_job_data_field(key, value))
    _sync(job.update_status(status))


def _check_lab_home() -> None:
    # Importing `lab` exits the process when these name a missing folder; say so instead.
    for var in ("TFL_HOME_DIR", "TFL_WORKSPACE_DIR"):
        folder = os.environ.get(var)
        if folder and not os.path.isdir(folder):
            raise InvalidConfig([problem(var, f"{folder} does not exist", f"Create it, or unset {var}")])


def _import_lab():
    _check_lab_home()
    with contextlib.redirect_stdout(sys.stderr):
        import lab
    return lab


class Host:
    kind = "host"
    headless = False
    job_id = ""

    def raw_params(self) -> dict[str, Any]:
        raise NotImplementedError

    def start(self, params: dict[str, Any]) -> None:
        """Attach to (or create) the job; not called for --check or --dry-run."""

    def locations(self, p: dict[str, Any]) -> tuple[str, str]:
        """(adapter folder, checkpoint folder) for these parameters."""
        root = os.path.abspath(os.path.expanduser(p["output_dir"] or "./outputs"))
        return os.path.join(root, p["adaptor_name"]), os.path.join(root, "checkpoints", p["adaptor_name"])

    def log(self, text: str) -> None:
        log.info("%s", text)

    def progress(self, percent: int, metrics: dict[str, float] | None, step: int | None) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def register_model(self, path: str, p: dict[str, Any]) -> str:
        return path

    def merged_location(self, p: dict[str, Any]) -> str:
        """Where fuse_model's merged model goes."""
        return self.locations(p)[0].rstrip(os.sep) + "-merged"

    def register_merged(self, path: str, p: dict[str, Any]) -> str:
        return path

    def checkpoint_to_resume(self) -> str | None:
        """A checkpoint the host asks us to resume from (lab SDK), else None."""
        return None

    def complete(self, message: str, score: dict[str, float], plot_path: str | None) -> None:
        pass

    def fail(self, message: str) -> None:
        pass

    def stopped(self, message: str) -> None:
        pass


class LegacyHost(Host):
    kind = "legacy"

    def __init__(self, input_file: str):
        self.input_file = input_file
        try:
            data = json.loads(Path(input_file).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidConfig(
                [problem("input_file", f"cannot read {input_file} ({exc})", "Check the path")]
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise InvalidConfig(
                [problem("input_file", f"{input_file} has no config object", "Start it from TransformerLab")]
            )
        self.config = data["config"]
        self.experiment = data.get("experiment") or {}
        self.job_id = str(self.config.get("job_id", ""))
        self.job = None
        self.output_dir = self.config.get("output_dir", "")
        self._writer = None

    def raw_params(self) -> dict[str, Any]:
        return dict(self.config)

    def start(self, params: dict[str, Any]) -> None:
        if not self.job_id:
            raise InvalidConfig([problem("job_id", "the input file names no job", "Start the run from TransformerLab")])
        self._attach()
        _sync(self.job.update_job_data_field("start_time", _now()))

    def _attach(self) -> None:
        if self.job is None and self.job_id:
            self.job = self._job(_import_lab())

    def _job(self, lab):
        if len(inspect.signature(lab.Job).parameters) == 1:
            return lab.Job(self.job_id)
        experiment = self.experiment.get("name") or self.experiment.get("id") or self.config.get("experiment_name")
        return lab.Job(self.job_id, str(experiment))

    def locations(self, p):
        adapter = p["adaptor_output_dir"] or super().locations(p)[0]
        return adapter, super().locations(p)[1]

    def merged_location(self, p):
        from .data import workspace_dir

        base = os.path.basename(os.path.normpath(p["model_name"]))
        return os.path.join(workspace_dir(), "models", f"{base}_{p['adaptor_name']}")

    def register_merged(self, path, p):
        # The model folder format of TransformerLab's local models (an index.json beside the weights).
        name = os.path.basename(path)
        config = model_config(path) or {}
        architecture = (config.get("architectures") or [p["model_architecture"] or ""])[0]
        description = {
            "model_id": f"TransformerLab/{name}",
            "model_filename": ".",
            "name": name,
            "local_model": True,
            "json_data": {
                "uniqueID": f"TransformerLab/{name}",
                "name": name,
                "model_filename": ".",
                "description": f"{p['model_name']} fine-tuned with adapter {p['adaptor_name']} (merged)",
                "source": "transformerlab",
                "architecture": architecture,
                "huggingface_repo": "",
                "parent_model": p["model_name"],
            },
        }
        Path(path, "index.json").write_text(json.dumps(description, indent=2))
        return path

    def _field(self, key: str, value: Any) -> None:
        if self.job is not None:
            _sync(self.job.update_job_data_field(key, value))

    def progress(self, percent, metrics, step):
        if self.job is None:
            return
        _sync(self.job.update_progress(percent))
        if metrics:
            self._field("current_metrics", {**metrics, "step": step})
            self._tensorboard(metrics, step)

    def _tensorboard(self, metrics: dict[str, float], step: int | None) -> None:
        """TransformerLab 0.31's Train tab charts a job from TensorBoard logs under its output_dir."""
        if not self.output_dir:
            return
        if self._writer is None:
            from tensorboardX import SummaryWriter

            folder = os.path.join(self.output_dir, f"job_{self.job_id}_{self.config.get('template_name') or 'sft'}")
            self._writer = SummaryWriter(folder)
            self._field("tensorboard_output_dir", self.output_dir)
        for name, value in metrics.items():
            if name != "eta_seconds":
                tag = f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"
                self._writer.add_scalar(tag, value, step or 0)
        self._writer.flush()

    def should_stop(self) -> bool:
        if self.job is None:
            return False
        data = _sync(self.job.get_job_data()) or {}
        status = _sync(self.job.get_status()) if hasattr(self.job, "get_status") else None
        return bool(data.get("stop")) or status == "STOPPING"

    def _finish(self, status: str, completion: str, message: str, extra: dict[str, Any] | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
        # The job exists before we run (the host made it), so a failure before start() still ends it.
        self._attach()
        if self.job is not None:
            _end_job(self.job, status, completion, message, extra)

    def complete(self, message, score, plot_path):
        if self.job is not None:
            _sync(self.job.update_progress(100))
        extra = {"score": json.dumps(score)}
        if plot_path:
            extra["plot_data_path"] = plot_path
        self._finish("COMPLETE", "success", message, extra)
        if self.output_dir:
            # Hyperparameter sweeps read <output_dir>/metrics.json.
            os.makedirs(self.output_dir, exist_ok=True)
            metrics = {"train/loss": score.get("train_loss"), "eval/loss": score.get("eval_loss", score.get("loss"))}
            Path(self.output_dir, "metrics.json").write_text(json.dumps(metrics))

    def fail(self, message):
        self._finish("FAILED", "failed", message)

    def stopped(self, message):
        self._finish("STOPPED", "success", message)


class LabHost(Host):
    kind = "lab"

    def __init__(self, experiment: str | None = None):
        self.experiment = experiment
        self.lab = None
        self._params: dict[str, Any] | None = None
        self._metrics_api = True

    def _attach(self) -> None:
        if self.lab is None:
            self.lab = _import_lab().lab
            with contextlib.redirect_stdout(sys.stderr):
                self.lab.init(experiment_id=self.experiment)
            self.job_id = str(self.lab.job.id)
            self._metrics_api = "metrics" in inspect.signature(self.lab.update_progress).parameters

    def raw_params(self) -> dict[str, Any]:
        self._attach()
        return dict(self.lab.get_config())

    def start(self, params):
        self._attach()

    def _job_dir(self) -> str:
        return os.path.dirname(self.lab.get_checkpoints_dir().rstrip("/"))

    def locations(self, p):
        self._attach()
        return os.path.join(self._job_dir(), "adaptor", p["adaptor_name"]), self.lab.get_checkpoints_dir()

    def log(self, text):
        super().log(text)
        if self.lab is not None:
            with contextlib.redirect_stdout(sys.stderr):
                self.lab.log(text)

    def progress(self, percent, metrics, step):
        if self.lab is None:
            return
        with contextlib.redirect_stdout(sys.stderr):
            if self._metrics_api:
                self.lab.update_progress(percent, metrics=metrics or None, step=step)
            else:
                self.lab.update_progress(percent)

    def register_model(self, path, p):
        saved = self._save_model(path, p["adaptor_name"], p)
        shutil.rmtree(path, ignore_errors=True)  # the job's models folder now holds it
        return saved

    def merged_location(self, p):
        self._attach()
        return os.path.join(self._job_dir(), "merged", f"{p['adaptor_name']}-merged")

    def register_merged(self, path, p):
        saved = self._save_model(path, f"{p['adaptor_name']}-merged", p)
        shutil.rmtree(path, ignore_errors=True)
        return saved

    def _save_model(self, path: str, name: str, p) -> str:
        with contextlib.redirect_stdout(sys.stderr):
            return self.lab.save_model(
                path,
                name=name,
                parent_model=p["model_name"] or None,
                architecture=p["model_architecture"] or None,
                pipeline_tag="text-generation",  # else the SDK asks the Hub about the parent model
            )

    def checkpoint_to_resume(self):
        with contextlib.redirect_stdout(sys.stderr):
            return self.lab.get_checkpoint_to_resume()

    def complete(self, message, score, plot_path):
        with contextlib.redirect_stdout(sys.stderr):
            self.lab.finish(message, score=score, plot_data_path=plot_path)

    def fail(self, message):
        self._attach()
        with contextlib.redirect_stdout(sys.stderr):
            self.lab.error(message)

    def stopped(self, message):
        self._attach()
        _end_job(self.lab.job, "STOPPED", "success", message)


class HeadlessHost(LabHost):
    kind = "headless"
    headless = True

    def __init__(self, params: dict[str, Any], experiment: str | None):
        super().__init__(experiment or "alpha")
        self._raw = params

    def raw_params(self):
        return dict(self._raw)

    def start(self, params):
        self._attach()
        self.lab.set_config({"parameters": self._raw})

    def locations(self, p):
        return Host.locations(self, p)

    def fail(self, message):
        # A headless run whose parameters never passed made no job; there is nothing to mark.
        if self.lab is not None:
            super().fail(message)

    def stopped(self, message):
        # Likewise a headless run stopped before it started (a --check or --dry-run, or during preparation).
        if self.lab is not None:
            super().stopped(message)

    def register_model(self, path, p):
        # The adapter stays in output_dir (that is the result); the job gets its own registered copy.
        return self._register_copy(path, p["adaptor_name"], p)

    def merged_location(self, p):
        return Host.merged_location(self, p)

    def register_merged(self, path, p):
        return self._register_copy(path, f"{p['adaptor_name']}-merged", p)

    def checkpoint_to_resume(self):
        return None  # headless runs resume from their own checkpoint folder

    def _register_copy(self, path, name, p):
        try:
            self._save_model(path, name, p)
        except Exception as exc:  # a convenience here: the output is already in place
            log.warning("could not register %s with the workspace: %s", name, exc)
        return path


def read_config(path: str, overrides: list[str]) -> dict[str, Any]:
    try:
        params = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InvalidConfig([problem("--config", f"cannot read {path} ({exc.strerror})", "Check the path")]) from None
    except ValueError as exc:
        raise InvalidConfig([problem("--config", f"{path} is not valid JSON ({exc})", "Fix the file")]) from None
    if not isinstance(params, dict):
        raise InvalidConfig([problem("--config", f"{path} is not a JSON object", 'Give {"key": value, ...}')])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidConfig([problem("--set", f"{item!r} is not key=value", "Write --set learning_rate=1e-4")])
        params[key.strip()] = value
    return params


def choose(args) -> Host:
    """The host for this start: input file (legacy harness), _TFL_JOB_ID (lab SDK), or --config (headless)."""
    if args.input_file:
        return LegacyHost(args.input_file)
    if args.config:
        return HeadlessHost(read_config(args.config, args.set or []), args.experiment)
    if os.environ.get("_TFL_JOB_ID"):
        return LabHost()
    raise InvalidConfig(
        [problem("--config", "no parameters given", "Run `python main.py --config run.json` (see README.md)")]
    )
