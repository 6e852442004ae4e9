"""Measure the power of tests/core/test_verify_deep.py: every broken verifier at the test's
sample size over 10 seeds; writes verify_deep_power.json beside this file (what the test's
docstring quotes).  Run: .venv/bin/python tests/core/measure_verify_power.py (about 10 min)."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import torch  # noqa: E402

torch.set_num_threads(1)
import test_verify_deep as T  # noqa: E402
from sampling_checks import chi_square  # noqa: E402

rows = T.BATCH_WITH_PROBS
exp = T._expected(rows)
out = {}
for bug in T.MUTANTS:
    res = []
    for seed in range(100, 110):
        counts = T._joint_counts(T.broken_verifier(bug), rows, True, seed=seed)
        stat, df, p = chi_square(zip(counts, exp))
        res.append((stat, df, p, T.power(stat, df)))
    out[bug] = {"rejected": sum(r[2] < T.ALPHA for r in res), "runs": len(res),
                "min_power": min(r[3] for r in res), "min_chi2": min(r[0] for r in res), "df": res[0][1]}
    print(bug, out[bug], flush=True)
json.dump(out, open(os.path.join(HERE, "verify_deep_power.json"), "w"), indent=1)
