"""Long-form WER of one model: clips of several utterances, read whole, in windows, or cut at pauses.

The test splits have few long clips (asterisk: 4 over 10 s, synth: none), too few to choose how a model
should read long audio. This builds long clips from the validation splits instead: consecutive
utterances joined with 0.4 s of silence into clips of 12-30 s (lengths drawn with a fixed seed), whose
reference is the utterances' texts joined. Then it scores, on the same audio:

- ``one by one``: the utterances the long clips are made of, each read alone, as the model is configured
  (the bound to reach);
- ``whole``: each clip read whole up to 30 s (the encoder's window);
- ``windows W``: clips longer than W s in windows of at most W s, each ending where it is quietest
  (:func:`magnet_asr.audio.long_form_windows`);
- ``pauses W``: clips longer than W s cut at every pause (:func:`magnet_asr.audio.pause_windows`),
  what a SpeechLLM with ``decoding.max_window_seconds = W`` does.

Usage: ``python benchmarks/long_form.py MODEL [--windows 5,10,15,20] [--synth synth:12000]
[--synth-utterances 80] [--out benchmarks/results/long_form.json]``. Greedy decoding.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS_DIR, environment, write_json

GAP_SECONDS = 0.4
CLIP_SECONDS = (12.0, 30.0)


def long_clips(sources: list[tuple[str, int]], folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the long clips and the utterances they are made of; return both manifests (split ``test``)."""
    import soundfile

    from magnet_asr.audio import SAMPLE_RATE, load_audio
    from magnet_asr.data import read_manifest
    from magnet_asr.data.corpora import resolve_data
    from magnet_asr.data.manifest import Utterance, write_manifest

    rng = random.Random(seed)
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), np.float32)
    clips: list[Utterance] = []
    parts: list[Utterance] = []
    for data, count in sources:
        pool = [u for u in read_manifest(resolve_data(data)) if u.split == "validation"][:count]
        while pool:
            target, taken, seconds = rng.uniform(*CLIP_SECONDS), [], 0.0
            while pool and seconds < target:
                taken.append(pool.pop(0))
                seconds += taken[-1].duration + GAP_SECONDS
            if seconds < CLIP_SECONDS[0]:
                break  # the remainder is too short for a long clip
            audio = np.concatenate([x for u in taken for x in (load_audio(u.audio), gap)][:-1])
            name = f"{data.replace(':', '-')}-{len(clips)}"
            soundfile.write(folder / f"{name}.wav", audio, SAMPLE_RATE)
            text = " ".join(u.text for u in taken)
            clips.append(Utterance(name, str(folder / f"{name}.wav"), text, len(audio) / SAMPLE_RATE, "test"))
            parts += [Utterance(u.id, u.audio, u.text, u.duration, "test") for u in taken]
    return write_manifest(clips, folder / "long.jsonl"), write_manifest(parts, folder / "parts.jsonl")


def score(recognizer: Any, manifest: Path, label: str) -> dict[str, Any]:
    from magnet_asr.evaluation.run import run_eval

    summary = run_eval(recognizer, str(manifest), split="test")
    row = {
        "reading": label,
        "wer": summary["wer"],
        "cer": summary["cer"],
        "clips": summary["num_utterances"],
        "audio_tokens_per_second": summary["compressed_frames"] / summary["audio_seconds"],
    }
    print(f"{label:>12}  WER {row['wer']:.4f}  CER {row['cer']:.3f}  ({row['clips']} clips)", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--windows", default="5,10,15,20", help="window lengths in seconds, comma-separated")
    parser.add_argument("--asterisk-utterances", type=int, default=23)
    parser.add_argument("--synth", default="synth:12000", help="the synthetic corpus the model trained on")
    parser.add_argument("--synth-utterances", type=int, default=80)
    parser.add_argument("--out", default=str(RESULTS_DIR / "long_form.json"))
    args = parser.parse_args(argv)

    from magnet_asr.audio import CHUNK_LENGTH
    from magnet_asr.evaluation.decode import load_recognizer

    recognizer: Any = load_recognizer(args.model)  # any family; split_at_pauses is set on it below
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = [("asterisk", args.asterisk_utterances), (args.synth, args.synth_utterances)]
        long_manifest, parts_manifest = long_clips(sources, Path(tmp))
        rows.append(score(recognizer, parts_manifest, "one by one"))
        for window in [float(CHUNK_LENGTH)] + [float(w) for w in args.windows.split(",")]:
            for pauses in (False, True) if window < CHUNK_LENGTH else (False,):
                recognizer.max_seconds, recognizer.split_at_pauses = window, pauses
                label = (
                    f"{'pauses' if pauses else 'windows'} {window:g}" if window < CHUNK_LENGTH else "whole"
                )
                rows.append(score(recognizer, long_manifest, label))
    import torch

    report = {"model": args.model, "environment": environment(torch.get_num_threads()), "rows": rows}
    write_json(Path(args.out), report)


if __name__ == "__main__":
    main()
