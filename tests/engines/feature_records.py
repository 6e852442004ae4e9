"""Tests-only: what an engine handed a hidden-state drafter, kept per row for hidden_checks.py.
Imported by the recording scripts that run inside the engines' venvs (no other imports)."""


def record_draft_input(records: dict, inp) -> None:
    """records: row id -> {"chunks": [(start, [n, F] on the CPU)], "tokens": committed ids at
    the row's last call}; inp: one DraftInput."""
    for r, rid in enumerate(inp.row_ids):
        rec = records.setdefault(rid, {"chunks": [], "tokens": []})
        rec["tokens"] = inp.token_ids[r].tolist()
        feats = inp.hidden_states[r] if inp.hidden_states else None
        if feats is not None and feats.shape[0]:
            rec["chunks"].append((int(inp.hidden_start[r]), feats.detach().cpu().clone()))
