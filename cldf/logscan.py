"""The warnings of one workflow run, gathered from its jobs' logs so the end of the run can show them.

Each job writes its log under ``{results}/logs`` (``cldf.catalogue.Catalogue.log``); a warning there (a map
that localises nothing, a split without positive slices) is easy to miss among thousands of lines of
Snakemake output, so the workflow's ``onsuccess`` handler prints those of the logs this run wrote.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MARK = re.compile(r" cldf(\.\w+)* WARNING ")
"""A warning line of cldf's loggers (format ``asctime name levelname message``, as ``cldf.cli`` sets it)."""


def run_warnings(log_root: str | os.PathLike, since: float) -> list[str]:
    """Warning lines of cldf in the ``*.log`` files under ``log_root`` modified at or after ``since`` (seconds
    since the epoch), as ``"<log path>: <line>"``, logs in path order. Progress bars' carriage returns end
    lines too; a missing ``log_root`` has none."""
    found: list[str] = []
    for log in sorted(Path(log_root).rglob("*.log")):
        try:
            if log.stat().st_mtime < since:
                continue
            text = log.read_text(errors="replace")
        except OSError:  # removed by a concurrent job since the listing
            continue
        found += [f"{log}: {line.strip()}" for line in re.split(r"[\r\n]", text) if MARK.search(line)]
    return found
