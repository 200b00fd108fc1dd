"""A training rank's entry point: `python -m plugin_utils.rank RUN_DIR`, once per process.

Before any library is imported, the rank's output goes to its own file in the run folder (`logs/rank-N.log`,
N its rank on this node), which the parent tails: never a pipe the parent owns, so a rank outlives a parent
that dies (killed, out of memory, its terminal closed) and still saves. Libraries speak once: progress bars
are off (the parent logs one line per logged step), and the ranks but the first keep only errors. Then
`worker.main` trains.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import ModuleType

from .runfolder import RunFolder
from .sources import collector_off

LIBRARY_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",)


def own_output(run_dir: str) -> None:
    folder = RunFolder(run_dir)
    local_rank = int(os.environ.get("LOCAL_RANK") or 0)
    os.makedirs(folder.logs_dir, exist_ok=True)
    fd = os.open(folder.rank_log(local_rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)  # at the descriptor level: C libraries and child processes write there too
    os.dup2(fd, 2)
    os.close(fd)
    quiet = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    # Deprecations between the pinned libraries themselves (TRL calling a renamed transformers API): nothing a
    # user can act on.
    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    if int(os.environ.get("RANK") or 0) != 0:
        # The first rank already says whatever every rank would repeat.
        quiet.update(TRANSFORMERS_VERBOSITY="error", DATASETS_VERBOSITY="error", PYTHONWARNINGS="ignore")
        warnings.simplefilter("ignore")
    os.environ.update(quiet)


def import_libraries(logs_to_wandb: bool) -> ModuleType:
    """The worker and the libraries it trains with, imported with the garbage collector off
    (sources.collector_off), and without Weights & Biases unless the run logs to it.

    transformers and TRL import wandb wherever it is installed (the lab SDK installs it), only to learn that it
    is, and wandb brings click, trackio and more: about a second of CPU per rank on 2 cores. A run that does not
    log to W&B marks it absent the way Python's import system provides (None in sys.modules): every
    "is it installed" check then answers no, and nothing imports it."""
    if not logs_to_wandb:
        sys.modules.setdefault("wandb", None)
    with collector_off():
        from . import worker

        worker.import_libraries()
    return worker


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    own_output(args[0])
    # Started before the spec is written (the parent prepares the data meanwhile): what the imports depend on
    # comes in the environment.
    return import_libraries(os.environ.get("SFT_LOG_TO_WANDB") == "1").main(args)


if __name__ == "__main__":
    sys.exit(main())
