"""The ``magnet-asr`` command. Thin: parse arguments, call the package, print, set the exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _cmd_weights(args: argparse.Namespace) -> int:
    from magnet_asr.weights import BUNDLED, ensure_bundled, list_bundled

    if args.list:
        for row in list_bundled():
            print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()))
        return 0
    for name in args.names or list(BUNDLED):
        print(f"{name}: {ensure_bundled(name, force=args.force)}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from magnet_asr.data.corpora import build_corpus

    options = {k: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    options = {k[4:]: v for k, v in options.items()}
    path = build_corpus(args.corpus, out_dir=args.out, force=args.force, **options)
    print(path)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from magnet_asr.evaluation.run import run_eval, summary_line

    summary = run_eval(
        args.model,
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        limit=args.limit,
        out=args.out,
        decoding=_decoding(args, guards=args.guards),
        speech_llm_decoding=_speech_llm_decoding(args),
    )
    print(summary_line({**summary, "model": args.model}))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from magnet_asr.evaluation.compare import compare, write_comparison

    comparison = compare(args.a, args.b, num_draws=args.draws, seed=args.seed)
    print(comparison.summary())
    if args.out:
        write_comparison(comparison, args.out)
        print(f"wrote {args.out}")
    return 0


def _decoding(args: argparse.Namespace, guards: bool):
    from magnet_asr.models.whisper_generation import DecodingOptions

    return DecodingOptions(guards=guards, num_beams=args.num_beams)


def _speech_llm_decoding(args: argparse.Namespace) -> dict[str, float] | None:
    return None if args.ctc_weight is None else {"ctc_weight": args.ctc_weight}


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from magnet_asr.evaluation.run import transcribe_files

    failed = 0
    results = []
    decoding = _decoding(args, guards=not args.no_guards)
    for item in transcribe_files(args.model, args.files, decoding, _speech_llm_decoding(args)):
        if "error" in item:
            failed += 1
            print(f"error: {item['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{item['file']}\t{item['text']}")
        results.append(item)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    return 1 if failed else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from magnet_asr.evaluation.decode import model_type_of
    from magnet_asr.models.speech_llm import export_merged

    if model_type_of(args.model) != "speech_llm":
        raise ValueError(f"{args.model}: only a SpeechLLM with LoRA adapters has anything to merge")
    print(export_merged(args.model, args.out))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from magnet_asr.schema import load_run_config
    from magnet_asr.training.recipe import dry_run, train

    cfg = load_run_config(args.overrides)
    if args.dry_run:
        dry_run(cfg)
    else:
        train(cfg, command=shlex.join(["magnet-asr", "train", *args.overrides]))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from magnet_asr.training.sweep import run_sweep

    run_sweep(args.overrides, args.param, args.out)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from magnet_asr.demo import run_demo

    run_demo(
        out_dir=args.out,
        limit=args.limit,
        train_steps=args.train_steps,
        train_utterances=args.train_utterances or None,
    )
    return 0


def _add_decoding_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam search width (Whisper and MagnetWhisper; default greedy)",
    )
    p.add_argument(
        "--ctc-weight",
        type=float,
        default=None,
        help="SpeechLLM: joint CTC / LLM beam search at this weight, 0 for none (default: the model's own)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magnet-asr", description="Speech recognition on Whisper with learned boundary compression."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("weights", help="convert the bundled pretrained weights into the cache")
    p.add_argument("names", nargs="*", help="bundled model names (default: all)")
    p.add_argument("--list", action="store_true", help="list bundled models and their status")
    p.add_argument("--json", action="store_true", help="with --list: one JSON object per line")
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    p.set_defaults(func=_cmd_weights)

    p = sub.add_parser("data", help="build a corpus manifest")
    p.add_argument("corpus", choices=["synth", "asterisk", "librispeech", "manifest"])
    p.add_argument("opt_source", nargs="?", metavar="SOURCE", help="manifest: a folder, .tsv or .jsonl list")
    p.add_argument("--out", default=None, help="output directory (default: $MAGNET_ASR_HOME/data/NAME)")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest exists")
    p.add_argument("--num-utterances", dest="opt_num_utterances", type=int, help="synth: total utterances")
    p.add_argument("--seed", dest="opt_seed", type=int)
    p.add_argument("--split", dest="opt_split", help="librispeech: dataset split (e.g. test.clean)")
    p.add_argument("--limit", dest="opt_limit", type=int, help="librispeech/manifest: at most N utterances")
    p.add_argument("--streaming", dest="opt_streaming", action="store_const", const=True)
    p.add_argument("--name", dest="opt_name", help="manifest: corpus name")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("eval", help="decode a corpus split and score it")
    p.add_argument("--model", required=True, help="bundled name, local directory or hub name")
    p.add_argument("--data", required=True, help="corpus name (synth, asterisk), manifest file or folder")
    p.add_argument(
        "--split",
        default=None,
        help="train, validation, test or all (default: test; every row of a list or folder without splits)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="score only the first N utterances of the split")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument(
        "--guards",
        action="store_true",
        help="decode with temperature fallback and the no-speech check (off: greedy, as the README's tables)",
    )
    _add_decoding_options(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "compare", help="WER of system A minus system B over their seeds, with a bootstrap interval"
    )
    p.add_argument("--a", nargs="+", required=True, help="evaluation JSONs of system A, one per seed")
    p.add_argument("--b", nargs="+", required=True, help="evaluation JSONs of system B, same split")
    p.add_argument("--draws", type=int, default=10000, help="bootstrap draws")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    p.add_argument("--out", default=None, help="write the comparison as JSON here")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("transcribe", help="transcribe audio files, one line per file")
    p.add_argument("--model", default="whisper-tiny.en")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--no-guards",
        action="store_true",
        help="plain greedy decoding: no temperature fallback, no empty transcript for silence or noise",
    )
    _add_decoding_options(p)
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_transcribe)

    p = sub.add_parser(
        "export", help="write a saved model in another form (--merge: LoRA merged into the LLM)"
    )
    p.add_argument("model", help="a saved model directory, e.g. runs/speech_llm_demo/final")
    p.add_argument("--merge", action="store_true", required=True, help="merge the LoRA adapters into the LLM")
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("train", help="train from Hydra configs, e.g. `train +experiments=magnet_demo`")
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides (group=option, key=value, +experiments=NAME)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model and every dataset, print their sizes and parameter counts, train nothing",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "sweep", help="one training run per value of a config key, then a WER-vs-compression table"
    )
    p.add_argument(
        "--param", required=True, help="KEY=V1,V2,... e.g. compressor.boundaries_per_unit=1.0,1.7,2.5"
    )
    p.add_argument("--out", default="runs/sweep", help="sweep directory: one run per point, sweep.md")
    p.add_argument("overrides", nargs="*", help="Hydra overrides shared by every point")
    p.set_defaults(func=_cmd_sweep)

    from magnet_asr.evaluation.run_report import add_report_parser
    from magnet_asr.remote.cli import add_remote_parser

    add_report_parser(sub)  # `magnet-asr report RUN_DIR...`

    add_remote_parser(sub)  # `magnet-asr remote deploy|start|attach`

    p = sub.add_parser("demo", help="the main job on the embedded defaults (what `make demo` runs)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--limit", type=int, default=100, help="evaluate at most N utterances per split")
    from magnet_asr.demo import DEMO_TRAIN_STEPS, DEMO_TRAIN_UTTERANCES

    p.add_argument(
        "--train-steps", type=int, default=DEMO_TRAIN_STEPS, help="steps of the short training runs (0: skip)"
    )
    p.add_argument(
        "--train-utterances",
        type=int,
        default=DEMO_TRAIN_UTTERANCES,
        help="training utterances the short runs draw from (0: all)",
    )
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked data-loader workers would deadlock
    if sys.platform == "darwin":
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")  # ops MPS lacks run on the CPU
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("MAGNET_ASR_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"magnet-asr {args.command}: error: {message}", file=sys.stderr)
        return 2
