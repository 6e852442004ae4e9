"""Tests-only, run in the SGLang venv: generate jobs (integrations/sglang/generate.py), one engine
after another in this process, whose schedulers record what specplug's EAGLE drafters were handed.

SGLang starts its scheduler with multiprocessing's spawn, which imports this script again in
the child as __mp_main__: the patch below runs at import, so it is in place in the process where
the worker drafts.  Every DraftInput row's hidden_states / hidden_start is kept per row id with
the row's committed tokens at its last call, saved to $SPECPLUG_TEST_FEATURES/<pid>.pt after
every call (the scheduler is killed at shutdown, so nothing waits for exit).  Drafts are unchanged.
Each job's scheduler gets FEATURES_DIR/<job name> (set before its engine spawns it).

A job with "test_widths" (e.g. "4,0,1,0,2") runs with the speculation budget's choice replaced
by that cycle of widths (StepBudget.begin patched the same way), so the worker's narrow verify
steps, root-only ones included, are certain to run.

usage: python record_features.py JOBS.json RESULTS.json FEATURES_DIR
  JOBS.json {"jobs": {name: job}} -> RESULTS.json {"results": {name: result}}
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from feature_records import record_draft_input  # noqa: E402

from specplug.budget import StepBudget  # noqa: E402
from specplug.drafters import eagle_runtime  # noqa: E402

_RECORDS: dict[int, dict] = {}  # row id -> {"chunks": [(start, [n, F])], "tokens": [...]}
_PROPOSE = eagle_runtime.EagleDrafter.propose


def _recording(self, inp):
    record_draft_input(_RECORDS, inp)
    torch.save(_RECORDS, os.path.join(os.environ["SPECPLUG_TEST_FEATURES"], f"{os.getpid()}.pt"))
    return _PROPOSE(self, inp)


eagle_runtime.EagleDrafter.propose = _recording
_BEGIN = StepBudget.begin


def _scripted_begin(self, row_ids, committed, scored=False, backlog=None):
    """The budget's own bookkeeping, then the next width of SPECPLUG_TEST_WIDTHS for every row."""
    limits = _BEGIN(self, row_ids, committed, scored, backlog)
    cycle = os.environ.get("SPECPLUG_TEST_WIDTHS")
    if not cycle:
        return limits
    widths = [int(w) for w in cycle.split(",")]
    self.scripted_calls = getattr(self, "scripted_calls", -1) + 1
    return [widths[self.scripted_calls % len(widths)]] * len(row_ids)


StepBudget.begin = _scripted_begin

def main(jobs_path: str, out_path: str, features_dir: str) -> None:
    import json

    from specplug.integrations.sglang.generate import run_job
    with open(jobs_path) as f:
        jobs = json.load(f)["jobs"]
    results = {}
    for name, job in jobs.items():
        os.environ["SPECPLUG_TEST_FEATURES"] = os.path.join(features_dir, name)
        os.makedirs(os.environ["SPECPLUG_TEST_FEATURES"], exist_ok=True)
        os.environ.pop("SPECPLUG_TEST_WIDTHS", None)
        if job.get("test_widths"):
            os.environ["SPECPLUG_TEST_WIDTHS"] = job["test_widths"]
        results[name] = run_job(job)
    with open(out_path, "w") as f:
        json.dump({"results": results}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
