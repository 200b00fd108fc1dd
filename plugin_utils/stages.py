"""The run's three stages, each one call of main.py: `check` (parameters, this machine, the model's config and the
outputs: torch-free, what `--check` runs), `prepare` (the model's layers and the data, tokenized into the prepared
cache: what `--dry-run` adds) and `train` (the job, the ranks, the outputs). Each stage takes what the one before
it returned and raises InvalidConfig with every problem it found; `cli.conclude` turns how the run ended into the
job's final status and the exit code.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import checkpoints, cli, host, launch, layers, machine, outputs, params, planning, report, sources, validation
from .errors import InvalidConfig, Problem, StopRequested
from .runfolder import RunFolder, RunSpec

if TYPE_CHECKING:
    from . import data

log = logging.getLogger("sft")


@dataclass
class Checked:
    """What the check stage found: the parameters, this machine, the plan, and the outputs (None when the
    adaptor_name is unusable), with the warnings to report."""

    host: host.Host  # as this machine sees it: another node of a multi-node run reports nothing
    p: params.Params
    machine: machine.Machine
    plan: planning.Plan
    out: outputs.OutputFacts | None
    continued: outputs.Continued | None
    warnings: list[Problem]
    clock: cli.Clock
    layers_checked: bool  # the LoRA targets were checked against the layers the model's files list


@dataclass
class Ready:
    """The data prepared, and the plan with its loss mode."""

    checked: Checked
    plan: planning.Plan
    prepared: data.Prepared
    warnings: list[Problem]


def check(chosen: host.Host, nodes: machine.Nodes | None, clock: cli.Clock) -> Checked:
    """Every rule that needs no data and no torch: the parameters, this machine, the model's config.json, the
    outputs (resuming and the run lock included), and the layers where the model's files list them."""
    reading = params.read(chosen.params_from.raw_params(), headless=chosen.headless, nodes=nodes)
    p, here = reading.params, machine.detect()
    chosen = chosen.on_machine(p.machine_rank)
    # The plan first: the rules check its decisions (GPUs, precision, world size, disk) rather than make them again.
    plan = planning.build(p, here)
    out = continued = None
    if params.usable(p, reading.errors, "adaptor_name"):
        this_run = outputs.identity(p, plan.world_size, None)
        continued = chosen.places.checkpoint_to_resume(p, this_run["world_size"])
        requested = continued.checkpoint if continued else None
        out = outputs.inspect(chosen.places.locations(p), this_run, overwrite=p.overwrite_output, requested=requested)
    listed = layers.known(p.model_name)
    found = validation.check(
        validation.CHECK_PHASES + (("layers",) if listed else ()),
        prior=reading.errors,
        p=p,
        machine=here,
        model=sources.inspect_model(p.model_name),
        out=out,
        plan=plan,
        layers=listed,
    )
    warnings = reading.warnings + found.warnings
    if found.errors:
        raise InvalidConfig(found.errors, warnings)
    cli.report_warnings(warnings)
    clock.mark("validated")
    return Checked(chosen, p, here, plan, out, continued, warnings, clock, layers_checked=listed is not None)


@contextlib.contextmanager
def ranks_started(checked: Checked, stop: launch.StopFlag) -> Iterator[launch.Ranks]:
    """The ranks, started as soon as the check has passed: they import their libraries (seconds per rank) while
    this process prepares the data and opens the job, and wait for the spec. The run lock (main node) is taken
    here and handed to them, with the run folder they meet in. A run that ends before the spec (a refusal found
    in the data, a stop, a failure) ends them at once."""
    import shutil
    import tempfile  # here: --check never makes a run folder
    import uuid

    plan = checked.plan
    with contextlib.ExitStack() as stack:
        lock = ranks = None
        try:
            # A stop signal while the lock is taken, the run folder made and the ranks started is raised once
            # each has its undoing registered: else the ranks (a session of their own, which no signal to the run
            # reaches) would run on holding the lock, or the outputs keep the lock's folders.
            with stop.deferred():
                if plan.machine_rank == 0:
                    lock = stack.enter_context(outputs.RunLock(checked.out.where.lock_path))
                where = os.path.join(tempfile.gettempdir(), f"sft-run-{uuid.uuid4().hex[:12]}")
                stack.callback(shutil.rmtree, where, ignore_errors=True)
                os.mkdir(where, 0o700)
                reporting = launch.reporting(checked.p, checked.out.where.run_dir)
                keep_open = (lock.fileno(),) if lock else ()
                ranks = launch.Ranks(plan, RunFolder(where), reporting, keep_open=keep_open)
                stack.callback(ranks.end)
            yield ranks
        except BaseException:
            if lock and not (ranks and ranks.handed_over):
                lock.discard()  # nothing was trained: the outputs stay as they were
            raise


def prepare(checked: Checked, *, preview: int, stop: launch.StopFlag) -> Ready:
    """What only the model's modules and the data can show, reported together: LoRA targets that name no layer, an
    architecture that is no causal LM, bad rows and columns; then the rows tokenized into the prepared cache, and
    the rules over their statistics."""
    from . import data  # the data code, its Jinja and Arrow: not for `--check`

    p, plan = checked.p, checked.plan
    data.import_libraries()
    # Layers the check could not list (no safetensors headers of a known family, nothing kept): built here.
    described = None if checked.layers_checked else layers.describe(p.model_name)
    found = validation.check(("layers",) if described else (), p=p, plan=plan, layers=described)
    try:
        dataset = data.load(p.data)
    except InvalidConfig as exc:
        raise InvalidConfig(found.errors + exc.errors, found.warnings + exc.warnings) from None
    found.add(validation.check(("data",), p=p, out=checked.out, data=dataset.facts()))
    found.raise_errors()
    plan = plan.with_loss_mode(p, dataset.format)
    stop.guard_forks()
    prepared = data.prepare(p.data, dataset, plan.completion_only, preview=preview, stopping=lambda: stop.requested)
    found.add(validation.check(("statistics",), p=p, plan=plan, stats=prepared.stats))
    found.raise_errors()
    cli.report_warnings(found.warnings)
    checked.clock.mark("data_prepared")
    return Ready(checked, plan, prepared, checked.warnings + found.warnings)


def dry_run(ready: Ready) -> cli.Finished:
    """What `--dry-run` shows: the dataset's statistics and the first rows with what is trained in them."""
    cli.report_dataset(ready.prepared)
    return cli.Finished(cli.dry_run_report(ready.warnings, ready.prepared))


def train(ready: Ready, ranks: launch.Ranks, stop: launch.StopFlag) -> cli.Finished:
    """Open the job, give the started ranks the prepared data and watch them to the end, then publish the
    outputs."""
    checked, plan, prepared, p = ready.checked, ready.plan, ready.prepared, ready.checked.p
    chosen, out = checked.host, checked.out
    job = chosen.sink
    job.start(p)
    job.log(cli.parameters_text(p))
    job.log(cli.dataset_text(prepared))  # to the job's log and, like every host log line, to stderr
    job.log(cli.plan_text(plan))
    if p.reporters:
        job.log(*launch.reporting_lines(p.reporters, ranks.reporting, os.environ))  # one write to the job's log
    if checked.continued:
        job.log(cli.continued_text(checked.continued))
    main_node = plan.machine_rank == 0
    if main_node:
        close_left_open_jobs(chosen, p, job)
    session = outputs.RunSession(
        out,
        job.job_id,
        p.adaptor_name,
        merged=chosen.places.merged_location(p) if plan.merge_adapter else None,
        main_node=main_node,
        identity=outputs.identity(p, plan.world_size, prepared.key, plan.as_dict()),
        folder=ranks.folder,
    )
    with session:
        spec = RunSpec.of(
            p,
            plan,
            session.folder,
            prepared_path=prepared.path,
            has_eval=prepared.stats.eval_rows > 0,
            checkpoint_dir=out.checkpoint_dir,
            checkpoint_staging=out.where.saving_dir,
            resume_from=session.resume_from,
            adapter_staging=session.staged.adapter_staging,
            merged_staging=session.staged.merged_staging,
            reporting=ranks.reporting,
        )
        try:
            result = launch.run(job, spec, ranks, stop)
        except StopRequested as stopped:
            stopped.leave = functools.partial(keep_loss_curve, job, out.where, stopped.logged, session.resume_from)
            raise
        curve = keep_loss_curve(job, out.where, result.logged, session.resume_from)
        summary = outputs.summary(p, plan, result, prepared.stats, checked.clock.marks)
        final = None
        if result.has_adapter:
            session.staged.describe(summary, curve, result.samples)
            session.staged.keep_samples(result.samples)
            final = session.staged.publish(job, p, summary)
            if result.samples:
                job.samples(result.samples)
        session.finished()
    plot = outputs.write_plot(out.where.plot_path, result.loss_history)
    answer = {
        "status": "COMPLETE",
        "job_id": job.job_id or None,
        "adaptor_path": final,
        "steps": result.steps,
        "final_loss": result.final_loss,
    }
    return cli.Finished(answer, (outputs.completion_message(result, final), outputs.score(result), plot))


def keep_loss_curve(job: host.Sink, where: outputs.Where, logged: list[dict], resumed: str | None) -> str | None:
    """The loss curve, finished or stopped, in the run's folder (beside loss_plot.json) and among a lab SDK job's
    artifacts: of the whole run, the steps before a resume (read from the checkpoint `resumed`) included. A
    picture that cannot be drawn is a warning: the run's outputs matter more."""
    first = min((row["step"] for row in logged), default=math.inf)
    points = [row for row in report.earlier_points(resumed) if row["step"] < first] + logged
    try:
        curve = report.draw_loss_curve(points, os.path.join(where.run_dir, report.CURVE_FILE))
    except Exception as exc:
        log.warning("could not draw the loss curve: %s", exc)
        return None
    if curve:
        job.log(f"loss curve: {curve} (steps {points[0]['step']} to {points[-1]['step']})")
        job.artifact(curve)
    return curve


def close_left_open_jobs(chosen: host.Host, p, job: host.Sink) -> None:
    """Jobs an earlier run left open when its process died (killed, out of memory, the machine gone) are ended
    here, STOPPED when its ranks saved a checkpoint, else FAILED, with the reason: the job list never shows a dead
    run as running, or (the 0.31/0.32 host) as a success."""
    held = chosen.places.locations(p).lock_path  # this run's own lock, taken when its ranks started
    for left in outputs.left_behind(chosen.places.earlier_runs(p), job.job_id, held):
        try:
            closed = job.close_left_open(left.job_id, left.status, left.message(job.job_id))
        except Exception as exc:  # another job's state: worth a warning, never this run
            log.warning("could not close job %s, which a dead process left open: %s", left.job_id, exc)
            continue
        if closed:
            log.warning(
                "job %s was left open by a process that died; marked %s%s",
                left.job_id,
                left.status,
                f" (it saved a checkpoint at step {checkpoints.step_of(left.checkpoint)})" if left.checkpoint else "",
            )
