"""Tests-only, run in the SGLang venv: one generate job (integrations/sglang/generate.py) whose
scheduler records what specplug's EAGLE drafters were handed.

SGLang starts its scheduler with multiprocessing's spawn, which imports this script again in
the child as __mp_main__: the patch below runs at import, so it is in place in the process where
the worker drafts.  Every DraftInput row's hidden_states / hidden_start is kept per row id with
the row's committed tokens at its last call, saved to $SPECPLUG_TEST_FEATURES/<pid>.pt after
every call (the scheduler is killed at shutdown, so nothing waits for exit).  Drafts are unchanged.

usage: SPECPLUG_TEST_FEATURES=DIR python record_features.py JOB.json RESULT.json
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from feature_records import record_draft_input  # noqa: E402

from specplug.drafters import eagle_runtime  # noqa: E402

_RECORDS: dict[int, dict] = {}  # row id -> {"chunks": [(start, [n, F])], "tokens": [...]}
_PROPOSE = eagle_runtime.EagleDrafter.propose


def _recording(self, inp):
    record_draft_input(_RECORDS, inp)
    torch.save(_RECORDS, os.path.join(os.environ["SPECPLUG_TEST_FEATURES"], f"{os.getpid()}.pt"))
    return _PROPOSE(self, inp)


eagle_runtime.EagleDrafter.propose = _recording

if __name__ == "__main__":
    from specplug.integrations.sglang.generate import main
    sys.exit(main(sys.argv[1:]))
