"""SFT trainer plugin for TransformerLab, built on TRL.

The pipeline: host -> parameters -> validation -> plan -> data preparation -> launch -> report.
Started three ways (TransformerLab's plugin harness, the lab SDK with _TFL_JOB_ID, or headless
`python main.py --config run.json`); importing this module starts nothing.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tempfile

from plugin_utils import (
    checkpoints,
    cli,
    data,
    host,
    launch,
    layers,
    machine,
    outputs,
    params,
    planning,
    sources,
    validation,
)
from plugin_utils.errors import InvalidConfig
from plugin_utils.runfolder import RunFolder, RunSpec

log = logging.getLogger("sft")


def run(args, chosen: host.Host, stop: launch.StopFlag, nodes: machine.Nodes | None = None) -> cli.Finished:
    """The pipeline. Returns how it finished; anything that ends it early is raised."""
    clock = cli.Clock()
    reading = params.read(chosen.source.raw_params(), headless=chosen.headless, nodes=nodes)
    p, here = reading.params, machine.detect()
    if p["machine_rank"] > 0:
        chosen.sink = host.OtherNode(chosen.sink)  # the main node alone reports to the job
    out = continued = None
    if params.usable(p, reading.errors, "adaptor_name"):
        where = chosen.places.locations(p)
        this_run = outputs.identity(p, planning.world_size(p, here), None)
        continued = chosen.places.checkpoint_to_resume(p, this_run["world_size"])
        requested = continued.checkpoint if continued else None
        out = outputs.inspect(where, this_run, overwrite=p["overwrite_output"], requested=requested)
    found = validation.check(
        validation.CHECK_PHASES,
        prior=reading.errors,
        p=p,
        machine=here,
        model=sources.inspect_model(p["model_name"]),
        out=out,
    )
    warnings = reading.warnings + found.warnings
    if found.errors:
        raise InvalidConfig(found.errors, warnings)
    plan = planning.build(p, here)
    cli.report_warnings(warnings)
    clock.mark("validated")
    if args.check:
        return cli.Finished(cli.check_report(warnings, plan))

    # What only the loaded model would reveal, from its config on the meta device: wrong LoRA targets, an
    # architecture that is no causal LM. Reported with the data's problems, all at once.
    found = validation.check(("layers",), p=p, plan=plan, layers=layers.describe(p["model_name"]))
    try:
        dataset = data.load(p)
    except InvalidConfig as exc:
        raise InvalidConfig(found.errors + exc.errors, found.warnings + exc.warnings) from None
    found.add(validation.check(("data",), p=p, out=out, data=dataset.facts()))
    found.raise_errors()
    plan = plan.with_loss_mode(p, dataset.format)
    stop.guard_forks()
    prepared = data.prepare(p, dataset, plan.completion_only, preview=args.preview, stopping=lambda: stop.requested)
    found.add(validation.check(("statistics",), p=p, plan=plan, stats=prepared.stats))
    found.raise_errors()
    cli.report_warnings(found.warnings)
    warnings += found.warnings
    clock.mark("data_prepared")
    if args.dry_run:
        cli.report_dataset(prepared)
        return cli.Finished(cli.dry_run_report(warnings, prepared))

    job = chosen.sink
    job.start(p)
    job.log(cli.parameters_text(p))
    job.log(cli.dataset_text(prepared))  # to the job's log and, like every host log line, to stderr
    job.log(cli.plan_text(plan))
    if continued:
        job.log(cli.continued_text(continued))
    main_node = plan.machine_rank == 0  # the other nodes of a multi-node run write beside it, under its lock
    if main_node:
        close_left_open_jobs(chosen, p, job)
    this_run = outputs.identity(p, plan.world_size, prepared.key, plan.as_dict())
    merged = chosen.places.merged_location(p) if plan.merge_adapter else None
    staged = outputs.Staged(out.adapter_dir, merged)
    lock = outputs.RunLock(out.where.lock_path) if main_node else contextlib.nullcontext()
    with lock, staged, tempfile.TemporaryDirectory(prefix="sft-run-") as run_dir:
        resume = outputs.prepare_checkpoints(out)
        if main_node:
            outputs.write_record(out.where, p["adaptor_name"], job.job_id, finished=False)
        folder = RunFolder(run_dir)
        folder.write_identity(this_run)
        spec = RunSpec.of(
            p,
            plan,
            folder,
            prepared_path=prepared.path,
            has_eval=prepared.stats["eval_rows"] > 0,
            checkpoint_dir=out.checkpoint_dir,
            checkpoint_staging=out.where.saving_dir,
            resume_from=resume,
            adapter_staging=staged.adapter_staging,
            merged_staging=staged.merged_staging,
        )
        held = (lock.fileno(),) if main_node else ()
        result = launch.run(job, spec, plan, folder, stop, keep_open=held)
        summary = outputs.summary(p, plan, result, prepared.stats, clock.marks)
        final = staged.publish(job, p, summary) if result.has_adapter else None
        if main_node:
            outputs.write_record(out.where, p["adaptor_name"], job.job_id, finished=True)
    plot = outputs.write_plot(out.where.plot_path, result.loss_history)
    report = {
        "status": "COMPLETE",
        "job_id": job.job_id or None,
        "adaptor_path": final,
        "steps": result.steps,
        "final_loss": result.final_loss,
    }
    return cli.Finished(report, (outputs.completion_message(result, final), outputs.score(result), plot))


def close_left_open_jobs(chosen: host.Host, p, job: host.NullSink) -> None:
    """Jobs an earlier run left open when its process died (killed, out of memory, the machine gone) are ended
    here, STOPPED when its ranks saved a checkpoint, else FAILED, with the reason: the job list never shows a dead
    run as running, or (the 0.31/0.32 host) as a success."""
    for left in outputs.left_behind(chosen.places.earlier_runs(p), job.job_id):
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


def main(argv: list[str] | None = None) -> None:
    cli.setup_logging()
    args = cli.parse(argv)
    stop = launch.StopFlag()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop.on_signal)
    chosen = finished = error = None
    try:
        cli.check_flags(args)
        nodes = machine.nodes_from_env()
        chosen = host.choose(args, nodes)
        if nodes and nodes.needs_srun and not (args.check or args.dry_run):
            sys.exit(launch.run_on_every_node(nodes, sys.argv[1:] if argv is None else argv, stop))
        finished = run(args, chosen, stop, nodes)
    except SystemExit:
        raise
    except BaseException as exc:  # every ending, a stop included, is concluded in one place
        error = exc
    # Until a real run has a host, nothing can touch a job: --check and --dry-run never do.
    sink = chosen.sink if chosen is not None and not (args.check or args.dry_run) else host.NullSink()
    code = cli.conclude(sink, args.json, finished, error, stop)
    grace = sink.kill_grace_seconds()
    if finished is None and stop.signalled_at is not None and grace is not None:
        # A task's Stop signals the shell that runs us too, which dies of it; the task's trap then marks the job
        # FAILED as soon as our output ends. The trap itself is killed `grace` seconds after the signal: keep our
        # output open until then, and the job stays STOPPED.
        launch.linger(until=stop.signalled_at + grace + 2.0)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
