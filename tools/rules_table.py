"""Write validation's rule list into info.md's rules table (a test fails while they differ):
`.venv/bin/python tools/rules_table.py`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plugin_utils.validation import table  # noqa: E402

HEADER = "| checked against | rule |"


def main() -> None:
    info = ROOT / "info.md"
    text = info.read_text()
    start = text.index(HEADER)
    end = text.index("\n\n", start)
    info.write_text(text[:start] + table() + text[end:])


if __name__ == "__main__":
    main()
