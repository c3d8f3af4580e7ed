"""The main job on the embedded defaults (``make demo``).

1. convert the bundled pretrained weights into the cache (once);
2. build the offline corpora (synthetic speech, real asterisk prompts);
3. evaluate the pretrained Whisper models zero-shot on held-out speech (30 s padded input);
4. train short versions of ``magnet_demo`` (compressed MagnetWhisper, distilled from the pretrained
   tiny.en) and its uncompressed control (trained the same way) on this CPU, on a subset of the training
   utterances so the teacher's cache (shared by both runs) stays cheap, and evaluate both on the same
   test splits;
5. print the table and write it as JSON and Markdown under ``runs/demo``;
6. write the report with plots (``magnet-asr report``) for the trained runs: ``runs/demo/report``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from magnet_asr.evaluation.report import markdown_table, table_row, write_report

DEMO_MODELS = ("whisper-tiny.en", "whisper-base")
DEMO_DATA = (("asterisk", "test"), ("synth", "test"))
# the short runs: steps, and how many training utterances they draw from (each costs the teacher once)
DEMO_TRAIN_STEPS = 100
DEMO_TRAIN_UTTERANCES = 400
# what each trained row is, in the table
DEMO_EXPERIMENTS = {
    "magnet_demo": "learned phone boundaries at encoder layer 1, long segments split, distilled",
    "magnet_demo_control": "no compression, variable length, distilled",
}


def _train_rows(
    out: Path, train_steps: int, limit: int | None, train_utterances: int | None
) -> list[dict[str, Any]]:
    """Short runs of the MagnetWhisper experiment and its control; one table row per test split."""
    from magnet_asr.schema import load_run_config
    from magnet_asr.training.recipe import train

    rows = []
    for experiment, what in DEMO_EXPERIMENTS.items():
        overrides = [
            f"+experiments={experiment}",
            f"training.max_steps={train_steps}",
            "training.eval_steps=0",
            f"training.save_steps={train_steps}",
            # about ten points on the training curves of the report, however short the run
            f"training.logging_steps={max(1, min(25, train_steps // 10))}",
            f"training.output_dir={out / experiment}",
            f"distillation.cache_dir={out / 'teacher_cache'}",
            f"data.max_train_utterances={'null' if train_utterances is None else train_utterances}",
            f"data.max_eval_utterances={'null' if limit is None else limit}",
        ]
        results = train(load_run_config(overrides))
        name = f"{experiment} ({train_steps} steps): {what}"
        for spec, summary in results["test"].items():
            rows.append(table_row({**summary, "model": name, "data": spec}))
    return rows


def run_demo(
    out_dir: str | Path = "runs/demo",
    limit: int | None = 100,
    batch_size: int = 8,
    train_steps: int = DEMO_TRAIN_STEPS,
    train_utterances: int | None = DEMO_TRAIN_UTTERANCES,
) -> list[dict]:
    """Run the demo; ``train_steps=0`` skips the training part."""
    from magnet_asr.data.corpora import build_corpus
    from magnet_asr.evaluation.run import run_eval
    from magnet_asr.weights import BUNDLED, ensure_bundled

    out = Path(out_dir)
    for name in BUNDLED:
        print(f"weights: {name} -> {ensure_bundled(name)}")
    for corpus, _ in DEMO_DATA:
        print(f"data: {corpus} -> {build_corpus(corpus)}")
    rows = []
    for model in DEMO_MODELS:
        for corpus, split in DEMO_DATA:
            summary = run_eval(
                model,
                corpus,
                split=split,
                batch_size=batch_size,
                limit=limit,
                out=out / f"eval_{model}_{corpus}.json",
            )
            rows.append(table_row(summary))
            print(markdown_table(rows[-1:]))
    if train_steps > 0:
        rows.extend(_train_rows(out, train_steps, limit, train_utterances))
    notes = (
        "Pretrained rows: zero-shot Whisper, greedy decoding on 30 s padded input. Trained rows: MagnetWhisper "
        "fine-tuned on this CPU on variable-length input, distilled from the zero-shot whisper-tiny.en "
        "(encoder frames + next-token distributions), compressed (one predictor at encoder layer 1: one "
        "boundary per transcript phoneme, supervised by flite's phone times where the synth corpus has them, "
        "segments over compressor.max_segment_frames split evenly) or not (the control, trained the same "
        "way); mean_compression = encoder frames before / after pooling. WER after Whisper's English "
        "normalization; RTFx = audio seconds / decoding seconds.\n"
    )
    json_path, md_path = write_report(rows, out, title="magnet-asr demo", notes=notes)
    print(markdown_table(rows))
    print(f"wrote {json_path} and {md_path}")
    if train_steps > 0:
        from magnet_asr.evaluation.run_report import build_report

        runs = [out / experiment for experiment in DEMO_EXPERIMENTS]
        report = build_report([*runs, out], out / "report", title="magnet-asr demo report")
        print(f"wrote {report}")
    return rows
