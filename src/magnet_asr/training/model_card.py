"""The model card (``README.md``) a training run writes into its ``final/`` directory.

Hugging Face's convention: YAML metadata (``base_model``, ``tags``, ``pipeline_tag``), then what the model is,
what it was trained on, how long, the test results, and the command that reproduces it. Only names appear,
never a path of the machine that trained it, so the directory can be copied or pushed as it is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from magnet_asr.models.speech_llm import hub_name

CARD_NAME = "README.md"


def base_models(cfg: Any) -> list[str]:
    """Hub names (bundled names mapped to their hub equivalents) of the pretrained parts a run starts from;
    a local directory by its last component."""
    names = [hub_name(cfg.encoder.name)]
    if cfg.model == "speech_llm":
        names.append(hub_name(cfg.llm.name))
    return [_name(n) for n in names]


def _name(value: str) -> str:
    """A model or data name as the card shows it: a local path becomes its last component."""
    return Path(value).name if Path(value).is_absolute() else value


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~<>])/[^\s,\]\[\'\"]+")


def portable_command(command: str) -> str:
    """``command`` with every absolute path shown as ``<local>/NAME``: the card names what was used, not
    where it lay on the machine that trained it."""
    return _ABSOLUTE_PATH.sub(lambda m: f"<local>/{Path(m.group(0)).name}", command)


def _results_table(test: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| test data | WER | CER | compression | utterances |", "|---|---|---|---|---|"]
    for spec, summary in test.items():
        cells = [summary.get(k) for k in ("wer", "cer", "mean_compression")]
        shown = ["-" if v is None else f"{v:.4f}" for v in cells]
        rows.append(f"| {_name(spec)} test | {' | '.join(shown)} | {summary.get('num_utterances')} |")
    return rows


LLM_TRAINING = {"lora": "LLM with LoRA", "full": "LLM fine-tuned in full", "frozen": "frozen LLM"}


def model_card(cfg: Any, results: dict[str, Any], command: str | None, steps: int) -> str:
    """The card's text for run config ``cfg``, its ``results`` (``results.json``: ``test`` per data spec),
    the ``command`` that trained it (None: not known, e.g. a run started from Python) and ``steps`` done."""
    bases = base_models(cfg)
    family = (
        "MagnetWhisper (Whisper with learned boundary compression)"
        if cfg.model == "magnet_whisper"
        else f"SpeechLLM (frozen Whisper encoder, audio projector, {LLM_TRAINING[cfg.llm.finetune]})"
    )
    compressor = (
        f"boundary predictor(s) at encoder layer(s) {list(cfg.compressor.layers)}, target "
        f"`{cfg.compressor.target}`"
        if cfg.compressor.enabled
        else "no boundary predictor"
    )
    lines = [
        "---",
        "library_name: magnet-asr",
        "pipeline_tag: automatic-speech-recognition",
        "tags:",
        "- automatic-speech-recognition",
        "- magnet-asr",
        "base_model:",
        *[f"- {b}" for b in bases],
        "---",
        "",
        f"# {cfg.run_name}",
        "",
        f"{family}, trained with magnet-asr.",
        "",
        f"- Base models: {', '.join(f'`{b}`' for b in bases)}",
        f"- Compression: {compressor}",
        f"- Distillation: {'from `' + _name(cfg.distillation.teacher or cfg.encoder.name) + '`' if cfg.distillation.enabled else 'none'}",
        f"- Training data: {', '.join(f'`{_name(d)}`' for d in cfg.data.train)} (train splits)",
        f"- Steps: {steps} (batch {cfg.training.per_device_batch_size} per device, learning rate "
        f"{cfg.training.learning_rate:g})"
        + (
            f"; weights: the mean of the checkpoints at steps {', '.join(map(str, results['averaged_checkpoints']))}"
            if results.get("averaged_checkpoints")
            else ""
        ),
        f"- Trained with: `{portable_command(command)}`"
        if command
        else "- Trained from the config saved beside this directory (`../config.yaml`)",
        "",
        "## Test results",
        "",
        *_results_table(results.get("test", {})),
        "",
        "WER and CER after Whisper's English text normalization; compression: encoder frames (50/s) per frame",
        "the decoder reads.",
        "",
        "## Use",
        "",
        "```bash",
        "magnet-asr transcribe --model THIS_DIRECTORY audio.wav",
        "```",
        "",
        "```python",
        "import magnet_asr  # registers the model type with transformers",
        "from transformers import pipeline",
        "",
        'asr = pipeline("automatic-speech-recognition", model="THIS_DIRECTORY")',
        'print(asr("audio.wav")["text"])',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    directory: Path, cfg: Any, results: dict[str, Any], command: str | None, steps: int
) -> Path:
    path = Path(directory) / CARD_NAME
    path.write_text(model_card(cfg, results, command, steps), encoding="utf-8")
    return path
