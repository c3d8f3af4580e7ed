"""Training data streamed through ``datasets`` (``data.streaming=true``): no wav copies, no full pass first.

Every ``data.train`` spec becomes a ``datasets.IterableDataset`` of raw rows (:func:`open_streams`): a hub or
local ``datasets`` source as it is (audio left encoded: ``Audio(decode=False)``), a LibriSpeech-layout folder
as one shard per chapter, any other spec through its manifest as one shard per utterance.
:class:`StreamingSpeechDataset` then, per training process and per data-loader worker:

- shards the rows with ``datasets.distributed.split_dataset_by_node`` (rank) and ``datasets``' own worker
  split (each worker of a rank reads other shards), and reads the specs round-robin;
- drops, and counts by reason, rows with an empty transcript, audio whose header is unreadable, audio longer
  than ``max_seconds``, and audio that fails to decode or validate (:func:`magnet_asr.audio.load_audio` /
  :func:`~magnet_asr.audio.decode_audio`: soundfile decodes, soxr resamples to 16 kHz mono); the count rides on
  the next batch's ``num_skipped``, so the trainer's ``skipped_samples`` includes it;
- fills a buffer of ``buffer_size`` rows (durations from the file headers, audio still encoded), cuts it
  into batches: by duration with :class:`~magnet_asr.data.sampler.DurationBatchSampler` when
  ``max_batch_seconds`` is set (sorted, packed under the budget, batch order shuffled), else shuffled batches
  of ``batch_size``; then decodes each batch as it is yielded;
- never ends: at the end of the data it starts the next epoch (``set_epoch``: ``datasets`` reshuffles the
  shard order), so training runs for ``training.max_steps``.

**Resume.** Each batch carries its worker's position: the epoch, each spec's ``IterableDataset.state_dict()``
taken *before* the current buffer was filled, and how many batches of that buffer have been yielded.
:class:`StreamLoader` (the training loader) removes it from the batch and keeps the newest per worker; the
trainer writes them into each checkpoint (``stream_state_rank{R}.json``). A resumed run loads them: each
worker restores its specs' states, refills the same buffer (the same rows, so the same batches) and skips
the batches already trained, so the stream continues exactly where the checkpoint was taken; rows are not
read twice, and only that one buffer's headers are read again. Resuming needs the same number of processes
and data-loader workers (each worker's position belongs to its shards). With several workers the loader
takes batches from the workers in turn, starting again at worker 0 after a resume: the resumed run trains
the same batches, possibly in another interleaving.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader

from magnet_asr.audio import AudioError, decode_audio, load_audio
from magnet_asr.data.common import CorpusError, stable_fraction
from magnet_asr.data.librispeech import SPEC_PREFIX, TEXT_COLUMNS, LibriSource, librispeech_source

STATE_KEY = "stream_state"  # batch key with the worker's position; StreamLoader removes it
STATE_FILE = "stream_state_rank{rank}.json"
MAX_LOCAL_SHARDS = 64  # shards of a saved map-style dataset: enough for ranks x workers


@dataclass
class StreamSource:
    """One spec's rows as a ``datasets.IterableDataset``; ``num_rows`` when known without reading them."""

    spec: str
    rows: Any  # datasets.IterableDataset
    num_rows: int | None = None


def _manifest_rows(shards: list[tuple[str, str, str]]) -> Iterator[dict[str, str]]:
    for utt_id, text, path in shards:
        yield {"id": utt_id, "text": text, "path": path}


def _chapter_rows(shards: list[str]) -> Iterator[dict[str, str]]:
    from magnet_asr.data.folder import trans_entries

    for trans in shards:
        for utt_id, audio, text in trans_entries(Path(trans)):
            yield {"id": utt_id, "text": text, "path": str(audio)}


def _from_generator(generator: Callable[..., Iterator[dict[str, str]]], shards: list[Any]) -> Any:
    import datasets

    features = datasets.Features({k: datasets.Value("string") for k in ("id", "text", "path")})
    # a list in gen_kwargs is split into shards: one per chapter / utterance, reshuffled every epoch
    return datasets.IterableDataset.from_generator(
        generator, features=features, gen_kwargs={"shards": shards}
    )


def _libri_streams(source: LibriSource, split: str) -> list[StreamSource]:
    from magnet_asr.data.librispeech import _open_hub, _open_local, _undecoded, our_split

    if source.kind == "folders":
        chapters = [
            str(t)
            for folder, s in source.folders.items()
            if s == split
            for t in sorted(folder.glob("*/*/*.trans.txt"))
        ]
        if not chapters:
            return []
        rows = _from_generator(_chapter_rows, chapters)
        count = sum(
            1 for c in chapters for line in Path(c).read_text(errors="replace").splitlines() if line.strip()
        )
        return [StreamSource(source.spec, rows, count)]
    opened = (
        _open_hub(source.location, source.config, source.splits or {}, streaming=True)
        if source.kind == "hub"
        else _open_local(Path(source.location), streaming=True)
    )
    out = []
    for name, rows in opened.items():
        ours = source.splits[name] if source.splits and name in source.splits else our_split(name)
        if ours != split or (source.splits and name not in source.splits):
            continue
        num_rows: int | None = None
        if hasattr(rows, "to_iterable_dataset"):  # a saved map-style dataset: its length is known
            num_rows = len(cast(Sized, rows))
            rows = _undecoded(rows).to_iterable_dataset(num_shards=max(1, min(num_rows, MAX_LOCAL_SHARDS)))
        else:
            info = getattr(rows, "info", None)
            known = info.splits.get(name) if info is not None and info.splits else None
            num_rows = known.num_examples if known is not None and known.num_examples else None
            rows = _undecoded(rows)
        out.append(StreamSource(f"{source.spec} ({name})", rows, num_rows))
    return out


def open_streams(specs: Sequence[str], split: str, librispeech_root: str | None = None) -> list[StreamSource]:
    """The rows of split ``split`` of each spec, unread (module docstring)."""
    from magnet_asr.data.corpora import resolve_data
    from magnet_asr.data.manifest import read_manifest

    out: list[StreamSource] = []
    for spec in specs:
        if str(spec).startswith(SPEC_PREFIX):
            out.extend(_libri_streams(librispeech_source(str(spec), librispeech_root), split))
            continue
        utts = read_manifest(resolve_data(spec), split=split)
        if utts:
            rows = [(u.id, u.text, u.audio) for u in utts]
            out.append(StreamSource(str(spec), _from_generator(_manifest_rows, rows), len(rows)))
    if not out:
        raise CorpusError(f"data.train: no {split} rows in {', '.join(map(str, specs))}")
    return out


def _fields(row: dict[str, Any]) -> tuple[str, str, Any]:
    """``(id, text, audio)`` of a raw row; ``audio``: a path, or the ``datasets`` audio dict."""
    text = next((row[c] for c in TEXT_COLUMNS if c in row), None)
    audio = row.get("audio", row.get("path"))
    if text is None or audio is None:
        raise CorpusError(
            f"dataset rows need an 'audio' and a text column ({', '.join(TEXT_COLUMNS)}); got {sorted(row)}"
        )
    utt_id = str(row.get("id") or (audio.get("path") if isinstance(audio, dict) else audio) or "")
    return utt_id, str(text).strip(), audio


def _header_seconds(audio: Any) -> float:
    """Duration from the header of a path or an audio dict (bytes / path / decoded array); raises AudioError."""
    import io

    import soundfile as sf

    if isinstance(audio, dict) and audio.get("array") is not None:
        return len(audio["array"]) / float(audio["sampling_rate"])
    source = audio.get("bytes") or audio.get("path") if isinstance(audio, dict) else audio
    try:
        info = sf.info(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except Exception as e:  # libsndfile raises several types for unreadable or missing files
        raise AudioError(
            f"cannot read the audio header ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    return info.frames / info.samplerate


def _decode(utt_id: str, audio: Any, max_seconds: float | None) -> Any:
    import numpy as np

    from magnet_asr.audio import resample, validate

    if isinstance(audio, dict) and audio.get("array") is not None:  # decoded upstream
        wave = resample(np.asarray(audio["array"], dtype=np.float32), int(audio["sampling_rate"]))
        return validate(wave, utt_id, max_seconds=max_seconds)
    if isinstance(audio, dict) and audio.get("bytes"):
        return decode_audio(audio["bytes"], utt_id, max_seconds=max_seconds)
    path = audio.get("path") if isinstance(audio, dict) else audio
    if not path:
        raise AudioError(f"{utt_id}: no audio (neither bytes, an array nor a path)")
    return load_audio(path, max_seconds=max_seconds)


class StreamingSpeechDataset(torch.utils.data.IterableDataset):
    """An endless stream of decoded training batches (lists of items), with each worker's position.

    Yields ``{"items": [...], "num_skipped": n, STATE_KEY: {"worker": id, "state": {...}}}``; an item is what
    :class:`~magnet_asr.data.collator.SpeechDataset` gives (``id``, ``path``, ``text``, ``audio``). Call
    :meth:`shard` with the rank before iterating and :meth:`restore` to resume (module docstring).
    """

    def __init__(
        self,
        sources: Sequence[StreamSource],
        batch_size: int,
        max_batch_seconds: float | None = None,
        max_seconds: float | None = 30.0,
        buffer_size: int = 500,
        seed: int = 0,
    ) -> None:
        if buffer_size < batch_size:
            raise ValueError(
                f"data.stream_buffer_size ({buffer_size}) must be at least the batch size ({batch_size})"
            )
        self.sources = list(sources)
        self.batch_size = batch_size
        self.max_batch_seconds = max_batch_seconds
        self.max_seconds = max_seconds
        self.buffer_size = buffer_size
        self.seed = seed
        self.rank, self.world = 0, 1
        self._streams = [s.rows for s in self.sources]
        self._resume: dict[int, dict[str, Any]] = {}

    def shard(self, rank: int, world: int) -> None:
        """Read only this rank's part of every spec (``split_dataset_by_node``)."""
        from datasets.distributed import split_dataset_by_node

        self.rank, self.world = rank, world
        self._streams = [split_dataset_by_node(s.rows, rank=rank, world_size=world) for s in self.sources]

    def restore(self, checkpoint: Path, num_workers: int) -> None:
        """Continue from the positions this rank saved into ``checkpoint`` (:meth:`StreamLoader.save`)."""
        path = Path(checkpoint) / STATE_FILE.format(rank=self.rank)
        if not path.is_file():
            raise ValueError(f"{path}: missing; the checkpoint was not written by a data.streaming=true run")
        saved = json.loads(path.read_text())
        if (saved["world"], saved["num_workers"]) != (self.world, num_workers):
            raise ValueError(
                f"{path}: written by {saved['world']} process(es) x {saved['num_workers']} data-loader worker(s); "
                f"resume with the same (now {self.world} x {num_workers})"
            )
        self._resume = {int(k): v for k, v in saved["workers"].items()}

    def position_summary(self) -> str:
        """Where each worker resumes (``the start`` before :meth:`restore`)."""
        parts = [
            f"worker {w}: epoch {s['epoch']}, buffer {s['buffer']}, batch {s['batch']}"
            for w, s in sorted(self._resume.items())
        ]
        return "; ".join(parts) or "the start"

    def _pack(self, buffer: list[dict[str, Any]], seed: int) -> list[list[dict[str, Any]]]:
        if self.max_batch_seconds is None:
            order = list(range(len(buffer)))
            random.Random(seed).shuffle(order)
            groups = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        else:
            from magnet_asr.data.sampler import DurationBatchSampler

            sampler = DurationBatchSampler(
                [it["seconds"] for it in buffer],
                self.max_batch_seconds,
                max_batch_size=self.batch_size,
                seed=seed,
                pool_factor=math.ceil(len(buffer) / self.batch_size) + 1,  # one pool: the whole buffer
            )
            groups = list(sampler)
        return [[buffer[i] for i in group] for group in groups]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        n = len(self._streams)
        resume = copy.deepcopy(self._resume.get(worker))
        pos = resume or {
            "epoch": 0,
            "sources": [None] * n,
            "done": [False] * n,
            "next": 0,
            "buffer": 0,
            "skipped": {},
        }
        skipped: dict[str, int] = dict(pos["skipped"])
        pending = 0  # rows dropped since the last batch this worker yielded
        while True:
            epoch, states, done = pos["epoch"], list(pos["sources"]), list(pos["done"])
            iterators = []
            for ds, state in zip(self._streams, states):
                ds.set_epoch(epoch)
                if state is not None:
                    ds.load_state_dict(state)
                iterators.append(iter(ds))
            nxt, buffer_index = pos["next"], pos["buffer"]
            fresh, rows_read, yielded = all(s is None for s in states), 0, 0
            while not all(done):
                start = {
                    "epoch": epoch,
                    "sources": copy.deepcopy(states),
                    "done": list(done),
                    "next": nxt,
                    "buffer": buffer_index,
                }
                buffer: list[dict[str, Any]] = []
                while len(buffer) < self.buffer_size and not all(done):
                    i, nxt = nxt, (nxt + 1) % n
                    if done[i]:
                        continue
                    try:
                        row = next(iterators[i])
                    except StopIteration:
                        done[i] = True
                        continue
                    states[i] = self._streams[i].state_dict()
                    rows_read += 1
                    reason = self._check(row, buffer)
                    if reason is not None:
                        skipped[reason] = skipped.get(reason, 0) + 1
                        pending += 1
                skip = 0
                if (
                    resume is not None
                ):  # the buffer the checkpoint was taken in: its first batches are trained
                    skip, skipped, pending, resume = resume["batch"], dict(resume["skipped"]), 0, None
                key = f"{self.seed}:{self.rank}:{worker}:{epoch}:{buffer_index}"
                for k, group in enumerate(self._pack(buffer, int(stable_fraction(key) * 2**31))):
                    if k < skip:
                        continue
                    items = []
                    for it in group:
                        try:
                            audio = _decode(it["id"], it.pop("source"), self.max_seconds)
                        except AudioError as e:
                            skipped[e.kind] = skipped.get(e.kind, 0) + 1
                            pending += 1
                            continue
                        items.append({"id": it["id"], "path": it["path"], "text": it["text"], "audio": audio})
                    if not items:  # every row of the batch was bad: this worker simply reads on
                        continue
                    state = {**start, "batch": k + 1, "skipped": dict(skipped)}
                    yield {
                        "items": items,
                        "num_skipped": pending,
                        STATE_KEY: {"worker": worker, "state": state},
                    }
                    pending, yielded = 0, yielded + 1
                buffer_index += 1
            if fresh and rows_read == 0:
                return  # this worker has no shard (more workers than shards): nothing to repeat
            if fresh and yielded == 0:  # repeating would loop forever without a batch
                raise CorpusError(
                    f"rank {self.rank} worker {worker}: a whole pass over its shards gave no usable utterance "
                    f"(skipped: {skipped})"
                )
            pos = {
                "epoch": epoch + 1,
                "sources": [None] * n,
                "done": [False] * n,
                "next": 0,
                "buffer": 0,
                "skipped": skipped,
            }

    def _check(self, row: dict[str, Any], buffer: list[dict[str, Any]]) -> str | None:
        """Append the row to ``buffer`` or return why it is dropped."""
        utt_id, text, audio = _fields(row)
        if not text:
            return "empty transcript"
        try:
            seconds = _header_seconds(audio)
        except AudioError:
            return "unreadable"
        if self.max_seconds is not None and seconds > self.max_seconds:
            return "too long"
        path = audio.get("path") if isinstance(audio, dict) else audio
        buffer.append(
            {"id": utt_id, "text": text, "source": audio, "path": str(path or utt_id), "seconds": seconds}
        )
        return None

    def describe(self) -> list[str]:
        """One line per spec: what is known before reading (dry runs)."""
        lines = []
        for s in self.sources:
            rows = f"{s.num_rows} utterances listed" if s.num_rows is not None else "size unknown until read"
            lines.append(f"{s.spec}: streaming, {s.rows.num_shards} shard(s), {rows}")
        return lines


class _Collate:
    """Collate a streamed batch in the worker; the position and the dropped-row count ride along."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self.collator(batch["items"])
        out["num_skipped"] = int(out.get("num_skipped", 0)) + batch["num_skipped"]
        out[STATE_KEY] = batch[STATE_KEY]
        return out


class StreamLoader(DataLoader):
    """The training loader over a :class:`StreamingSpeechDataset`: keeps each worker's newest position.

    Not passed through ``accelerator.prepare``: the dataset shards itself by rank, and accelerate would
    either dispatch one rank's batches to all or have every rank read the whole stream.
    """

    def __init__(
        self, dataset: StreamingSpeechDataset, collator: Callable[..., dict[str, Any]], num_workers: int
    ) -> None:
        # batch_size=None: the dataset yields whole batches, and collate_fn gets each one (not a list)
        collate = cast(Callable[[list[Any]], Any], _Collate(collator))
        super().__init__(dataset, batch_size=None, collate_fn=collate, num_workers=num_workers)
        self.positions: dict[int, dict[str, Any]] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        for batch in super().__iter__():
            info = batch.pop(STATE_KEY)
            self.positions[info["worker"]] = info["state"]
            yield batch

    def skipped_by_reason(self) -> dict[str, int]:
        """Rows dropped so far on this rank, by reason (the positions carry each worker's running count)."""
        total: dict[str, int] = {}
        for state in self.positions.values():
            for reason, count in state["skipped"].items():
                total[reason] = total.get(reason, 0) + count
        return total

    def save(self, checkpoint: Path) -> None:
        """Write this rank's positions into ``checkpoint`` (every rank calls it)."""
        dataset: StreamingSpeechDataset = self.dataset  # type: ignore[assignment]
        # workers that have not delivered a batch since a resume keep the position they resumed from
        workers = {**dataset._resume, **self.positions}
        state = {"world": dataset.world, "num_workers": self.num_workers, "workers": workers}
        path = Path(checkpoint) / STATE_FILE.format(rank=dataset.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state, default=str))
