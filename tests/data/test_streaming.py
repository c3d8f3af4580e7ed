"""The streamed training set (data.streaming): sharding, skip-and-count, duration batches, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from librispeech_fixtures import utterances, write_librispeech_dataset, write_librispeech_folder
from magnet_asr.data import CorpusError
from magnet_asr.data.streaming import STATE_KEY, StreamingSpeechDataset, StreamLoader, open_streams

datasets = pytest.importorskip("datasets")

SPEC = "librispeech:train.clean.100"


@pytest.fixture(scope="module")
def utts():
    return utterances()


@pytest.fixture(scope="module")
def roots(utts, tmp_path_factory) -> dict[str, Path]:
    """The same 12 utterances as a LibriSpeech folder, a save_to_disk dataset and parquet files."""
    base = tmp_path_factory.mktemp("libri")
    return {
        "folder": write_librispeech_folder(base / "LibriSpeech", utts),
        "disk": write_librispeech_dataset(base / "disk", utts, "disk"),
        "parquet": write_librispeech_dataset(base / "parquet", utts, "parquet"),
    }


def _stream(root: Path, rank: int = 0, world: int = 1, **kw) -> StreamingSpeechDataset:
    options = {"batch_size": 2, "buffer_size": 3, **kw}
    ds = StreamingSpeechDataset(open_streams([SPEC], "train", str(root)), **options)
    ds.shard(rank, world)
    return ds


def _ids(batch) -> list[str]:
    return [it["id"] for it in batch["items"]]


@pytest.mark.parametrize("kind", ["folder", "disk", "parquet"])
def test_ranks_read_disjoint_parts_that_cover_an_epoch(roots, utts, kind):
    train = {u[0] for u in utts["train-clean-100"]}
    seen: list[str] = []
    for rank in range(2):
        for batch in _stream(roots[kind], rank, 2):
            if batch[STATE_KEY]["state"]["epoch"] > 0:
                break
            assert batch["num_skipped"] == 0 and all(
                it["audio"].dtype.name == "float32" for it in batch["items"]
            )
            seen.extend(_ids(batch))
    assert sorted(seen) == sorted(train)  # each training utterance once, on one rank


@pytest.mark.parametrize("kind", ["folder", "disk"])
@pytest.mark.parametrize("cut", [0, 1, 3, 5])
def test_resume_continues_exactly_where_the_position_was_taken(roots, kind, cut):
    whole = iter(_stream(roots[kind], max_batch_seconds=5.0))
    batches = [next(whole) for _ in range(9)]  # past the end of the first epoch (8 utterances)
    resumed = _stream(roots[kind], max_batch_seconds=5.0)
    resumed._resume = {0: batches[cut][STATE_KEY]["state"]}
    it = iter(resumed)
    assert [_ids(next(it)) for _ in range(9 - cut - 1)] == [_ids(b) for b in batches[cut + 1 :]]


def test_duration_batches_stay_under_the_budget(roots):
    budget = 4.5
    stream = iter(_stream(roots["folder"], batch_size=4, buffer_size=8, max_batch_seconds=budget))
    for _ in range(6):
        items = next(stream)["items"]
        longest = max(len(it["audio"]) for it in items) / 16000
        assert len(items) == 1 or longest * len(items) <= budget + 0.05


def test_bad_rows_are_skipped_and_counted(roots, utts, tmp_path):
    root = write_librispeech_folder(
        tmp_path / "LibriSpeech", {"train-clean-100": utts["train-clean-100"][:3]}
    )
    chapter = root / "train-clean-100" / "19" / "198"
    (chapter / "19-198-0000.flac").write_bytes(b"fLaC not really")  # unreadable header
    with (chapter / "19-198.trans.txt").open("a") as f:
        f.write("19-198-0100\n")  # an empty transcript
    (chapter / "19-198-0100.flac").write_bytes((chapter / "19-198-0001.flac").read_bytes())
    ds = _stream(root, buffer_size=8, max_seconds=1.8)  # and the clips over 1.8 s are too long
    loader = StreamLoader(ds, lambda items: {"ids": [it["id"] for it in items]}, num_workers=0)
    good, skipped = [], 0
    for batch in loader:
        if STATE_KEY in batch:
            pytest.fail("the loader must remove the stream position from the batch")
        good.extend(batch["ids"])
        skipped += batch["num_skipped"]
        if len(good) >= 4:
            break
    reasons = loader.skipped_by_reason()
    assert reasons["unreadable"] >= 1 and reasons["empty transcript"] >= 1
    assert skipped == sum(reasons.values())  # the counts ride on the batches the trainer sees
    assert "19-198-0000" not in good


def test_an_all_bad_stream_fails_with_one_line(tmp_path, utts):
    root = write_librispeech_folder(
        tmp_path / "LibriSpeech", {"train-clean-100": utts["train-clean-100"][:1]}
    )
    for flac in root.rglob("*.flac"):
        flac.write_bytes(b"junk")
    with pytest.raises(CorpusError, match="no usable utterance"):
        next(iter(_stream(root)))


def test_loader_saves_and_restores_positions_per_worker(roots, tmp_path):
    ds = _stream(roots["disk"])
    loader = StreamLoader(ds, lambda items: {"ids": [it["id"] for it in items]}, num_workers=2)
    it = iter(loader)
    first = [next(it)["ids"] for _ in range(4)]
    assert set(loader.positions) == {0, 1}  # both workers delivered batches
    loader.save(tmp_path)
    saved = json.loads((tmp_path / "stream_state_rank0.json").read_text())
    assert saved["world"] == 1 and saved["num_workers"] == 2 and set(saved["workers"]) == {"0", "1"}
    following = [next(it)["ids"] for _ in range(2)]
    resumed = _stream(roots["disk"])
    resumed.restore(tmp_path, num_workers=2)
    assert "worker 0: epoch 0" in resumed.position_summary()
    again = iter(StreamLoader(resumed, lambda items: {"ids": [it["id"] for it in items]}, num_workers=2))
    assert [next(again)["ids"] for _ in range(2)] == following
    assert not {tuple(b) for b in following} & {tuple(b) for b in first}
    with pytest.raises(ValueError, match="same"):
        _stream(roots["disk"]).restore(tmp_path, num_workers=0)
    with pytest.raises(ValueError, match="missing"):
        _stream(roots["disk"]).restore(tmp_path / "nothing", num_workers=2)


def test_manifest_specs_stream_too(tmp_path, tone):
    rows = [
        {
            "id": f"u{i}",
            "audio": str(tone(tmp_path / f"u{i}.wav", 1.0)),
            "text": "A TONE",
            "duration": 1.0,
            "split": "train",
        }
        for i in range(3)
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = open_streams([str(manifest)], "train")
    assert sources[0].num_rows == 3 and sources[0].rows.num_shards == 3
    with pytest.raises(CorpusError, match="no validation rows"):
        open_streams([str(manifest)], "validation")
