"""Typed schemas for a run, registered in Hydra's ConfigStore.

The YAML files in ``configs/`` only override these dataclasses: composing a file with a key the
schema does not have fails (Hydra struct mode), so a typo is an error, not a silently ignored
setting. ``load_run_config`` composes ``configs/config.yaml`` with command-line overrides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from magnet_asr.models.processing_speech_llm import DEFAULT_INSTRUCTION
from magnet_asr.models.speech_llm import LORA_TARGET_MODULES
from magnet_asr.text import MAX_NEW_TOKENS_PER_SECOND

MODEL_FAMILIES = ("whisper", "magnet_whisper", "speech_llm")
WHISPER_TASKS = ("transcribe", "translate")


@dataclass
class EncoderConfig:
    name: str = "whisper-tiny.en"  # bundled name, local directory or hub name
    freeze: bool = False
    # SpeechLLM with freeze=true: the top N layers and the final layer norm train (learning rate:
    # training.encoder_learning_rate); the frozen layers below run once per utterance, their output cached
    train_layers: int = 0
    position_encoding: str = "learned"  # learned (Whisper's, sliced) | rope
    extra_conv_strides: list[int] = field(default_factory=list)  # fixed-rate baseline after the conv stem
    gradient_checkpointing: bool = False
    # the decoder prompt of a multilingual Whisper, in training labels and in decoding alike (an
    # English-only model, *.en, has no language or task token and ignores both)
    language: str = "en"
    task: str = "transcribe"  # transcribe | translate

    def __post_init__(self) -> None:
        if self.train_layers < 0:
            raise ValueError(f"encoder.train_layers must be >= 0, got {self.train_layers}")
        if self.task not in WHISPER_TASKS:
            raise ValueError(f"encoder.task: '{self.task}' is not one of {', '.join(WHISPER_TASKS)}")


@dataclass
class CompressorConfig:
    enabled: bool = False
    layers: list[int] = field(default_factory=lambda: [1])  # encoder layers that get a predictor
    variant: str = "mlp"  # mlp | cosine
    target: str = "phoneme"  # phoneme | syllable | fixed
    # segments per phoneme / syllable: 1.0 is MAGNET's one per unit; above 1 compresses less (sub-unit
    # segments), below 1 more
    boundaries_per_unit: float = 1.0
    compression: float = 5.0  # target factor for `fixed`, and the prior rate 1/compression
    pooling: str = "mean"  # mean | attention
    temperature: float = 1.0
    threshold: float = 0.5
    # also keep local maxima of p above this (None: off); a calibrated predictor splits an uncertain
    # boundary between two frames, where p > threshold fires at neither (compression.predictor)
    peak_threshold: float | None = None
    loss: str = "binomial"  # binomial | ratio | repulsion
    loss_weight: float = 1.0
    reembed_positions: bool = False
    # gumbel: binary Concrete sample in training (rate = p, so eval at p > threshold differs; docs/architecture.md);
    # threshold: the eval decision in training too, straight-through on p (H-Net)
    train_sampling: str = "gumbel"
    repulsion_distance: int = 2
    # weight (beside `loss`, weight 1) of the predictor's `phones` loss: cross-entropy toward the true
    # phone ends where the data has them (flite synth utterances), split up to the target count; 0 = off
    phone_supervision_weight: float = 0.0
    # split segments longer than this many frames into near-equal parts, in training and evaluation
    # (None: no cap); with one boundary per phone, 4 frames (80 ms) pools flite speech ~3x
    max_segment_frames: int | None = None
    # with max_segment_frames: at least ceil(frames / max_compression) segments per utterance (a tighter
    # cap where the predictor leaves fewer); None: no floor
    max_compression: float | None = None
    input_norm: bool = True  # LayerNorm before the mlp predictor (Whisper's activations are large)
    # attention that reads pooled segments adds log(segment frames) to its logits (Token Merging); off:
    # on magnet_demo it was worse (validation WER 0.94 vs 0.36 at step 250, 2026-12-01)
    proportional_attention: bool = False
    # schedules (magnet_asr.compression.schedules), driven by training.callbacks.ScheduleCallback
    temperature_end: float | None = None  # anneal the Gumbel temperature to this value
    curriculum: str = "none"  # none | linear | cosine | staircase: compression from 1x to the target
    curriculum_ramp: float = 0.5  # fraction of training the curriculum takes
    loss_warmup_steps: int = 0  # ramp the boundary-loss weight from 0
    predictor_only_steps: int = 0  # train only the predictors for the first N steps


@dataclass
class ProjectorConfig:
    stack: int = 4  # frames stacked per audio token (k=4: 12.5 tokens/s)
    hidden_size: int = 1024
    dropout: float = 0.0
    # Transformer layers over the audio tokens after the MLP, so a token reads its neighbours
    # (models/projector.py); num_heads must divide the LLM width
    num_layers: int = 0
    num_heads: int = 8
    # SpeechLLM: memory for the outputs of a frozen encoder without predictors (the projector's inputs,
    # the same every epoch), cached by utterance; 0 disables
    encoder_cache_gb: float = 2.0
    # auxiliary CTC loss of the audio tokens against the LLM's token embeddings (0 = off); it shortens
    # the projector's alignment phase (models/projector.py, EmbeddingCTCHead)
    ctc_loss_weight: float = 0.0
    # steps of CTC alone (projector and predictors, no LLM forward) before the LLM trains; needs
    # ctc_loss_weight > 0. Cheap: 0.2-0.5 s a step on this CPU against ~5 s for a step with the LLM
    ctc_warmup_steps: int = 0
    # learned compression by the CTC head: the LLM reads only the audio tokens where CTC emits a token
    # (blanks dropped, repeats merged), about the transcript's token rate; needs ctc_loss_weight > 0
    ctc_compression: bool = False
    # with ctc_compression: an audio token also reaches the LLM where the blank's probability is below
    # this (a word CTC is unsure of), not only where the blank loses the argmax; null = argmax only
    ctc_blank_threshold: float | None = None
    # with ctc_compression: at most floor(rate x seconds) audio tokens per utterance (at least one); one
    # with more keeps the most certain (lowest blank probability); null = no budget
    ctc_max_tokens_per_second: float | None = None
    # with ctc_compression: spikes (the LLM reads each emission's own audio tokens, blanks dropped) or
    # segments (every audio token pooled into its nearest emission, weighted by 1 - P(blank): same count)
    ctc_pooling: str = "spikes"


@dataclass
class LLMConfig:
    name: str = "smollm2-135m-instruct"
    finetune: str = "lora"  # lora | full | frozen
    # with finetune=full: the token embedding table and the output head (tied on SmolLM2) stay as
    # pretrained; LoRA and frozen never train them
    freeze_embeddings: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    prompt: str = DEFAULT_INSTRUCTION
    system_prompt: str | None = None  # None: the chat template's own default system turn
    gradient_checkpointing: bool = False
    # decoding (SpeechLLM generate)
    num_beams: int = 1
    max_new_tokens_per_second: float = MAX_NEW_TOKENS_PER_SECOND  # per-sample cap: floor + rate x seconds
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    loop_guard: bool = True  # stop and trim repetition loops
    # transcribe clips longer than this in windows cut at pauses (null: the encoder's 30 s); see
    # models/speech_llm_generation.DecodeSettings
    max_window_seconds: float | None = None
    # joint CTC / LLM beam search (models/ctc_prefix_score.py): each hypothesis scored
    # (1 - ctc_weight) * LLM + ctc_weight * the CTC head's prefix score; needs projector.ctc_loss_weight > 0
    ctc_weight: float = 0.0
    ctc_pre_beam: int | None = None  # next tokens scored by CTC per hypothesis; null: 1.5 x num_beams


@dataclass
class DistillationConfig:
    """Distillation from the uncompressed teacher (magnet_asr.training.distillation); off by default."""

    enabled: bool = False
    # bundled name, local directory or hub name; None: the pretrained checkpoint the student starts
    # from (encoder.name), run the standard Whisper way (30 s padded input, eval, no gradient)
    teacher: str | None = None
    encoder_weight: float = 1.0  # normalized MSE of the upsampled student frames vs the teacher's
    logits_weight: float = 1.0  # KL(teacher || student) of next-token distributions, times T^2
    temperature: float = 1.0
    label_weight: float = 1.0  # weight of the hard-label ASR loss beside the distillation parts
    top_k: int = 32  # teacher next-token log-probabilities kept per label position in the cache
    # where teacher outputs are cached (one file per utterance); None: <training.output_dir>/teacher_cache.
    # Runs that share a teacher and data may share a directory: entries are keyed by teacher and utterance
    cache_dir: str | None = None
    batch_size: int = 8  # teacher batch size while prefilling the cache
    # fill the cache for every training utterance before the first step; otherwise each entry is
    # computed when training first draws its utterance (only what max_steps reaches is ever computed)
    prefill: bool = False

    def __post_init__(self) -> None:
        for name in ("encoder_weight", "logits_weight", "label_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"distillation.{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"distillation.temperature must be > 0, got {self.temperature}")
        if self.top_k < 1 or self.batch_size < 1:
            raise ValueError("distillation.top_k and distillation.batch_size must be >= 1")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["synth", "asterisk"])
    validation: list[str] = field(default_factory=lambda: ["asterisk"])
    test: list[str] = field(default_factory=lambda: ["asterisk", "synth"])
    max_seconds: float = 30.0
    # how many times a `train` corpus is listed per epoch, by its spec (others: once), so that a small corpus
    # of real speech keeps its share of the batches beside a large synthetic one: {asterisk: 5}
    train_repeats: dict[str, int] = field(default_factory=dict)
    max_train_utterances: int | None = None
    max_eval_utterances: int | None = None
    num_workers: int = 0
    # where `librispeech:SPLIT` specs are read before the hub: a LibriSpeech folder (train-clean-100/,
    # dev-clean/...) or a local `datasets` dataset (save_to_disk folder, parquet files) with those splits
    librispeech_root: str | None = None
    # train from a `datasets` IterableDataset, decoding on the fly, without wav copies
    # (magnet_asr.data.streaming); needs training.max_steps. Validation and test are still read as manifests
    streaming: bool = False
    # streamed rows held (encoded) at a time and cut into duration-sorted batches; more: less padding, more memory
    stream_buffer_size: int = 500

    def __post_init__(self) -> None:
        if self.stream_buffer_size < 1:
            raise ValueError(f"data.stream_buffer_size must be >= 1, got {self.stream_buffer_size}")
        bad = {spec: count for spec, count in self.train_repeats.items() if count < 1}
        if bad:
            raise ValueError(f"data.train_repeats: counts must be >= 1, got {bad}")


@dataclass
class TrainingConfig:
    output_dir: str = "runs/${run_name}"
    max_steps: int = 1000
    num_train_epochs: float = 1.0
    per_device_batch_size: int = 8
    max_batch_seconds: float | None = None  # dynamic batching by total audio duration
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    projector_learning_rate: float | None = None
    predictor_learning_rate: float | None = None
    encoder_learning_rate: float | None = None  # SpeechLLM: the layers encoder.train_layers trains
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 0
    logging_steps: int = 10
    eval_steps: int = 200
    save_steps: int = 200
    save_total_limit: int = 3
    # final/ holds the mean weights of the last N checkpoints validated at the target compression instead
    # of the one with the best validation WER (training.averaging, issue 12); 0 or 1: off. It needs
    # save_steps a multiple of eval_steps and save_total_limit >= N + 1 (the best one is kept besides)
    average_checkpoints: int = 0
    # Hugging Face's: final/ holds the checkpoint with the best validation WER; false: the last step's
    # (validation still runs), where the validation set is too small to pick a step by (issue 15)
    load_best_model_at_end: bool = True
    resume_from_checkpoint: str | None = None  # path, or `auto` for the newest complete checkpoint
    # a saved model directory (runs/NAME/final) whose tensors start this run, where the names and shapes
    # match (training.builders.initialize_from): a compressed student starts where its uncompressed teacher
    # ended (speech_llm_demo_ctc). Frozen parts still come from their named sources
    init_from: str | None = None
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    device: str = "auto"
    # print a hash of the trained parameters on every rank at the end (DDP ranks must agree); it reads
    # each trained tensor once more, so it is off unless a check asks for it
    log_weights_checksum: bool = False
    # an evaluation (validation during training, the test sets after it) that skipped more than this
    # share of its utterances (unreadable or empty audio) fails the run; null allows any share
    max_eval_skip_fraction: float | None = 0.1
    # GRPO on the boundary predictors instead of supervised training (magnet_asr.training.grpo)
    grpo: bool = False
    grpo_num_samples: int = 4  # K boundary configurations per utterance
    grpo_penalty: str = "count"  # count | boundary | none: compression penalty in the reward
    grpo_penalty_weight: float = 1.0  # lambda: reward = -ASR loss - lambda * penalty
    grpo_clip_epsilon: float | None = 0.2  # PPO clip range; null: unclipped
    grpo_num_iterations: int = 1  # optimizer steps per rollout (the ratio differs from 1 from the 2nd on)
    grpo_boundary_loss_weight: float = 0.0  # + predictors' supervised boundary loss (anchors eval rate)
    grpo_asr_loss_weight: float = 0.0  # also train on the sampled configurations' ASR loss (train_all)
    grpo_train_all: bool = False  # false: only the predictors train

    def __post_init__(self) -> None:
        count = self.average_checkpoints
        if count < 0:
            raise ValueError(f"training.average_checkpoints must be >= 0, got {count}")
        if count > 1 and (not self.eval_steps or self.save_steps % self.eval_steps):
            raise ValueError(
                "training.average_checkpoints needs a validation at every checkpoint: training.save_steps "
                f"({self.save_steps}) a multiple of training.eval_steps ({self.eval_steps})"
            )
        if count > 1 and 0 < self.save_total_limit <= count:
            raise ValueError(
                f"training.average_checkpoints={count} needs training.save_total_limit >= {count + 1} "
                f"(the best checkpoint is kept besides the newest), got {self.save_total_limit}"
            )


@dataclass
class RunConfig:
    run_name: str = "default"
    model: str = "magnet_whisper"  # one of MODEL_FAMILIES
    encoder: EncoderConfig = MISSING
    compressor: CompressorConfig = MISSING
    projector: ProjectorConfig = MISSING
    llm: LLMConfig = MISSING
    distillation: DistillationConfig = MISSING
    data: DataConfig = MISSING
    training: TrainingConfig = MISSING

    def __post_init__(self) -> None:
        if self.model not in MODEL_FAMILIES:
            raise ValueError(f"model: '{self.model}' is not one of {', '.join(MODEL_FAMILIES)}")


GROUP_SCHEMAS: dict[str, type] = {
    "encoder": EncoderConfig,
    "compressor": CompressorConfig,
    "projector": ProjectorConfig,
    "llm": LLMConfig,
    "distillation": DistillationConfig,
    "data": DataConfig,
    "training": TrainingConfig,
}


def register_configs() -> None:
    """Register the schemas: ``base_config`` for the whole run and ``base_<group>`` in each group."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)


def configs_dir() -> Path:
    """``$MAGNET_ASR_CONFIGS``, else the repository's ``configs/`` next to ``src/``."""
    env = os.environ.get("MAGNET_ASR_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs"


def load_run_config(overrides: list[str] | None = None, config_name: str = "config") -> Any:
    """Compose ``configs/<config_name>.yaml`` with Hydra ``overrides``; returns a typed DictConfig.

    Raises ``ValueError`` with Hydra's one-line reason for an unknown key or bad value.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    directory = configs_dir()
    if not directory.is_dir():
        raise ValueError(f"{directory}: configs directory not found (set MAGNET_ASR_CONFIGS)")
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
        OmegaConf.to_object(cfg)  # runs __post_init__ checks
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        # Hydra spreads the reason over several lines (and the key over the last ones): keep one line.
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"config: {reason}") from None
    return cfg
