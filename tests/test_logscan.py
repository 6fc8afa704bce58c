"""The end-of-run summary of warnings (cldf.logscan), on log files written here."""

from __future__ import annotations

import os
from pathlib import Path

from cldf.logscan import run_warnings

WARNING = "2026-12-07 14:35:23,146 cldf.choose WARNING map dig: its best validation Dice (0.093) is below"


def test_only_cldf_warnings_of_logs_written_since_the_run_started_are_gathered(tmp_path: Path) -> None:
    old = tmp_path / "logs" / "ds" / "old.log"
    new = tmp_path / "logs" / "ds" / "choices" / "maps.log"
    new.parent.mkdir(parents=True)
    old.write_text(WARNING + "\n")
    os.utime(old, (1_000_000, 1_000_000))  # a previous run's log
    new.write_text("dig:  50%|#####     | 1/2 [00:01<00:01]\r" + WARNING + "\r"
                   "2026-12-07 14:35:24,000 cldf INFO nothing to see\n"
                   "/x/torch/nn.py:1: UserWarning: a library's warning\n"
                   "2026-12-07 14:35:25,000 cldf WARNING the validation split has no positive slice\n")
    found = run_warnings(tmp_path / "logs", since=2_000_000)
    assert found == [f"{new}: {WARNING}",
                     f"{new}: 2026-12-07 14:35:25,000 cldf WARNING the validation split has no positive slice"]
    assert len(run_warnings(tmp_path / "logs", since=0)) == 3
    assert run_warnings(tmp_path / "absent", since=0) == []
