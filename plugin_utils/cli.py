"""The edge: command-line flags, logging, the reports, and `conclude()`: the one place that turns how the run
ended into the job's final status, the last JSON line and the exit code (README, "Run it headless")."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from . import checkpoints
from .errors import EXIT_FAILED, EXIT_INVALID, EXIT_OK, InvalidConfig, Problem, RunFailed, StopRequested, problem
from .runfolder import process_start

log = logging.getLogger("sft")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="main.py", description="SFT trainer (TRL) for TransformerLab")
    parser.add_argument("--config", help="JSON file of parameter values (headless run)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one parameter (repeatable)")
    parser.add_argument("--experiment", default=None, help="experiment of the job a headless run creates")
    parser.add_argument("--check", action="store_true", help="check parameters and this machine; read no data")
    parser.add_argument("--dry-run", action="store_true", help="also prepare the data and preview it; train nothing")
    parser.add_argument("--preview", type=int, default=3, help="rows to preview with --dry-run")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object")
    # Given by TransformerLab's plugin harness.
    parser.add_argument("--input_file", help=argparse.SUPPRESS)
    parser.add_argument("--plugin_dir", help=argparse.SUPPRESS)
    parser.add_argument("--experiment_name", help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    # Checked by check_flags() where an unknown flag becomes a clean error (exit 2), not here.
    args.unknown = unknown
    args.known_flags = sorted(
        option for action in parser._actions for option in action.option_strings if action.help != argparse.SUPPRESS
    )
    return args


def check_flags(args: argparse.Namespace) -> None:
    """An unknown flag is an error naming the flag it resembles when the plugin is run by hand (`--dry_run` or
    `--chek` would otherwise start a real run); under TransformerLab's harness, which passes flags of its own,
    it is ignored."""
    if args.input_file or not args.unknown:
        return
    problems = []
    for given in args.unknown:
        flag = given.split("=", 1)[0]
        if not flag.startswith("-"):
            problems.append(problem(given, "unexpected argument", "Give parameters in the --config file or with --set"))
            continue
        spelled = "--" + flag.lstrip("-").replace("_", "-")
        close = (
            [spelled] if spelled in args.known_flags else difflib.get_close_matches(spelled, args.known_flags, 1, 0.6)
        )
        fix = f"Did you mean {close[0]}?" if close else f"Known flags: {', '.join(args.known_flags)}"
        problems.append(problem(flag, "unknown flag", fix))
    raise InvalidConfig(problems)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[sft] %(message)s"))
    logger = logging.getLogger("sft")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def emit_json(enabled: bool, payload: dict[str, Any]) -> None:
    if enabled:
        sys.stdout.flush()
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
        sys.stdout.flush()


def report_warnings(warnings: list[Problem]) -> None:
    for w in warnings:
        log.warning("warning: %s", w.line())


class Clock:
    """Seconds since this process started, at each stage: the start-up breakdown in training_summary.json."""

    def __init__(self) -> None:
        self.started = process_start()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        import time

        self.marks[name] = round(time.time() - self.started, 2)


def check_report(warnings: list[Problem], plan) -> dict[str, Any]:
    return {"ok": True, "errors": [], "warnings": [w.as_dict() for w in warnings], "plan": plan.as_dict()}


def dataset_text(prepared) -> str:
    s = prepared.stats
    lines = [
        f"dataset: format {s.format}, {s.rows} rows, {s.rows_used} used, {s.dropped} dropped, "
        f"{s.truncated} truncated, {s.eval_rows} eval rows; "
        f"{s.trainable_tokens} trainable of {s.total_tokens} tokens"
        + (" (prepared earlier, reused)" if prepared.cached else "")
    ]
    if prepared.marked:
        lines.append("preview (the loss is taken on the parts between ⟦ and ⟧):")
    for i, text in enumerate(prepared.marked):
        lines.append(f"--- row {i} ---\n{text}")
        pieces = prepared.samples[i]["trained_tokens"] if i < len(prepared.samples) else []
        if pieces:
            # The tokenizer's own pieces: a stray leading space or a role marker cannot hide here.
            shown = " ".join(repr(piece) for piece in pieces[:32]) + (" ..." if len(pieces) > 32 else "")
            lines.append(f"trained tokens ({len(pieces)}): {shown}")
    return "\n".join(lines)


def parameters_text(p) -> str:
    """The parameters this run uses, as asked with the defaults filled in: what a sweep's child ran with."""
    values = p.as_dict()
    return "\n".join(
        ["parameters:", *(f"  {name}: {json.dumps(values[name], default=str)}" for name in sorted(values))]
    )


def continued_text(continued) -> str:
    job = f"job {continued.job_id}" if continued.job_id else "an earlier run"
    return f"continuing {job} from step {continued.step} ({continued.checkpoint})"


def plan_text(plan) -> str:
    return "\n".join(["plan:", *(f"  {why}" for why in plan.all_reasons())])


def report_dataset(prepared) -> None:
    log.info("%s", dataset_text(prepared))


def dry_run_report(warnings: list[Problem], prepared) -> dict[str, Any]:
    keys = ("format", "rows", "rows_used", "dropped", "truncated", "trainable_tokens", "total_tokens", "eval_rows")
    return {
        "ok": True,
        "errors": [],
        "warnings": [w.as_dict() for w in warnings],
        "dataset": {k: getattr(prepared.stats, k) for k in keys},
        "samples": prepared.samples,
    }


@dataclass(frozen=True)
class Finished:
    """A pipeline that ran to its end: a check, a dry run, or a completed training run."""

    report: dict[str, Any]  # the --json payload
    # (message, score, plot path) for the job of a completed training run; None for a check or a dry run.
    completion: tuple[str, dict[str, float], str | None] | None = None


def conclude(sink, json_on: bool, finished: Finished | None, error: BaseException | None, stop=None) -> int:
    """The job's final status, the last JSON line and the exit code, from how the run ended: finished, or the
    exception that ended it. `sink` is a NullSink for --check and --dry-run, so they never touch a job."""
    if finished is not None:
        if finished.completion is not None:
            try:
                sink.complete(*finished.completion)
            except Exception as exc:  # the host refused the result: that is a failure like any other
                return conclude(sink, json_on, None, exc, stop)
        emit_json(json_on, finished.report)
        return EXIT_OK
    if stop is not None and stop.requested and stop.interrupting:
        # A stop before the ranks trained interrupts whatever ran (a worker pool may break first).
        error = StopRequested()
    job_id = sink.job_id or None
    if isinstance(error, InvalidConfig):
        lines = [p.line() for p in error.errors]
        for line in lines:
            log.error("error: %s", line)
        report_warnings(error.warnings)
        _safely(lambda: sink.fail("Invalid configuration:\n" + "\n".join(lines)))
        errors = [p.as_dict() for p in error.errors]
        emit_json(json_on, {"ok": False, "errors": errors, "warnings": [p.as_dict() for p in error.warnings]})
        return EXIT_INVALID
    if isinstance(error, StopRequested | KeyboardInterrupt):
        step, checkpoint = (error.step, error.checkpoint) if isinstance(error, StopRequested) else (0, None)
        message = stop_message(step, checkpoint)
        log.warning("%s", message)
        _safely(lambda: sink.stopped(message))
        if isinstance(error, StopRequested) and error.leave is not None:
            _safely(error.leave)
        emit_json(
            json_on, {"status": "STOPPED", "job_id": job_id, "adaptor_path": None, "steps": step, "final_loss": None}
        )
        # Under a task host any other exit than 0 counts as a crash: there the job is STOPPED and we exit 0.
        return sink.stopped_exit_code
    if isinstance(error, RunFailed):
        message = str(error)
    else:
        message = f"{type(error).__name__}: {error}"
        # Called after the except block has ended: format the exception itself, not "the current" one.
        log.error("%s", "".join(traceback.format_exception(error)).rstrip())
    log.error("training failed: %s", message)
    _safely(lambda: sink.fail(message))
    report = {"status": "FAILED", "job_id": job_id, "adaptor_path": None, "steps": None, "final_loss": None}
    emit_json(json_on, {**report, "error": message})
    return EXIT_FAILED


def stop_message(step: int, checkpoint: str | None) -> str:
    """What a stopped run says: where it stopped, and what the next run continues from."""
    text = "Stopped on request" + (f" at step {step}" if step else " before the first training step")
    if checkpoint:
        saved = checkpoints.step_of(checkpoint)
        return (
            f"{text}; the newest complete checkpoint is step {saved} ({checkpoint}): run again with the same "
            "adaptor_name to continue from it"
        )
    return f"{text}; no checkpoint was saved"


def _safely(action) -> None:
    try:
        action()
    except Exception as exc:  # the host being unreachable must not hide the original failure
        log.error("could not update the job: %s", exc)
