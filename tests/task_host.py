"""What current TransformerLab (transformerlab-app v0.40.1) does to a task's job, for the tests and for
bench/task_flow.py: its API server makes the job through the lab SDK, its Local provider runs `run:` through the
SDK's real `tfl-remote-trap` under `/bin/bash -c` in a new session (compute_providers/local.py), and its Stop
marks the job, then sends SIGTERM to every process of the tree and SIGKILL to what is left 3 s later
(services/process_registry.py). Only the server itself is missing: the SDK code the plugin meets is the real one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "exp1"


def _lab(home: Path, script: str, *args: str) -> str:
    """Run lab SDK code in a process of its own, as the server would; returns its last line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TFL_HOME_DIR": str(home)},
        check=True,
    )
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def make_lab_job(home: Path, params: dict, **job_data) -> str:
    """A job whose parameters are `params` (what `lab.get_config()` returns), with `job_data` beside them."""
    script = (
        "import json, sys\nfrom lab import lab\n"
        f"lab.init({EXPERIMENT!r})\n"
        "lab.set_config({'parameters': json.loads(sys.argv[1]), **json.loads(sys.argv[2])})\n"
        "sys.stderr.write(str(lab.job.id))\n"
    )
    return _lab(home, script, json.dumps(params), json.dumps(job_data))


def mark_stopping(home: Path, job_id: str) -> None:
    """What Stop does to the job's record first: job_data.stop, then the status STOPPING."""
    script = (
        "import asyncio, sys\nfrom lab import Job\n"
        "async def main():\n"
        f"    job = await Job.get(sys.argv[1], {EXPERIMENT!r})\n"
        "    await job.update_job_data_field('stop', True)\n"
        "    await job.update_status('STOPPING')\n"
        "asyncio.run(main())\n"
    )
    _lab(home, script, job_id)


class TaskRun:
    """`python main.py --json` run as the Local provider runs a task's `run:`; its output goes to a log file."""

    def __init__(self, home: Path, job_id: str, env: dict[str, str] | None = None):
        self.home, self.job_id = home, job_id
        trap = Path(sys.executable).parent / "tfl-remote-trap"
        command = f"{trap} -- {sys.executable} {ROOT / 'main.py'} --json"
        lab_env = {"_TFL_JOB_ID": job_id, "_TFL_EXPERIMENT_ID": EXPERIMENT, "TFL_HOME_DIR": str(home)}
        self.log = home.parent / f"task-{job_id}.log"
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", command],
            cwd=str(ROOT),
            env={**os.environ, **lab_env, **(env or {})},
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if text in self.output:
                return
            time.sleep(0.05)
        raise AssertionError(f"never saw {text!r}; output:\n{self.output[-4000:]}")

    def stop(self) -> list[str]:
        """The job's Stop: the record marked, SIGTERM to the tree, SIGKILL 3 s later. Returns the command lines
        of the processes the SIGKILL took."""
        mark_stopping(self.home, self.job_id)
        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=3)
        killed = []
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                killed.append(" ".join(proc.cmdline()))
                proc.kill()
        self.proc.wait(timeout=30)
        return killed
