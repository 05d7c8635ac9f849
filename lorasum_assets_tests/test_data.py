"""Sources, normalisation, quarantine and the notebook's 1/100 filter."""

import json

import pytest

from lorasum_assets.ml.data.dialogues import FilterSpec, filter_split, normalise
from lorasum_assets.ml.data.readers import DataSourceError, read_hub, read_local, read_sample

GOOD = {"id": "train_1", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet.", "topic": "greeting"}


def jsonl(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def good(i):
    return {**GOOD, "id": f"train_{i}"}


# (case, file name, content, expected quarantine reason prefix, or an error match)
CASES = [
    ("empty dialogue", "train.jsonl", [good(0), {**good(1), "dialogue": ""}], "empty_dialogue", None),
    ("whitespace-only dialogue", "train.jsonl", [good(0), {**good(1), "dialogue": " \n\t "}], "whitespace_dialogue", None),
    ("null dialogue", "train.jsonl", [good(0), {**good(1), "dialogue": None}], "empty_dialogue", None),
    ("missing summary in train", "train.jsonl", [good(0), {k: v for k, v in good(1).items() if k != "summary"}], "missing_summary", None),
    ("empty summary in validation", "dev.jsonl", [good(0), {**good(1), "summary": "  "}], "missing_summary", None),
    ("non-string dialogue", "train.jsonl", [good(0), {**good(1), "dialogue": 42}], "non_string_field: dialogue", None),
    ("non-string summary", "train.jsonl", [good(0), {**good(1), "summary": ["a", "b"]}], "non_string_field: summary", None),
    ("non-string id", "train.jsonl", [good(0), {**good(1), "id": {"x": 1}}], "non_string_field: id", None),
    ("duplicate id", "train.jsonl", [good(0), good(1), {**good(1), "dialogue": "#Person1#: Other."}], "duplicate_id", None),
    ("invalid UTF-8 line", "train.jsonl", [good(0), b'{"id": "train_9", "dialogue": "\xff\xfe bad", "summary": "x"}'], "invalid_utf8", None),
    ("invalid JSON line", "train.jsonl", [good(0), b'{"id": "train_9", "dialogue": '], "invalid_json", None),
    ("JSON line that is not an object", "train.jsonl", [good(0), b"[1, 2, 3]"], "invalid_json", None),
    ("empty id", "train.jsonl", [good(0), {**good(1), "id": ""}], "missing_id", None),
    ("test row without any reference", "test.jsonl", [good(0), {**good(1), "dialogue": "#Person1#: Other.", "summary": None}], "missing_reference", None),
    ("wrong columns", "train.jsonl", [{"text": "a", "label": "b"}], None, r"expected \['id', 'dialogue', 'summary', 'topic'\].*found \['label', 'text'\]"),
    ("empty file", "train.jsonl", [], None, "the file is empty"),
]


@pytest.mark.parametrize("case,name,rows,reason,error", CASES, ids=[c[0] for c in CASES])
def test_malformed_inputs_are_quarantined_or_rejected(tmp_path, case, name, rows, reason, error):
    (tmp_path / name).write_bytes(jsonl(rows))
    if error is not None:
        with pytest.raises(DataSourceError, match=error):
            normalise(read_local(tmp_path), "local")
        return
    loaded = normalise(read_local(tmp_path), "local")
    reasons = [q.reason for q in loaded.quarantined]
    assert any(r.startswith(reason) for r in reasons), reasons
    for split, rows_in in loaded.rows_in.items():
        assert rows_in == loaded.kept_counts()[split] + loaded.quarantined_counts()[split]
    assert loaded.kept_counts()[loaded.dialogues[0].split] >= 1  # the good row survives


def test_mixed_good_and_bad_rows_keep_every_count(tmp_path):
    rows = [good(i) for i in range(10)] + [{**good(10), "dialogue": ""}, b"\xff", {**good(3)}]
    (tmp_path / "train.jsonl").write_bytes(jsonl(rows))
    loaded = normalise(read_local(tmp_path), "local")
    assert loaded.rows_in == {"train": 13}
    assert loaded.kept_counts() == {"train": 10}
    assert loaded.quarantined_counts() == {"train": 3}


def test_csv_and_parquet_in_hub_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "train.csv").write_text("id,dialogue,summary,topic\ntrain_0,\"#Person1#: Hi.\",Greeting.,t\ntrain_1,,Nothing.,t\n")
    pq.write_table(pa.Table.from_pylist([good(5)]), tmp_path / "validation.parquet")
    loaded = normalise(read_local(tmp_path), "local")
    assert loaded.kept_counts() == {"train": 1, "validation": 1}
    assert [q.reason for q in loaded.quarantined] == ["empty_dialogue"]


def test_sample_has_three_splits_and_sixty_plus_dialogues():
    loaded = normalise(read_sample(), "sample")
    counts = loaded.kept_counts()
    assert set(counts) == {"train", "validation", "test"}
    assert sum(counts.values()) >= 60
    assert not loaded.quarantined
    assert all(d.dialogue.startswith("#Person1#:") and d.topic for d in loaded.dialogues)


def test_filter_is_the_notebooks_and_deterministic():
    loaded = normalise(read_sample(), "sample")
    kept = filter_split(loaded.dialogues, FilterSpec(modulus=10))
    assert [d.source_index for d in kept if d.split == "train"] == [0, 10, 20, 30, 40]
    seeded = [filter_split(loaded.dialogues, FilterSpec(random_sample=3, seed=seed)) for seed in (7, 7, 8)]
    assert seeded[0] == seeded[1] and len(seeded[0]) == 9  # a seed picks the same rows again
    assert {d.id for d in seeded[0]} != {d.id for d in seeded[2]}  # and another seed picks others
    capped = filter_split(loaded.dialogues, FilterSpec(modulus=1, max_rows_per_split=2))
    assert len(capped) == 6
    with pytest.raises(ValueError):
        filter_split(loaded.dialogues, FilterSpec(modulus=10, offset=10))


def test_real_dialogsum_authors_layout(dialogsum_dir):
    loaded = normalise(read_local(dialogsum_dir), "local")
    counts = loaded.kept_counts()
    assert counts == {"validation": 500, "test": 500}
    assert not loaded.quarantined
    by_split = {s: [d for d in loaded.dialogues if d.split == s] for s in counts}
    assert all(len(d.references) == 1 for d in by_split["validation"])
    assert all(len(d.references) == 3 for d in by_split["test"])
    kept = filter_split(loaded.dialogues, FilterSpec(modulus=100))
    assert sum(d.split == "validation" for d in kept) == 5 and sum(d.split == "test" for d in kept) == 5


class FakeSplit(list):
    pass


def test_hub_path_calls_load_dataset_and_folds_the_test_split():
    calls = []

    def fake_load_dataset(repo_id, revision=None, token=None):
        calls.append((repo_id, revision))
        test = []
        for i in range(2):
            for k in range(1, 4):
                test.append({"id": f"test_{i}_{k}", "dialogue": f"#Person1#: dialogue {i}", "summary": f"ref {i}.{k}", "topic": "t"})
        return {
            "train": FakeSplit([{"id": "train_0", "dialogue": "#Person1#: a", "summary": "s", "topic": "t"}]),
            "validation": FakeSplit([{"id": "dev_0", "dialogue": "#Person1#: b", "summary": "s", "topic": "t"}]),
            "test": FakeSplit(test),
        }

    by_split = read_hub("knkarthick/dialogsum", revision="abc123", load_dataset=fake_load_dataset)
    assert calls == [("knkarthick/dialogsum", "abc123")]
    loaded = normalise(by_split, "hub")
    tests = [d for d in loaded.dialogues if d.split == "test"]
    assert loaded.rows_in["test"] == 6
    assert [(d.id, d.references) for d in tests] == [
        ("test_0", ["ref 0.1", "ref 0.2", "ref 0.3"]),
        ("test_1", ["ref 1.1", "ref 1.2", "ref 1.3"]),
    ]
    assert loaded.kept_counts() == {"train": 1, "validation": 1, "test": 2}
