"""SFT trainer plugin for TransformerLab, built on TRL.

The pipeline: host -> parameters -> validation -> data preparation -> launch -> report.
Started three ways (TransformerLab's plugin harness, the lab SDK with _TFL_JOB_ID, or headless
`python main.py --config run.json`); importing this module starts nothing.
"""

from __future__ import annotations

import signal
import sys
import tempfile

from plugin_utils import cli, data, host, launch, machine, outputs, params, rules


def run(args, outcome: cli.Outcome) -> None:
    outcome.stop = stop = launch.StopFlag()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop.on_signal)

    clock = cli.Clock()
    outcome.host = job = host.choose(args)
    p, outcome.warnings, errors = params.resolve_all(job.raw_params(), headless=job.headless)
    locations = job.locations(p) if params.usable(p, errors, "adaptor_name") else None
    plan = rules.check(p, machine.detect(), outcome.warnings, locations, prior=errors)
    adapter_dir, checkpoint_dir = locations  # check() passed, so the name was usable
    p = plan.settled(p)  # `auto` speed switches become what this run does
    cli.report_warnings(outcome.warnings)
    clock.mark("validated")
    if args.check:
        return cli.emit_json(args.json, cli.check_report(outcome.warnings, plan))

    prepared = data.prepare(p, preview=args.preview)
    cli.report_warnings(rules.check_data(p, plan, prepared.stats, outcome.warnings))
    clock.mark("data_prepared")
    if args.dry_run:
        cli.report_dataset(prepared)
        return cli.emit_json(args.json, cli.dry_run_report(outcome.warnings, prepared))

    job.start(p)
    job.log(cli.dataset_text(prepared))  # to the job's log and, like every host log line, to stderr
    job.log(cli.speed_text(plan))
    identity = outputs.run_identity(p, plan.num_processes * p["num_machines"], prepared.key)
    staged = outputs.Staged(adapter_dir, job.merged_location(p) if p["fuse_model"] else None)
    with outputs.RunLock(checkpoint_dir), staged, tempfile.TemporaryDirectory(prefix="sft-run-") as run_dir:
        resume = outputs.resume_point(
            adapter_dir, checkpoint_dir, identity, overwrite=p["overwrite_output"], requested=job.checkpoint_to_resume()
        )
        outputs.record_run(checkpoint_dir, identity)
        spec = {
            "params": p,
            "plan": plan.as_dict(),
            "prepared_path": prepared.path,
            "resume_from": resume,
            "checkpoint_dir": checkpoint_dir,
            **staged.spec(),
        }
        result = launch.run(job, p, plan, spec, run_dir, stop)
        final = (
            staged.publish(job, p, outputs.summary(p, plan, result, prepared.stats, clock.marks))
            if result.has_adapter
            else None
        )
    plot = outputs.write_plot(f"{checkpoint_dir}/loss_plot.json", result.loss_history)
    job.complete(outputs.completion_message(result, final), outputs.score(result), plot)
    outcome.result = {
        "status": "COMPLETE",
        "job_id": job.job_id or None,
        "adaptor_path": final,
        "steps": result.steps,
        "final_loss": result.final_loss,
    }
    cli.emit_json(args.json, outcome.result)


def main(argv: list[str] | None = None) -> None:
    cli.setup_logging()
    args = cli.parse(argv)
    outcome = cli.Outcome(args)
    try:
        run(args, outcome)
        error = None
    except SystemExit:
        raise
    except BaseException as exc:  # every outcome, a stop included, is reported the same way
        error = exc
    code = outcome.finish(error)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
