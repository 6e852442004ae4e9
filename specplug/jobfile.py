"""`python -m <engine module> JOB.json RESULT.json`: the engine-subprocess protocol the vLLM and
SGLang integrations share (one engine per process; results written atomically)."""
from __future__ import annotations

import json
import os
import sys
from typing import Callable


def run_job_files(argv: list[str] | None, module: str, run_job: Callable[[dict], dict],
                  before: Callable[[], None] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(f"usage: python -m {module} JOB.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    if before:
        before()
    result = run_job(job)
    with open(argv[1] + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(argv[1] + ".tmp", argv[1])
    return 0
