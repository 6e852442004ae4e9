"""Run one vLLM job (generate.run_job) and record what specplug's EAGLE drafters were handed.

Every DraftInput row's hidden_states / hidden_start is kept per specplug row id, with the row's
committed tokens at its last call, so the test can rebuild each request's feature sequence and
compare it with HF's hidden_states on the same tokens.  Recording wraps EagleDrafter.propose in
this process only; drafts are unchanged.

usage: python record_features.py JOB.json RESULT.json FEATURES.pt
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from feature_records import record_draft_input  # noqa: E402


def main(job_path: str, out_path: str, feats_path: str) -> None:
    import torch

    from specplug.drafters import eagle_runtime
    from specplug.integrations.vllm.generate import _freeze_vllm_import, run_job

    records: dict[int, dict] = {}  # row id -> {"chunks": [(start, [n, F])], "tokens": [...]}
    propose = eagle_runtime.EagleDrafter.propose

    def recording(self, inp):
        record_draft_input(records, inp)
        return propose(self, inp)

    eagle_runtime.EagleDrafter.propose = recording
    _freeze_vllm_import()
    with open(job_path) as f:
        result = run_job(json.load(f))
    with open(out_path, "w") as f:
        json.dump(result, f)
    torch.save(records, feats_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
