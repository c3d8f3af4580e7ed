"""The main job on the embedded defaults (``make demo``).

1. convert the bundled pretrained weights into the cache (once);
2. build the offline corpora (synthetic speech, real asterisk prompts);
3. evaluate the pretrained Whisper models zero-shot on held-out speech (30 s padded input);
4. print the table and write it as JSON and Markdown under ``runs/``.
"""

from __future__ import annotations

from pathlib import Path

from magnet_asr.evaluation.report import markdown_table, table_row, write_report

DEMO_MODELS = ("whisper-tiny.en", "whisper-base")
DEMO_DATA = (("asterisk", "test"), ("synth", "test"))


def run_demo(out_dir: str | Path = "runs/demo", limit: int | None = None, batch_size: int = 8) -> list[dict]:
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
    notes = (
        "Zero-shot pretrained Whisper, greedy decoding on 30 s padded input; WER after Whisper's English "
        "normalization; RTFx = audio seconds / decoding seconds on this machine.\n"
    )
    json_path, md_path = write_report(rows, out, title="magnet-asr demo", notes=notes)
    print(markdown_table(rows))
    print(f"wrote {json_path} and {md_path}")
    return rows
