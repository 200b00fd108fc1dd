"""Data preparation, done once in the parent while the ranks import their libraries (they wait for its result).

Rows are loaded (`loading`), their format found (`formats`), templates applied and everything tokenized into
`input_ids` plus `labels` (-100 where no loss is taken) and truncated (`encoding`), then saved with `save_to_disk`
into a cache (`prepared_cache`) keyed by everything that affects the result (`keys`); `prepare` runs the steps.
Ranks memory-map that folder and never template or tokenize.
"""

from .prepare import LoadedDataset, Prepared, PreparedStats, import_libraries, load, prepare

__all__ = ["LoadedDataset", "Prepared", "PreparedStats", "import_libraries", "load", "prepare"]
