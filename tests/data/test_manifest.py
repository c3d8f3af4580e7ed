"""Manifest rows with and without phone times: round trip, old rows byte-identical, clear errors."""

from __future__ import annotations

import json

import pytest

from magnet_asr.data.manifest import ManifestError, Utterance, has_own_splits, read_manifest, write_manifest


def test_phone_times_round_trip_and_rows_without_them_keep_the_old_bytes(tmp_path):
    plain = Utterance("a", "/abs/a.wav", "hi", 1.0, "test")
    timed = Utterance(
        "b", "/abs/b.wav", "hi", 0.5, "test", phones=["pau", "hh", "pau"], phone_ends=[0.1, 0.3, 0.5]
    )
    path = write_manifest([plain, timed], tmp_path / "m.jsonl")
    lines = path.read_text().splitlines()
    old_format = {"id": "a", "audio": "/abs/a.wav", "text": "hi", "duration": 1.0, "split": "test"}
    assert lines[0] == json.dumps(old_format)  # what write_manifest wrote before the fields existed
    assert json.loads(lines[1])["phone_ends"] == [0.1, 0.3, 0.5]
    back = read_manifest(path)
    assert back == [plain, timed]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"phones": ["pau"]}, "phones without phone_ends"),
        ({"phone_ends": [0.5]}, "phone_ends without phones"),
        ({"phones": ["pau", "a"], "phone_ends": [0.5]}, "differ in length"),
        ({"phones": ["pau", "a"], "phone_ends": [0.5, 0.4]}, "increasing"),
        ({"phones": ["pau"], "phone_ends": ["x"]}, "list of numbers"),
        ({"phones": [1], "phone_ends": [0.5]}, "list of strings"),
    ],
)
def test_bad_phone_fields_name_the_line_and_field(tmp_path, extra, message):
    row = {"id": "a", "audio": "/abs/a.wav", "text": "hi", "duration": 1.0} | extra
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ManifestError, match=f"m.jsonl:1: .*{message}"):
        read_manifest(path)


def test_hash_split_is_written_only_when_true_and_read_back(tmp_path):
    hashed = Utterance("a", "/abs/a.wav", "hi", 1.0, "train", hash_split=True)
    given = Utterance("b", "/abs/b.wav", "hi", 1.0, "test")
    path = write_manifest([hashed, given], tmp_path / "m.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["hash_split"] is True and "hash_split" not in rows[1]
    assert read_manifest(path) == [hashed, given]
    assert not has_own_splits([hashed]) and has_own_splits([hashed, given])
