"""One benchmark job in a fresh interpreter: the script runs again with `--worker JOB.json`,
its output appended to the benchmark's log, and the job's result JSON read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_worker(script: str, job_path: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run `script --worker job_path` with `env`; the job file names its `result` file."""
    job = json.loads(job_path.read_text())
    with log.open("a") as handle:
        handle.write(f"\n===== {job_path.stem}\n")
        handle.flush()
        done = subprocess.run(
            [sys.executable, script, "--worker", str(job_path)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"{job_path.stem} failed (exit {done.returncode}); see {log}")
    return json.loads(Path(job["result"]).read_text())
