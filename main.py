"""SFT trainer plugin for TransformerLab, built on TRL.

The pipeline: the host, then three stages (plugin_utils/stages.py): check (parameters, this machine, the model's
config, the outputs), prepare (the model's layers and the data, while the ranks, started once the check passes,
import their libraries) and train (the job, the ranks' spec, the outputs);
`--check` stops after the first, `--dry-run` after the second, and `cli.conclude` turns how the run ended into
the job's status and the exit code. Started three ways (TransformerLab's plugin harness, the lab SDK with
_TFL_JOB_ID, or headless `python main.py --config run.json`); importing this module starts nothing.
"""

from __future__ import annotations

import signal
import sys

from plugin_utils import cli, host, launch, machine, stages


def main(argv: list[str] | None = None) -> None:
    cli.setup_logging()
    args = cli.parse(argv)
    stop = launch.StopFlag()
    for sig in launch.PARENT_STOP_SIGNALS:
        signal.signal(sig, stop.on_signal)
    chosen = finished = error = None
    try:
        cli.check_flags(args)
        nodes = machine.nodes_from_env()
        chosen = host.choose(args, nodes)
        if nodes and nodes.needs_srun and not (args.check or args.dry_run):
            sys.exit(launch.run_on_every_node(nodes, sys.argv[1:] if argv is None else argv, stop))
        checked = stages.check(chosen, nodes, cli.Clock())
        chosen = checked.host  # as this machine sees it: another node of a multi-node run reports nothing
        if args.check:
            finished = cli.Finished(cli.check_report(checked.warnings, checked.plan))
        elif args.dry_run:
            finished = stages.dry_run(stages.prepare(checked, preview=args.preview, stop=stop))
        else:
            with stages.ranks_started(checked, stop) as ranks:  # importing while the data is prepared
                ready = stages.prepare(checked, preview=args.preview, stop=stop)
                finished = stages.train(ready, ranks, stop)
    except SystemExit:
        raise
    except BaseException as exc:  # every ending, a stop included, is concluded in one place
        error = exc
    stop.settle()  # a stop signal from here on would only cut the report of how the run ended short
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
