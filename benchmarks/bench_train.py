"""Benchmark: training throughput, compressed vs uncompressed, for MagnetWhisper and SpeechLLM.

One training step = forward + backward + ``AdamW.step`` (``zero_grad(set_to_none=True)`` first) on a
batch of random 5 s log-mel features (all real frames, mel mask passed) and short transcripts, in
train mode, from random weights built from configs (no downloads, no data loading in the timing):

- ``MagnetWhisper`` at whisper-base dimensions (d_model 512, 6+6 layers, vocab 51865), every parameter
  trained, 16-token labels: ``uncompressed`` vs a boundary predictor before encoder layer 0 or 1 pooling
  exactly ``r`` encoder frames per segment (5x and 10x at layer 0; 5x at layer 1).
- ``SpeechLLM`` (built with :func:`magnet_asr.models.speech_llm.build_speech_llm`, as ``make demo``
  configures it): frozen whisper-tiny.en-sized encoder -> projector -> a random Llama with SmolLM2-135M's
  width (576, 9 heads, 3 KV heads, FFN 1536) but 8 of its 30 layers and a 25-word chat tokenizer, LoRA
  rank 8 on q/k/v/o. ``stack4``: frame stacking k=4 (12.5 audio tokens/s, the fixed-rate baseline);
  ``L4-5x+stack2``: a predictor after the last encoder layer pooling 5x, then stacking k=2 (5 audio
  tokens/s), as ``configs/experiments/speech_llm_demo_compressed.yaml``. The predictor trains, so the
  encoder runs with autograd from it on; the stacking baseline runs the frozen encoder without a graph.

Compression is a fixed pattern (``_common.fix_boundaries``: the predictor's MLP runs and gets gradients,
a fixed pattern decides), so the figures measure the cost of training at exactly ``r``x, not a learned
predictor's choices. Utterances/s = batch / median step time. Peak memory = ``VmHWM - VmRSS`` around one
step after a warm-up step (optimizer state already allocated): the activations and gradients a step adds.
See ``benchmarks/_common.py`` for the measurement details (fresh subprocesses, time vs memory runs).

Usage: ``python benchmarks/bench_train.py [--quick] [--batch B] [--threads T] [--skip-speech-llm]``.
Writes ``benchmarks/results/bench_train.json`` (``bench_train_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    FRAMES_PER_SECOND,
    RESULTS_DIR,
    environment,
    fix_boundaries,
    measure,
    predictor_settings,
    run_worker,
    whisper_kwargs,
    write_json,
)

CLIP_S = 5.0
LABEL_TOKENS = 16
MAGNET_METHODS = ("uncompressed", "L0-5x", "L0-10x", "L1-5x")
SPEECH_LLM_METHODS = ("stack4", "L4-5x+stack2")
TRANSCRIPT = "the cat sat on the mat and the dog sat on a mat"
WORDS = ["system", "user", "assistant", "transcribe", "the", "audio", ".", "a", "cat", "dog", "sat", "on"]
WORDS += ["mat", "and", "hello", "world", "yes", "no", "one", "two"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _parse(method: str) -> tuple[int | None, int | None]:
    """``'L0-5x'`` / ``'L4-5x+stack2'`` -> ``(0, 5)``; methods without a predictor -> ``(None, None)``."""
    if not method.startswith("L"):
        return None, None
    layer, rate = method.split("+")[0].split("-")
    return int(layer[1:]), int(rate[:-1])


# ---- workers (run in a subprocess) -------------------------------------------------------------
def _magnet_step(job: dict[str, Any]):
    import torch

    from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig

    layer, rate = _parse(job["method"])
    extra = (
        {} if layer is None else {"predictor_layers": [layer], "predictor_settings": predictor_settings(rate)}
    )
    config = MagnetWhisperConfig(
        **whisper_kwargs(job["dims"]), decoder_start_token_id=50257, pad_token_id=50256, **extra
    )
    model = MagnetWhisper(config).train()
    for predictor in model.model.encoder.predictors.values():
        fix_boundaries(predictor, rate)
    batch, frames = job["batch"], round(CLIP_S * FRAMES_PER_SECOND)
    features = torch.randn(batch, config.num_mel_bins, frames)
    mask = torch.ones(batch, frames, dtype=torch.long)
    labels = torch.randint(0, 50000, (batch, LABEL_TOKENS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    info: dict[str, Any] = {"trainable_params": sum(p.numel() for p in model.parameters())}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(input_features=features, attention_mask=mask, labels=labels)
        out.loss.backward()
        optimizer.step()
        info["frames_before"] = int(out.frames_before[0])
        info["frames_after"] = int(out.frames_after[0])

    return step, info


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    tokenizer.add_tokens(["<|im_start|>"], special_tokens=True)
    tokenizer.chat_template = CHATML
    return tokenizer


def _speech_llm_step(job: dict[str, Any], workdir: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperForConditionalGeneration

    from magnet_asr.models.processing_speech_llm import prepare_tokenizer
    from magnet_asr.models.speech_llm import build_speech_llm

    kwargs = whisper_kwargs(job["encoder_dims"])
    WhisperForConditionalGeneration(WhisperConfig(**kwargs)).save_pretrained(workdir / "whisper")
    tokenizer = prepare_tokenizer(_tiny_tokenizer())
    llm_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=3,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(llm_config).save_pretrained(workdir / "llm")
    tokenizer.save_pretrained(workdir / "llm")

    layer, rate = _parse(job["method"])
    settings: dict[str, Any] = {"projector_stack": 4, "lora_rank": 8, "encoder_cache_gb": 0.0}
    if layer is not None:
        settings["projector_stack"] = 2
        settings["encoder_settings"] = {
            "predictor_layers": [layer],
            "predictor_settings": predictor_settings(rate),
        }
    model, _ = build_speech_llm(
        str(workdir / "whisper"), str(workdir / "llm"), tokenizer=tokenizer, **settings
    )
    model.train()
    for predictor in model.encoder.predictors.values():
        fix_boundaries(predictor, rate)
    batch, frames = job["batch"], round(CLIP_S * FRAMES_PER_SECOND)
    features = torch.randn(batch, kwargs["num_mel_bins"], frames)
    mask = torch.ones(batch, frames, dtype=torch.long)
    response = model.prompt.response_ids(tokenizer, TRANSCRIPT)
    labels = torch.tensor([response] * batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    info: dict[str, Any] = {
        "trainable_params": sum(p.numel() for p in trainable),
        "label_tokens": len(response),
    }

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(input_features=features, attention_mask=mask, labels=labels)
        out.loss.backward()
        optimizer.step()
        info["frames_before"] = int(out.frames_before[0])
        info["audio_tokens"] = int(out.frames_after[0])
        info["llm_sequence"] = int(out.attention_mask.shape[1])

    return step, info


def _worker(job: dict[str, Any]) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if job["family"] == "magnet":
            step, info = _magnet_step(job)
        else:
            step, info = _speech_llm_step(job, Path(tmp))
        result = measure(step, job["mode"], job["min_repeats"], job["max_repeats"], job["budget"])
    return {**result, **info}


# ---- driver ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny.en dims, batch 2, fewer methods (a smoke run)"
    )
    parser.add_argument(
        "--dims", default="base", choices=["tiny.en", "base", "small"], help="MagnetWhisper size"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip-speech-llm", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable ratios on a shared CPU)"
    )
    parser.add_argument("--min-repeats", type=int, default=2)
    parser.add_argument("--max-repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed steps per method (soft)")
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/bench_train*.json)"
    )
    args = parser.parse_args()
    default = RESULTS_DIR / ("bench_train_quick.json" if args.quick else "bench_train.json")
    output = Path(args.output) if args.output else default
    dims, batch = ("tiny.en", 2) if args.quick else (args.dims, args.batch)
    magnet_methods = ("uncompressed", "L0-5x") if args.quick else MAGNET_METHODS

    env = environment(args.threads)
    print(f"training step (forward + backward + AdamW), random {CLIP_S:.0f} s features, batch {batch}")
    print(f"load average (1, 5, 15 min) at start: {env['load_average_at_start']}")
    print(
        f"torch {env['torch']}, transformers {env['transformers']}, {args.threads} thread(s), {os.cpu_count()} CPUs"
    )
    common = {
        "batch": batch,
        "threads": args.threads,
        "min_repeats": args.min_repeats,
        "max_repeats": args.max_repeats,
        "budget": args.budget,
    }
    groups: list[tuple[str, str, tuple[str, ...], dict]] = [
        ("magnet", f"MagnetWhisper {dims}", magnet_methods, {"dims": dims}),
    ]
    if not args.skip_speech_llm:
        groups.append(
            (
                "speech_llm",
                "SpeechLLM tiny.en enc + Llama 576x8",
                SPEECH_LLM_METHODS,
                {"encoder_dims": "tiny.en"},
            )
        )
    tables = []
    for family, title, methods, extra in groups:
        results: dict[str, dict] = {}
        for method in methods:
            job = {**common, **extra, "family": family, "method": method}
            timed = run_worker(__file__, job, "time")
            memory = run_worker(__file__, job, "memory")
            entry = {**timed, "peak_mib": memory["peak_mib"], "resident_mib": memory["resident_mib"]}
            entry["utterances_per_s"] = batch / (entry["time_ms"] / 1e3)
            results[method] = entry
            print(f"  measured {title} {method}", file=sys.stderr)
        base = results[methods[0]]
        for entry in results.values():
            entry["throughput_vs_" + methods[0]] = entry["utterances_per_s"] / base["utterances_per_s"]
            entry["memory_vs_" + methods[0]] = entry["peak_mib"] / max(base["peak_mib"], 1e-9)
        tables.append({"family": family, "title": title, "baseline": methods[0], "results": results, **extra})
    _print_tables(tables)
    report = {
        "benchmark": "training throughput, compressed vs uncompressed",
        **env,
        "clip_s": CLIP_S,
        "batch": batch,
        "compression_method": "fixed pattern: one boundary every r encoder frames (predictor MLP runs, x0)",
        "tables": tables,
    }
    write_json(output, report)


def _print_tables(tables: list[dict]) -> None:
    for table in tables:
        base = table["baseline"]
        print(f"\n{table['title']} (ratios vs {base})")
        tokens = "audio tok" if table["family"] == "speech_llm" else "enc frames"
        header = (
            f"  {'method':<14}{tokens:>11}{'step ms':>10}{'utt/s':>8}{'peak MiB':>10}{'resident':>10}"
            f"{'throughput':>12}{'mem':>7}"
        )
        print(header)
        print("  " + "-" * (len(header) - 2))
        for method, e in table["results"].items():
            after = e.get("audio_tokens", e.get("frames_after"))
            frames = f"{e['frames_before']}>{after}" if after != e["frames_before"] else str(after)
            print(
                f"  {method:<14}{frames:>11}{e['time_ms']:>10.0f}{e['utterances_per_s']:>8.2f}{e['peak_mib']:>10.0f}"
                f"{e['resident_mib']:>10.0f}{e['throughput_vs_' + base]:>11.2f}x{e['memory_vs_' + base]:>6.2f}x"
            )
    print("\npeak MiB: extra memory of one step (activations, gradients); resident: before the step")
    print("(weights, optimizer state, inputs, interpreter); throughput and mem are ratios to the first row")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        main()
