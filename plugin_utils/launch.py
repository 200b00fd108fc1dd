"""Starts the ranks and watches them: relays rank-0 events to the host, passes stop requests on, and
turns the ranks' exit into a result. Only this process writes to the host.

One process needs no distributed launch; two or more go through `accelerate launch` with the run's own launcher
config (strategies.py; NCCL on GPUs, gloo on CPU, where the ranks' `use_cpu=True` makes them one group).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoints, samples
from .errors import RunFailed, StopRequested
from .host import StepRow, trackio_requested
from .machine import NODE_LEVEL_VARIABLES, preparation_processes
from .planning import Plan
from .report import CURVE_KEYS
from .runfolder import (
    NO_REPORTING,
    CheckpointSaved,
    Done,
    Event,
    Logged,
    Progress,
    Reporting,
    RunFolder,
    RunSpec,
    Sampled,
    Started,
    Stopped,
    process_start,
)
from .strategies import launched_by_accelerate, write_configs

log = logging.getLogger("sft")
PLUGIN_DIR = str(Path(__file__).resolve().parent.parent)
RELAY_INTERVAL = 1.0
METRIC_KEYS = ("loss", "eval_loss", "learning_rate", "epoch", "tokens_per_second", "grad_norm", "mean_token_accuracy")
STOP_POLL_INTERVAL = 2.0
# The signals that stop a run, in this process (the ranks take theirs in worker.py).
PARENT_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How long a stop that interrupted this process has to unwind (end the preparation's processes and the waiting
# ranks, remove what was half written; each wait there is bounded) before another stop signal interrupts again.
UNWIND_SECONDS = 30.0
STOP_GRACE_SECONDS = 300


@dataclass
class RunResult:
    """A run whose ranks finished: what they trained and how long it took."""

    steps: int = 0
    max_steps: int = 0
    world_size: int = 0
    final_loss: float | None = None
    eval_loss: float | None = None
    runtime: float = 0.0
    # Seconds from this process's start to the first training step's event.
    startup_seconds: float | None = None
    resumed_from_step: int = 0
    # False on the other nodes of a multi-node run: the main node writes the adapter.
    has_adapter: bool = True
    peak_gpu_memory_mib: float | None = None
    # When rank 0 started, imported its libraries, loaded the model, built the trainer (seconds from our start).
    rank_startup: dict[str, float] = field(default_factory=dict)
    loss_history: list[dict[str, Any]] = field(default_factory=list)
    logged: list[dict[str, float]] = field(default_factory=list)  # see Watcher.logged
    samples: list[dict[str, str]] = field(default_factory=list)  # the trained model's answers (samples.py)


class StopFlag:
    """Set by a signal handler or the host's stop button; read by the watch loop.

    Before the ranks have their spec (data preparation, opening the job), a signal interrupts at once: nothing
    has been trained, what was being written is staged and removed, and the waiting ranks are ended. Once they
    train, it asks them to save and stop.
    """

    def __init__(self) -> None:
        self.requested = False
        self.forced = False
        self.interrupting = True
        self.signalled_at: float | None = None  # when the first stop signal came (not the host's stop flag)
        self.pid = os.getpid()
        self._end_preparation_processes: Callable[[], None] | None = None  # set by guard_forks
        self._deferring = 0  # inside `deferred`
        self._deferred = False  # a stop signal came while deferring: raised once the stretch is done
        self._interrupted_at: float | None = None  # when a stop signal last interrupted this process
        self.settled = False  # see `settle`

    def request(self) -> None:
        if self.requested:
            self.forced = True
        self.requested = True

    def on_signal(self, signum, _frame=None) -> None:
        if os.getpid() != self.pid:
            # A forked data-preparation worker inherited this handler: it just ends, as by default.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.settled:
            return
        if self.interrupting and self._forking:
            # Inside os.fork's hooks an exception is swallowed, with a lock of theirs (logging's) half taken: the
            # stop would be lost and the next fork (a worker pool refilling itself) would hang. Come back once the
            # fork is done.
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        if self.signalled_at is None:
            self.signalled_at = time.time()
        self.request()
        if self.interrupting:
            if self._deferring:
                self._deferred = True
                return
            if self._interrupted_at is not None and time.time() - self._interrupted_at < UNWIND_SECONDS:
                # An impatient second Ctrl-C: the first stop is unwinding, and cut short it would leave what it
                # removes (a staging folder, worker processes) behind. One that comes later breaks a stuck unwind.
                return
            self._interrupt()

    def _interrupt(self) -> None:
        self._interrupted_at = time.time()
        self._end_children()
        raise StopRequested()

    def settle(self) -> None:
        """The run's ending is decided (its report follows): a stop signal from now on changes nothing. Ignored, not
        only no longer raised: Python puts back the default action (death by the signal) while it shuts down,
        which would turn a stopped run's exit code into the signal's."""
        self.settled = True
        for signum in PARENT_STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A stretch a stop must not cut in two (the ranks started and their ending registered, which would
        otherwise leave them running, holding the run lock): a stop signal during it interrupts once it is done."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring and self._deferred and self.interrupting:
            self._deferred = False
            self._interrupt()

    def _end_children(self) -> None:
        """Before the ranks train, every child of this process in its own session is a data-preparation process
        (the ranks have a session of their own, and `Ranks.end` ends them). They end here, with
        SIGKILL, before the stop unwinds this process through the worker pool's own cleanup, which could hang two
        ways: it joins its workers, and one forked just as the stop came (so it never got the group's signal),
        stuck on a lock the fork copied held, never ran the handler that would end it on the pool's SIGTERM; and
        it takes the lock of the pool's task queue, which a worker killed while reading the queue (by the group's
        signal, or here) never gives back."""
        if self._end_preparation_processes is not None:
            self._end_preparation_processes()

    _forking = False

    def guard_forks(self) -> None:
        """Mark the time this process spends in os.fork (its hooks included), so a stop signal arriving then is
        taken once the fork is done. Registered once the libraries that fork (datasets' worker pools) have
        registered theirs: the last registered runs first before a fork and last after it."""

        import psutil  # here, never inside a signal handler, which may interrupt an import

        def entering() -> None:
            StopFlag._forking = True

        def leaving() -> None:
            StopFlag._forking = False

        def end_preparation_processes() -> None:
            pools = _worker_pools()
            for pool in pools:  # no worker replaces the ones killed below
                with contextlib.suppress(AttributeError):
                    pool._worker_handler._state = "TERMINATE"
            for _ in range(2):  # again for a worker forked while the pools were told
                children = preparation_processes()
                for child in children:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                _wait_until_dead(children, timeout=5)
            _free_pool_queue_locks(pools)

        self._end_preparation_processes = end_preparation_processes
        os.register_at_fork(before=entering, after_in_parent=leaving, after_in_child=leaving)


def _wait_until_dead(children: list, timeout: float) -> None:
    """Until each process has ended (a zombie, or gone), without reaping it: its pool still waits for it."""
    import psutil

    deadline = time.time() + timeout
    for child in children:
        while time.time() < deadline:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.Error:
                break
            time.sleep(0.01)


def _worker_pools() -> list:
    """The worker pools of this process (datasets' parallel map runs one). Called from a signal handler, so it
    imports nothing: without multiprocess imported there is no pool."""
    worker_pools = sys.modules.get("multiprocess.pool")
    if worker_pools is None:
        return []
    return [obj for obj in gc.get_objects() if isinstance(obj, worker_pools.Pool)]


def _free_pool_queue_locks(pools: list) -> None:
    """Give back the queue locks that only a pool's workers take: the task queue's read lock (an idle worker holds
    it while it waits to read) and the result queue's write lock. Once the workers are dead nobody holds them
    rightly, and the pool's terminate() takes the first (multiprocess.pool.Pool._help_stuff_finish) and puts on
    the result queue under the second. A lock that is free refuses the release (ValueError)."""
    for pool in pools:
        for queue, lock in ((getattr(pool, "_inqueue", None), "_rlock"), (getattr(pool, "_outqueue", None), "_wlock")):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                getattr(queue, lock).release()


def free_port() -> int:
    import socket  # here: of the runs that import this module, --check never opens one

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def rendezvous_port(plan: Plan) -> int:
    """The port the ranks meet on: the one asked for, or a free one (a busy one is replaced on one machine)."""
    port = plan.main_process_port
    if not port:
        return free_port()
    if plan.num_machines == 1 and not _port_free(port):
        replacement = free_port()
        log.warning("main_process_port %s is in use; the ranks meet on port %s instead", port, replacement)
        return replacement
    return port


def command(run_dir: str, configs: dict[str, str]) -> list[str]:
    """The ranks' command: `accelerate launch` with the run's own launcher config (strategies.py), else one plain
    Python process."""
    entry = ["-m", "plugin_utils.rank", run_dir]
    if "accelerate" in configs:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", configs["accelerate"], *entry]
    return [sys.executable, *entry]


def lone_deepspeed_rank(plan: Plan, port: int) -> dict[str, str]:
    """What a DeepSpeed rank started without a launcher needs: DeepSpeed sets up its process group from these
    variables, and without them goes looking for MPI (`mpi4py`, which is not installed) and fails."""
    if launched_by_accelerate(plan) or not plan.strategy.startswith("deepspeed"):
        return {}
    return {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


REPORTS_DIR = "logs"


def reporting(p, run_dir: str) -> Reporting:
    """Where the first rank's trackers write: the `logs` folder of the run's own folder, which no run deletes and
    which holds the loss curve beside it; the adapter's name as the project, the start time as the run. Under a
    host that runs its own Trackio run for the job (TLAB_TRACKIO_AUTO_INIT), this process already logs every row
    there (host.LabSdk.trackio_log): the ranks' Trackio would be a second copy, so they have none."""
    skipped = {"trackio"} if trackio_requested() else set()
    reporters = tuple(name for name in p.reporters if name not in skipped)
    return Reporting(reporters, os.path.join(run_dir, REPORTS_DIR), p.adaptor_name, time.strftime("%Y%m%d-%H%M%S"))


def reporting_env(reporting: Reporting, environ: Mapping[str, str]) -> dict[str, str]:
    """Each tracker's folder as the library reads it, in the ranks' environment (Trackio reads TRACKIO_DIR when it
    is imported); W&B offline without a key, unless WANDB_MODE says otherwise. SFT_LOG_TO_WANDB tells a rank,
    before it reads the spec, whether to import W&B at all (rank.import_libraries)."""
    env = {"SFT_LOG_TO_WANDB": "1" if "wandb" in reporting.reporters else ""}
    if "tensorboard" in reporting.reporters:
        env["TENSORBOARD_LOGGING_DIR"] = reporting.directory("tensorboard")
    if "trackio" in reporting.reporters:
        env["TRACKIO_DIR"] = reporting.directory("trackio")
    if "wandb" in reporting.reporters:
        env.update(WANDB_DIR=reporting.folder, WANDB_PROJECT=reporting.project)
        if not environ.get("WANDB_API_KEY"):
            env["WANDB_MODE"] = environ.get("WANDB_MODE") or "offline"
    return env


def reporting_lines(asked: tuple[str, ...], reporting: Reporting, environ: Mapping[str, str]) -> list[str]:
    """One line per tracker asked for: where its logs are and how to open them."""
    lines = []
    for name in asked:
        where = reporting.directory(name)
        if name not in reporting.reporters:
            lines.append(f"report_to {name}: the job's own Trackio run has the rows; the ranks log no second copy")
        elif name == "tensorboard":
            lines.append(f"report_to tensorboard: {where}; open: tensorboard --logdir {os.path.dirname(where)}")
        elif name == "trackio":
            show = f"TRACKIO_DIR={where} trackio show --project {reporting.project}"
            lines.append(f"report_to trackio: {where}; open: {show}")
        elif reporting_env(reporting, environ).get("WANDB_MODE") == "offline":
            lines.append(f"report_to wandb: offline, in {where}; upload: wandb sync {where}/offline-run-*")
        else:
            lines.append(f"report_to wandb: project {reporting.project}, run {reporting.run_name}; files in {where}")
    return lines


def rank_env(plan: Plan, reporting: Reporting = NO_REPORTING, port: int = 0) -> dict[str, str]:
    """The ranks' environment. GPUs are selected here, never inside the ranks after torch starts: the planned GPUs
    as this process's CUDA_VISIBLE_DEVICES names them (a GPU- or MIG- id stays that id), else by nvidia-smi index;
    an empty value hides every GPU."""
    env = {k: v for k, v in os.environ.items() if k not in NODE_LEVEL_VARIABLES}
    env.update(reporting_env(reporting, env))
    env["CUDA_VISIBLE_DEVICES"] = plan.cuda_visible_devices
    # CUDA numbers cards fastest first unless told otherwise; nvidia-smi numbers them by bus.
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env.update(lone_deepspeed_rank(plan, port))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PLUGIN_DIR, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Ranks stop (and save) if this process disappears without stopping them.
    env["SFT_PARENT_PID"] = str(os.getpid())
    if plan.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.num_processes))
    return env


class Tail:
    """Follows the launcher's and the ranks' log files in the run folder (each rank writes its own, see rank.py):
    echoes the launcher's and this node's first rank's lines to our stderr, and keeps the last lines of every
    file for the failure message. Reading files, never a pipe the ranks depend on, it can stop (or this process
    die) without the ranks noticing."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.lines: collections.deque = collections.deque(maxlen=200)
        self._offsets: dict[str, int] = {}
        self._pending: dict[str, bytes] = {}
        self._echo = True
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="rank-logs", daemon=True)

    def start(self) -> Tail:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._done.set()
        self._thread.join(timeout=timeout)

    def _follow(self) -> None:
        while not self._done.wait(0.2):
            self.read()
        self.read(final=True)

    def _files(self) -> list[tuple[str, str]]:
        """(path, label) of the logs to follow: the launcher's first, then each rank's, by rank."""
        found = [(self.folder.launcher_log, "")]
        logs = self.folder.logs_dir
        names = os.listdir(logs) if os.path.isdir(logs) else []
        numbers = (name.removeprefix("rank-").removesuffix(".log") for name in names if name.startswith("rank-"))
        ranks = sorted(int(number) for number in numbers if number.isdigit())
        found += [(self.folder.rank_log(rank), "" if rank == 0 else f"[rank {rank}] ") for rank in ranks]
        return found

    def read(self, final: bool = False) -> None:
        for path, label in self._files():
            try:
                with open(path, "rb") as handle:
                    handle.seek(self._offsets.get(path, 0))
                    chunk = handle.read()
            except OSError:
                continue
            self._offsets[path] = self._offsets.get(path, 0) + len(chunk)
            lines = (self._pending.get(path, b"") + chunk).split(b"\n")
            self._pending[path] = lines.pop()  # a line still being written
            if final and self._pending[path]:
                lines.append(self._pending.pop(path))
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                self.lines.append(label + line)
                if not label:  # the launcher and the first rank speak for the run; the others' files are kept
                    self._say(line)

    def _say(self, line: str) -> None:
        if self._echo:
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                self._echo = False  # our stderr is gone (a closed terminal): the ranks never notice


# What a rank reports when a sibling died first: never the root cause while another report exists.
SECONDARY_FAILURES = (
    "Connection closed",
    "remote worker",
    "Connection reset",
    "Broken pipe",
    "SignalException",
    "KeyboardInterrupt",
    "ProcessGroupNCCL",
    "watchdog",
)


TRACEBACK_LINES = 6
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED")
OOM_ADVICE = (
    "The GPU ran out of memory: lower batch_size (raise gradient_accumulation_steps to keep the effective "
    "batch), lower maximum_sequence_length, set gradient_checkpointing=true, or use training_mode=qlora"
)


def _signal_death(tail: collections.deque) -> str | None:
    """torch's launcher names the rank that died of a signal in its closing summary ("Root Cause" first:
    the other ranks were then ended by the launcher itself)."""
    lines = list(tail)
    starts = [i for i, line in enumerate(lines) if "Root Cause" in line]
    rank = None
    for line in lines[starts[-1] :] if starts else lines:
        text = line.strip()
        if text.startswith("rank") and ":" in text:
            rank = text.split(":", 1)[1].split("(")[0].strip()
        if "Signal" in text and "received by PID" in text and rank is not None:
            signal_part = text[text.index("Signal") :].split(" received")[0]
            return f"rank {rank} was killed ({signal_part})"
    return None


def _rank_failure(folder: RunFolder, tail: collections.deque, code: int) -> str:
    """The root cause: the first report written that is not a consequence of another rank's death."""
    reports = []
    for rank, written, summary in folder.rank_errors():
        secondary = any(marker in summary for marker in SECONDARY_FAILURES)
        reports.append((secondary, written, rank, summary))
    reports.sort()
    killed = _signal_death(tail)
    if reports and not (killed and reports[0][0]):
        _, _, rank, summary = reports[0]
        # The innermost frames of its traceback (the last line repeats the summary).
        frames = [line for line in folder.rank_traceback(rank).splitlines() if line.strip()][-TRACEBACK_LINES - 1 : -1]
        message = f"rank {rank} failed: {summary}" + ("\nwhere it failed:\n" + "\n".join(frames) if frames else "")
    elif killed:
        message = killed
    else:
        last = [line for line in tail if line.strip()][-15:]
        detail = "\n".join(last)
        message = f"a training process exited with code {code}" + (f"; last output:\n{detail}" if detail else "")
    if any(marker in message or any(marker in line for line in tail) for marker in OOM_MARKERS):
        message = f"{OOM_ADVICE}. ({message})"
    return message


class Watcher:
    """Relays rank events to the host and keeps what the run's outcome needs (start, end, first step). The rows
    and lines of one pump go to the host together (`flush`): every write to a job costs this process CPU that,
    on a machine whose cores all train, the ranks would otherwise have had."""

    def __init__(self, host, folder: RunFolder, spec: RunSpec | None = None):
        self.host = host
        self.reader = folder.event_reader()
        self.spec = spec
        self.step = 0  # the last step a rank reported
        self.percent = 0
        self.last_relay = 0.0
        self.start: Started | None = None
        self.end: Done | Stopped | None = None
        self.first_step_at: float | None = None
        self._rows: list[StepRow] = []
        self._lines: list[str] = []
        # Each logged step's losses and learning rate, as this process saw them: the loss curve's points, at the
        # end of a run and at a stop alike.
        self.logged: list[dict[str, float]] = []
        self.samples: list[dict[str, str]] = []

    def _percent(self, step: int, max_steps: int) -> int:
        if max_steps > 0:
            # 100 is for the finished job alone.
            self.percent = max(self.percent, min(99, int(100 * step / max_steps)))
        return self.percent

    def _eta(self, step: int, max_steps: int) -> float | None:
        if self.start is None or step <= self.start.global_step or max_steps <= step:
            return None
        return (time.time() - self.start.at) / (step - self.start.global_step) * (max_steps - step)

    def handle(self, event: Event) -> None:
        """Take one event; what it tells the host waits for `flush`, except where order matters to the host (a
        start, a checkpoint), which flushes what came before."""
        step = getattr(event, "step", 0)
        self.step = max(self.step, step)
        if isinstance(event, Logged | Progress) and self.first_step_at is None and step > 0:
            self.first_step_at = event.at
        match event:
            case Started():
                self.flush()
                self.start = event
                resumed = f", resuming at step {event.global_step}" if event.global_step else ""
                self.host.log(
                    f"training started: {event.world_size} process(es), {event.max_steps} steps{resumed}; "
                    f"{event.trainable_parameters:,} trainable parameters ({', '.join(event.trainable_dtypes)}), "
                    f"activation checkpointing {'on' if event.checkpointing else 'off'}"
                )
            case Logged(metrics=metrics, max_steps=max_steps):
                if "loss" not in metrics and "eval_loss" not in metrics:
                    return  # the closing summary row; the final loss comes with the done event
                row = {k: metrics[k] for k in METRIC_KEYS if k in metrics}
                self.logged.append({"step": step, **{k: row[k] for k in CURVE_KEYS if k in row}})
                eta = self._eta(step, max_steps)
                if eta is not None:
                    row["eta_seconds"] = round(eta, 1)
                self._rows.append(StepRow(step, self._percent(step, max_steps), row))
                shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                self._lines.append(f"step {step}/{max_steps}: {shown}")
                self.last_relay = time.time()
            case Progress(max_steps=max_steps):
                percent = self._percent(step, max_steps)
                if not self._rows and time.time() - self.last_relay >= RELAY_INTERVAL:
                    eta = self._eta(step, max_steps)
                    self._rows.append(StepRow(step, percent, {"eta_seconds": round(eta, 1)} if eta is not None else {}))
                    self.last_relay = time.time()
            case CheckpointSaved(path=path):
                self.flush()
                self.host.log(f"checkpoint saved: step {step} ({path})")
                if self.spec is not None:
                    world = self.start.world_size if self.start else 1
                    self.host.checkpoints(checkpoints.complete(self.spec.checkpoint_dir, world))
            case Sampled(samples=answered, note=note, failed=failed):
                self.flush()
                self.samples = list(answered)
                if failed:
                    log.warning("could not generate sample answers of the trained model: %s", note)
                elif answered:
                    self.host.log(*samples.log_lines(self.samples, note))
                else:
                    self.host.log(f"sample answers of the trained model: {note}")
            case Done() | Stopped():
                self.end = event

    def flush(self) -> None:
        """What the events since the last flush tell the host: their rows in one call, their lines in one."""
        rows, lines = self._rows, self._lines
        self._rows, self._lines = [], []
        if rows:
            self.host.progress(rows)
        if lines:
            self.host.log(*lines)

    def pump(self) -> None:
        for event in self.reader.read():
            self.handle(event)
        self.flush()


class Ranks:
    """The ranks' process group, started as soon as the plan is known: they import their libraries while this
    process checks the layers, prepares the data and opens the job, then wait for the spec (`run` writes it),
    so they never see a half-prepared dataset. Ended at once (`end`) where the run ends before the spec: a
    refusal, a stop, a failure. Once `run` has them, the run's own ending decides."""

    def __init__(self, plan: Plan, folder: RunFolder, reporting: Reporting, keep_open: tuple[int, ...] = ()):
        self.plan, self.folder, self.reporting = plan, folder, reporting
        self.handed_over = False
        port = rendezvous_port(plan)
        cmd = command(folder.path, write_configs(folder, plan, port))
        log.info("launch: %s", " ".join(cmd))
        os.makedirs(folder.logs_dir, exist_ok=True)
        env = rank_env(plan, reporting, port)
        with open(folder.launcher_log, "ab") as launcher_output:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=PLUGIN_DIR,
                stdout=launcher_output,  # a file: the ranks never write into a pipe whose reader may die
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # The run lock, held by the ranks' launcher too: while ranks outlive us (saving after a stop, or
                # after this process was killed), no other run takes their outputs.
                pass_fds=tuple(keep_open),
                # Its own session: a signal to our process group reaches us alone, and we stop the ranks in order
                # (torch's launcher would otherwise SIGKILL them 30 s after forwarding the signal, mid-save).
                start_new_session=True,
            )

    def end(self) -> None:
        """End ranks that never got their spec (nothing was trained): the whole group, at once."""
        if not self.handed_over:
            _kill_group(self.proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


def run(host, spec: RunSpec, ranks: Ranks, stop: StopFlag) -> RunResult:
    """Give the started ranks their spec and watch them to the end; `host` gets progress and answers
    should_stop."""
    stop.interrupting = False  # from here on a stop is passed to the ranks, which save first
    plan, folder, proc = ranks.plan, ranks.folder, ranks.proc
    ranks.handed_over = True
    folder.write_spec(spec)
    tail = Tail(folder).start()
    watcher = Watcher(host, folder, spec)
    last_poll = 0.0
    stop_sent_at: float | None = None
    # A host that kills the whole run a few seconds after its stop signal (a task's Stop: SIGKILL 3 s after
    # SIGTERM) gets its answer first: the job is STOPPED with the newest complete checkpoint named, and this
    # process exits before the kill. The ranks go on saving (the stop file, and this process gone, say stop).
    grace = host.kill_grace_seconds()
    abandoned = False
    try:
        while proc.poll() is None:
            time.sleep(0.1 if stop.requested else 0.25)
            watcher.pump()
            now = time.time()
            if not stop.requested and now - last_poll >= STOP_POLL_INTERVAL:
                last_poll = now
                if host.should_stop():
                    stop.request()
            if stop.requested and stop_sent_at is None:
                stop_sent_at = now
                if watcher.start is None:
                    # Still importing or loading the model (minutes for a large one): no step is trained, so
                    # nothing is lost by ending the ranks now rather than after the load. Without the stop file
                    # a rank takes the signal as an end, not as a stop to save after.
                    host.log("stop requested before the first step: nothing is trained yet; ending the ranks")
                    _kill_group(proc)
                else:
                    folder.request_stop()
                    host.log("stop requested: the ranks finish the current step and save a checkpoint")
            if grace is not None and stop.signalled_at is not None and now - stop.signalled_at > grace - 1.0:
                abandoned = True
                break
            if stop_sent_at and (stop.forced or now - stop_sent_at > STOP_GRACE_SECONDS):
                _kill_group(proc)
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        if not abandoned:
            _kill_group(proc)  # whatever of the session outlived the launcher (a rank it failed to reap)
        tail.stop(timeout=0.2 if abandoned else 5)
    watcher.pump()
    if abandoned:
        raise StopRequested(watcher.step, checkpoints.latest(spec.checkpoint_dir, plan.world_size), watcher.logged)
    code = proc.returncode
    if stop.requested and (code != 0 or not isinstance(watcher.end, Done)):
        step = watcher.end.step if watcher.end is not None else watcher.step
        raise StopRequested(step, checkpoints.latest(spec.checkpoint_dir, plan.world_size), watcher.logged)
    if code != 0 or not isinstance(watcher.end, Done):
        raise RunFailed(_rank_failure(folder, tail.lines, code))
    end, start = watcher.end, watcher.start
    began = process_start()
    return RunResult(
        steps=end.step,
        max_steps=end.max_steps,
        world_size=end.world_size,
        final_loss=end.final_loss,
        eval_loss=end.eval_loss,
        runtime=end.runtime,
        loss_history=list(end.loss_history),
        logged=watcher.logged,
        samples=watcher.samples,
        startup_seconds=round(watcher.first_step_at - began, 2) if watcher.first_step_at else None,
        rank_startup={k: round(v - began, 2) for k, v in start.marks.items()} if start else {},
        resumed_from_step=start.global_step if start else 0,
        has_adapter=end.has_adapter,
        peak_gpu_memory_mib=end.peak_gpu_memory_mib,
    )


def srun_command(nodes, argv: list[str]) -> list[str]:
    """This command again, once on every node of a SLURM allocation (SLURM runs a task's command once)."""
    srun = ["srun", f"--nodes={nodes.count}", f"--ntasks={nodes.count}", "--ntasks-per-node=1"]
    return [*srun, "--kill-on-bad-exit=1", sys.executable, os.path.join(PLUGIN_DIR, "main.py"), *argv]


def run_on_every_node(nodes, argv: list[str], stop: StopFlag) -> int:
    """Start this command on every node through srun and wait for it; a stop is passed on (srun forwards
    SIGTERM to its tasks). Node 0's copy reports to the job; this process only waits."""
    cmd = srun_command(nodes, argv)
    log.info("SLURM: %s nodes; starting on each: %s", nodes.count, " ".join(cmd))
    try:
        proc = subprocess.Popen(cmd, env={**os.environ, "SFT_UNDER_SRUN": "1"}, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise RunFailed(
            f"SLURM gave this job {nodes.count} nodes but srun is not on PATH, so the run cannot start on each; "
            "load SLURM's environment in the task's setup, or run it on one node"
        ) from None
    stop.interrupting = False
    sent = False
    while proc.poll() is None:
        time.sleep(0.2)
        if stop.requested and not sent:
            sent = True
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    return proc.returncode


def linger(until: float) -> None:
    """Wait (signals and all) until `until`, the time by which the host has killed us."""
    while time.time() < until:
        with contextlib.suppress(BaseException):
            time.sleep(max(0.0, min(0.5, until - time.time())))


def _kill_group(proc: subprocess.Popen) -> None:
    """End the launcher and every rank: they share the session (and process group) we started them in."""
    try:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing of the group is left
    proc.wait()
