"""SpeechLLM: Whisper encoder (+ learned compression) -> ``AudioProjector`` -> decoder-only LLM.

The "speech encoder + projector + LLM" recognizer of SLAM-ASR (Ma et al., 2024) and Ultravox, with
this toolkit's edge: boundary predictors inside the encoder (``models/encoder.py``) can pool the frames
before the projector stacks them, so the LLM reads far fewer audio tokens.

::

    features (B, n_mels, T) + mel mask (B, T)
      -> MagnetWhisperEncoder (frozen by default; predictors train)  -> (B, S, D) + mask (B, S)
      -> AudioProjector (stack k, MLP, RMSNorm)                      -> (B, A, H) + mask (B, A)
      -> ChatPrompt.assemble: prefix + <audio> * A_i + suffix + response  (see models/processing_speech_llm.py)
      -> <audio> positions overwritten with the projector outputs -> LLM (LoRA / full / frozen)

What is saved (``save_pretrained``) is only what trains: projector, predictors, LoRA adapters (the
whole LLM / encoder when they are fine-tuned), plus a config naming the frozen sources (bundled name,
local directory or hub name), which ``from_pretrained`` loads again.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from magnet_asr.audio import FRAMES_PER_SECOND
from magnet_asr.data.collator import IGNORE_INDEX
from magnet_asr.models.ctc_prefix_score import CTCEmissions
from magnet_asr.models.encoder import MagnetEncoderOutput, MagnetWhisperEncoder
from magnet_asr.models.processing_speech_llm import DEFAULT_INSTRUCTION, ChatPrompt
from magnet_asr.models.projector import CTC_POOLING, AudioProjector, embedding_rms, merge_ctc_spikes

__all__ = [
    "AudioEmbeddings",
    "LLMInputs",
    "SpeechLLM",
    "SpeechLLMConfig",
    "SpeechLLMOutput",
    "build_speech_llm",
]

FINETUNE_MODES = ("lora", "full", "frozen")
ADAPTER_FOLDER = "adapter"  # PEFT adapter files of a saved LoRA SpeechLLM
# A frozen part loaded from a local directory is copied under SOURCES_FOLDER/<field> of a saved model and named
# there relative to it, so the saved directory can be copied or pushed and still load (issue 13).
SOURCES_FOLDER = "sources"
SOURCE_FIELDS = ("encoder_name", "llm_name")
# generate() keywords a transformers pipeline passes that the chat prompt already decides
PIPELINE_IGNORED = ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id")
# from_pretrained() keywords transformers' loaders pass that mean nothing for a local SpeechLLM directory
# (AutoModel passes the hub-download ones since transformers 5.25)
LOADER_IGNORED = (
    "_from_auto",
    "_from_pipeline",
    "adapter_kwargs",
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "trust_remote_code",
)
LORA_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
)  # all four attention projections (Hu et al. 2021, sec. 7.1)


class SpeechLLMConfig(PretrainedConfig):
    """What a SpeechLLM is made of. Frozen parts are *named*, not stored.

    encoder_name / llm_name: Whisper checkpoint and causal LM (bundled name, local dir or hub name).
    encoder_settings: ``MagnetWhisperConfig`` keyword arguments (``predictor_layers``,
        ``predictor_settings``, ``position_encoding``, ``extra_conv_strides``).
    freeze_encoder: train only the predictors inside the encoder.
    encoder_train_layers: with ``freeze_encoder`` and no predictors, the top N encoder layers and the final
        layer norm train too; the layers below stay frozen, and their output is what the cache holds.
    llm_finetune: ``lora`` | ``full`` | ``frozen``; ``lora_*``: the peft ``LoraConfig``.
    llm_freeze_embeddings: with ``full``, the LLM's input token embeddings and output head keep their
        pretrained weights (not trained, not saved); ``lora`` and ``frozen`` never train them.
    projector_*: :class:`AudioProjector` settings (``projector_stack`` = k).
    ctc_loss_weight: weight of the auxiliary CTC loss of the audio tokens against the LLM's token
        embeddings (:class:`~magnet_asr.models.projector.EmbeddingCTCHead`); 0 = no CTC head.
    ctc_compression: pass the LLM only the audio tokens where that head emits a token
        (:func:`~magnet_asr.models.projector.merge_ctc_spikes`): learned compression to about the
        transcript's token rate.
    ctc_blank_threshold: with ``ctc_compression``, an audio token also reaches the LLM where the blank's
        probability is below this, not only where the blank loses the argmax (None: argmax only).
    ctc_max_tokens_per_second: with ``ctc_compression``, a budget of ``max(1, floor(rate x seconds))``
        audio tokens per utterance; one with more keeps its most certain (None: no budget).
    ctc_pooling: with ``ctc_compression``, ``spikes`` (each emission's own audio tokens, blanks dropped) or
        ``segments`` (every audio token pooled into its nearest emission, weighted by ``1 - P(blank)``).
    prompt: :meth:`ChatPrompt.to_dict` (the rendered template ids; training and inference share it).
    decoding: defaults of ``models/speech_llm_generation.DecodeSettings`` (``num_beams``, token caps,
        ``repetition_penalty``, ``loop_guard``...). A dict: transformers reserves those names at top level.
    encoder_cache_gb: memory for the frozen encoder's outputs by utterance (0 disables).
    """

    model_type = "speech_llm"

    def __init__(
        self,
        encoder_name: str | None = None,
        encoder_settings: dict[str, Any] | None = None,
        freeze_encoder: bool = True,
        encoder_train_layers: int = 0,
        llm_name: str | None = None,
        llm_finetune: str = "lora",
        llm_freeze_embeddings: bool = False,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        projector_stack: int = 4,
        projector_hidden_size: int = 1024,
        projector_dropout: float = 0.0,
        projector_num_layers: int = 0,
        projector_num_heads: int = 8,
        boundary_loss_weight: float = 1.0,
        ctc_loss_weight: float = 0.0,
        ctc_compression: bool = False,
        ctc_blank_threshold: float | None = None,
        ctc_max_tokens_per_second: float | None = None,
        ctc_pooling: str = "spikes",
        prompt: dict[str, Any] | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        system_prompt: str | None = None,
        decoding: dict[str, Any] | None = None,
        encoder_cache_gb: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encoder_name = encoder_name
        self.encoder_settings = dict(encoder_settings or {})
        self.freeze_encoder = bool(freeze_encoder)
        self.encoder_train_layers = int(encoder_train_layers)
        self.llm_name = llm_name
        self.llm_finetune = llm_finetune
        self.llm_freeze_embeddings = bool(llm_freeze_embeddings)
        self.lora_rank = int(lora_rank)
        self.lora_alpha = int(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        self.lora_target_modules = list(lora_target_modules or LORA_TARGET_MODULES)
        self.projector_stack = int(projector_stack)
        self.projector_hidden_size = int(projector_hidden_size)
        self.projector_dropout = float(projector_dropout)
        self.projector_num_layers = int(projector_num_layers)
        self.projector_num_heads = int(projector_num_heads)
        self.boundary_loss_weight = float(boundary_loss_weight)
        self.ctc_loss_weight = float(ctc_loss_weight)
        self.ctc_compression = bool(ctc_compression)
        self.ctc_blank_threshold = None if ctc_blank_threshold is None else float(ctc_blank_threshold)
        rate = ctc_max_tokens_per_second
        self.ctc_max_tokens_per_second = None if rate is None else float(rate)
        self.ctc_pooling = ctc_pooling
        self.prompt = dict(prompt) if prompt else None
        self.instruction, self.system_prompt = instruction, system_prompt
        self.decoding = dict(decoding or {})
        self.encoder_cache_gb = float(encoder_cache_gb)
        if self.llm_finetune not in FINETUNE_MODES:
            raise ValueError(f"llm_finetune: '{self.llm_finetune}' is not one of {FINETUNE_MODES}")
        if self.encoder_train_layers < 0:
            raise ValueError(f"encoder_train_layers must be >= 0, got {self.encoder_train_layers}")
        if self.encoder_train_layers and (not self.freeze_encoder or self.predictor_layers):
            raise ValueError(
                "encoder_train_layers needs freeze_encoder=True and no predictor_layers "
                "(it trains the top of an otherwise frozen, cached encoder)"
            )
        if self.projector_stack < 1:
            raise ValueError(f"projector_stack must be >= 1, got {self.projector_stack}")
        if self.ctc_loss_weight < 0:
            raise ValueError(f"ctc_loss_weight must be >= 0, got {self.ctc_loss_weight}")
        if self.ctc_compression and self.ctc_loss_weight <= 0:
            raise ValueError("ctc_compression needs the CTC head: set ctc_loss_weight > 0")
        if self.ctc_blank_threshold is not None and not 0 < self.ctc_blank_threshold <= 1:
            raise ValueError(f"ctc_blank_threshold must be in (0, 1], got {self.ctc_blank_threshold}")
        if self.ctc_max_tokens_per_second is not None:
            if not self.ctc_compression:
                raise ValueError("ctc_max_tokens_per_second needs ctc_compression")
            if not self.ctc_max_tokens_per_second > 0:
                raise ValueError(
                    f"ctc_max_tokens_per_second must be > 0, got {self.ctc_max_tokens_per_second}"
                )
        if self.ctc_pooling not in CTC_POOLING:
            raise ValueError(f"ctc_pooling: '{self.ctc_pooling}' is not one of {CTC_POOLING}")
        from magnet_asr.models.speech_llm_generation import DecodeSettings

        decoding = DecodeSettings.from_config(self)  # unknown or invalid keys fail here, not at decode time
        if decoding.ctc_weight > 0 and self.ctc_loss_weight <= 0:
            raise ValueError("decoding ctc_weight > 0 needs the CTC head: set ctc_loss_weight > 0")

    @property
    def predictor_layers(self) -> list[int]:
        return [int(k) for k in self.encoder_settings.get("predictor_layers") or []]


# AutoConfig must know the type: AutoTokenizer reads config.json of a saved SpeechLLM directory.
AutoConfig.register(SpeechLLMConfig.model_type, SpeechLLMConfig, exist_ok=True)


@dataclass
class AudioEmbeddings:
    """Projector outputs: ``embeds (B, A, H)``, ``mask (B, A)``; per sample ``frames_before (B,)``
    encoder frames, ``seconds (B,)`` of audio, ``silent (B,)`` (no signal: decode to ``""``).
    ``projected`` / ``projected_mask``: the projector's outputs before CTC compression (what the CTC
    loss scores); the same tensors as ``embeds`` / ``mask`` without it."""

    embeds: torch.Tensor
    mask: torch.Tensor
    frames_before: torch.Tensor
    seconds: torch.Tensor
    silent: torch.Tensor
    boundary_loss: torch.Tensor | None = None
    boundary_outputs: tuple[Any, ...] | None = None
    projected: torch.Tensor | None = None
    projected_mask: torch.Tensor | None = None

    @property
    def counts(self) -> torch.Tensor:
        """Audio tokens per sample ``(B,)``."""
        return self.mask.sum(1)

    @property
    def ctc_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the CTC head reads: the projector outputs before CTC compression and their mask."""
        if self.projected is not None and self.projected_mask is not None:
            return self.projected, self.projected_mask
        return self.embeds, self.mask

    def select(self, rows: list[int]) -> AudioEmbeddings:
        """The samples ``rows``, trimmed to their longest audio-token count (``projected`` to its own)."""
        index = torch.tensor(rows, device=self.mask.device)

        def trimmed(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            width = max(int(mask[index].sum(1).max()), 1) if rows else 1
            return embeds[index, :width], mask[index, :width]

        projected = (
            trimmed(self.projected, self.projected_mask)
            if self.projected is not None and self.projected_mask is not None
            else (None, None)
        )
        return AudioEmbeddings(
            *trimmed(self.embeds, self.mask),
            self.frames_before[index],
            self.seconds[index],
            self.silent[index],
            projected=projected[0],
            projected_mask=projected[1],
        )


@dataclass
class LLMInputs:
    """``inputs_embeds (B, T, H)`` and the token view of them: ``input_ids``, ``attention_mask``,
    ``audio_mask`` and ``labels`` ``(B, T)`` (labels None when no responses were given)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    audio_mask: torch.Tensor
    labels: torch.Tensor | None = None


@dataclass
class SpeechLLMOutput(ModelOutput):
    """``loss`` = response cross-entropy (``asr_loss``) + ``boundary_loss_weight`` x ``boundary_loss``
    + ``ctc_loss_weight`` x ``ctc_loss``.

    ``logits``: ``(B, T, V)`` without labels; with labels only the last ``K`` positions that predict
    response tokens (the LM head on prompt positions is wasted work). ``frames_after`` = audio tokens
    per sample, so ``frames_before / frames_after`` is the compression the trainer logs.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    asr_loss: torch.Tensor | None = None
    boundary_loss: torch.Tensor | None = None
    ctc_loss: torch.Tensor | None = None
    frames_before: torch.Tensor | None = None
    frames_after: torch.Tensor | None = None
    boundary_outputs: tuple[Any, ...] | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class EncoderCache:
    """Outputs of a frozen encoder without predictors, by utterance key: they are the same every epoch.

    Entries live on the CPU at their real length; when ``max_bytes`` is reached, new entries are not
    stored (the encoder simply runs for them).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: dict[str, tuple[torch.Tensor, int]] = {}
        self.bytes = 0

    def get(self, keys: list[str], device: torch.device) -> MagnetEncoderOutput | None:
        if not keys or any(k not in self.entries for k in keys):
            return None
        items = [self.entries[k] for k in keys]
        longest = max(h.shape[0] for h, _ in items)
        hidden = items[0][0].new_zeros(len(items), longest, items[0][0].shape[1])
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for i, (h, _) in enumerate(items):
            hidden[i, : h.shape[0]] = h
            mask[i, : h.shape[0]] = 1
        return MagnetEncoderOutput(
            last_hidden_state=hidden.to(device),
            encoder_attention_mask=mask.to(device),
            frames_before=torch.tensor([b for _, b in items], device=device),
            frames_after=mask.sum(1).to(device),
        )

    def put(self, keys: list[str], out: MagnetEncoderOutput) -> None:
        if out.last_hidden_state is None or out.frames_before is None:
            return
        hidden, mask = out.last_hidden_state.detach(), out.encoder_attention_mask
        for i, key in enumerate(keys):
            if key in self.entries:
                continue
            n = int(mask[i].sum()) if mask is not None else hidden.shape[1]
            entry = hidden[i, :n].to("cpu", copy=True)
            size = entry.numel() * entry.element_size()
            if self.bytes + size > self.max_bytes:
                return
            self.entries[key] = (entry, int(out.frames_before[i]))
            self.bytes += size


def _flat(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B,)`` True where a sample's real log-mel frames are constant (digital silence) or absent."""
    real = mask.bool()[:, None, :] if mask is not None else torch.ones_like(features[:, :1], dtype=torch.bool)
    high = features.masked_fill(~real, float("-inf")).amax(dim=(1, 2))
    low = features.masked_fill(~real, float("inf")).amin(dim=(1, 2))
    return ~torch.isfinite(high) | (high - low < 1e-4)


def _responses(labels: torch.Tensor) -> list[list[int]]:
    return [row[row != IGNORE_INDEX].tolist() for row in labels]


def _logits_window(labels: torch.Tensor) -> int:
    """How many final positions predict a response token in some row (``logits_to_keep``)."""
    columns = (labels != IGNORE_INDEX).any(0).nonzero()
    first = int(columns[0]) if len(columns) else labels.shape[1]
    return min(labels.shape[1], labels.shape[1] - first + 1)


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens; ``logits (B, K, V)`` are the last K positions
    of ``labels (B, T)``."""
    targets = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)[:, -logits.shape[1] :]
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def load_encoder(config: SpeechLLMConfig) -> MagnetWhisperEncoder:
    """The Whisper encoder named by ``config.encoder_name``, with its (new) predictors."""
    from magnet_asr.models.magnet_whisper import MagnetWhisper

    if not config.encoder_name:
        raise ValueError("SpeechLLMConfig.encoder_name is required (a Whisper checkpoint)")
    return MagnetWhisper.from_whisper(config.encoder_name, **config.encoder_settings).model.encoder


def load_llm(config: SpeechLLMConfig) -> PreTrainedModel:
    """The causal LM named by ``config.llm_name``, in float32 (mixed precision is the trainer's job)."""
    from transformers import AutoModelForCausalLM

    from magnet_asr.weights import resolve_model

    if not config.llm_name:
        raise ValueError("SpeechLLMConfig.llm_name is required (a causal LM checkpoint)")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(config.llm_name), dtype=torch.float32)
    return cast(PreTrainedModel, model)


def lora_config(config: SpeechLLMConfig) -> Any:
    """PEFT's ``LoraConfig`` of a SpeechLLM's adapters, naming the LLM by its hub name where it has one
    (what ``PeftModel.from_pretrained`` and serving tools read as the base model); a local LLM copied into
    the saved model (:func:`copy_local_sources`) is named by no one, as PEFT does for a model without a name."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=(
            hub_name(config.llm_name)
            if config.llm_name and not config.llm_name.startswith(f"{SOURCES_FOLDER}/")
            else None
        ),
    )


def add_lora(llm: PreTrainedModel, config: SpeechLLMConfig) -> PreTrainedModel:
    """Inject LoRA layers in place; the model keeps its class, so ``generate`` is the plain HF one."""
    from peft import inject_adapter_in_model

    return cast(PreTrainedModel, inject_adapter_in_model(lora_config(config), llm))


def hub_name(name: str) -> str:
    """A bundled model's hub equivalent (``smollm2-135m-instruct`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``);
    any other name unchanged."""
    from magnet_asr.weights import BUNDLED

    return BUNDLED[name].hub_equivalent if name in BUNDLED else name


def _token_embedding_rms(llm: PreTrainedModel) -> float:
    """RMS of what the embedding layer outputs (some models scale it), on a strided sample of the vocab."""
    embed = cast(nn.Embedding, llm.get_input_embeddings())
    vocab = int(embed.weight.shape[0])
    ids = torch.arange(0, vocab, max(1, vocab // 4096), device=embed.weight.device)
    with torch.no_grad():
        return embedding_rms(embed(ids))


def _embedding_keys(llm: nn.Module) -> frozenset[str]:
    """State-dict keys (under ``llm.``) of the LLM's input token embeddings and output head, every name
    of a tied table included."""
    tables = [llm.get_input_embeddings(), llm.get_output_embeddings()]  # type: ignore[operator]
    ids = {id(m.weight) for m in tables if m is not None}
    return frozenset(
        f"llm.{name}" for name, p in llm.named_parameters(remove_duplicate=False) if id(p) in ids
    )


class SpeechLLM(PreTrainedModel):
    """Whisper encoder + :class:`AudioProjector` + causal LM; see the module docstring."""

    config_class = SpeechLLMConfig
    config: SpeechLLMConfig
    base_model_prefix = "speech_llm"
    main_input_name = "input_features"
    supports_gradient_checkpointing = True
    # The loss is a mean over the batch's response tokens: let the Trainer scale it for accumulation.
    accepts_loss_kwargs = False

    def __init__(
        self,
        config: SpeechLLMConfig,
        encoder: MagnetWhisperEncoder | None = None,
        llm: PreTrainedModel | None = None,
    ) -> None:
        super().__init__(config)
        if not config.prompt:
            raise ValueError("SpeechLLMConfig.prompt is missing: build it with ChatPrompt.from_tokenizer")
        self.encoder = encoder if encoder is not None else load_encoder(config)
        llm = llm if llm is not None else load_llm(config)
        self.llm = add_lora(llm, config) if config.llm_finetune == "lora" else llm
        self.projector = AudioProjector(
            self.encoder.config.d_model,
            int(cast(nn.Embedding, self.llm.get_input_embeddings()).weight.shape[1]),
            stack=config.projector_stack,
            hidden_size=config.projector_hidden_size,
            dropout=config.projector_dropout,
            num_layers=config.projector_num_layers,
            num_heads=config.projector_num_heads,
            output_scale=_token_embedding_rms(self.llm),
            ctc=config.ctc_loss_weight > 0,
        )
        self._embedding_keys = _embedding_keys(self.llm)
        self.prompt = ChatPrompt.from_dict(config.prompt)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.llm.forward).parameters
        cacheable = config.freeze_encoder and not config.predictor_layers and config.encoder_cache_gb > 0
        self.encoder_cache = EncoderCache(int(config.encoder_cache_gb * 2**30)) if cacheable else None
        num_layers = len(self.encoder.layers)
        if config.encoder_train_layers > num_layers:
            raise ValueError(
                f"encoder_train_layers={config.encoder_train_layers}, but the encoder has {num_layers} layers"
            )
        # the frozen layers [0, split) run once per utterance (cached); [split, N) and the final norm train
        self.encoder_split = num_layers - config.encoder_train_layers
        self._trained_encoder_keys = (
            tuple(f"encoder.layers.{i}." for i in range(self.encoder_split, num_layers))
            + ("encoder.layer_norm.",)
            if config.encoder_train_layers
            else ()
        )
        self.set_trainable()
        self.post_init()

    # --- which parameters train and are saved ----------------------------------------------------
    def init_weights(self) -> None:
        """Nothing to do: the encoder and LLM arrive loaded, the projector initializes itself (the
        default would re-initialize loaded weights and LoRA's zero ``lora_B``)."""

    def is_saved_key(self, name: str) -> bool:
        """Whether ``name`` (a state-dict key) is trained, hence saved; everything else is loaded from
        the sources the config names."""
        if name.startswith("projector."):
            return True
        if name.startswith("encoder."):
            return (
                ".predictors." in f".{name}"
                or not self.config.freeze_encoder
                or name.startswith(self._trained_encoder_keys)
            )
        if name.startswith("llm."):
            mode = self.config.llm_finetune
            if mode == "full":
                return not (self.config.llm_freeze_embeddings and name in self._embedding_keys)
            return mode == "lora" and "lora_" in name
        return False

    def set_trainable(self) -> None:
        """``requires_grad`` on exactly the saved parameters (Whisper's sinusoidal positions stay fixed)."""
        for name, param in self.named_parameters():
            param.requires_grad = self.is_saved_key(name) and "embed_positions" not in name

    def train(self, mode: bool = True) -> SpeechLLM:
        """Frozen parts stay in eval mode (no dropout, deterministic: the encoder cache relies on it)."""
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.eval()
            self.encoder.predictors.train(mode)
            for layer in self.encoder.layers[self.encoder_split :]:
                layer.train(mode)
        if self.config.llm_finetune == "frozen":
            self.llm.eval()
        return self

    # --- audio -> embeddings -> LLM inputs -------------------------------------------------------
    def _encode(
        self,
        features: torch.Tensor,
        mel_mask: torch.Tensor | None,
        target_counts: torch.Tensor | None,
        cache_keys: list[str] | None,
    ) -> MagnetEncoderOutput:
        """Encoder pass, from the cache when it holds every key; no autograd graph through a frozen
        encoder without predictors (nothing in it trains). With ``encoder_train_layers`` the cache holds
        the frozen layers' output and the top layers run on it."""
        cache, keys = self.encoder_cache, list(cache_keys) if cache_keys is not None else None
        split = self.encoder_split if self.config.encoder_train_layers else None
        out = cache.get(keys, features.device) if cache is not None and keys is not None else None
        if out is None:
            needs_grad = (
                torch.is_grad_enabled()
                and split is None
                and any(p.requires_grad for p in self.encoder.parameters())
            )
            with torch.set_grad_enabled(needs_grad):
                if split is not None:
                    out = self.encoder.encode_prefix(features, mel_mask, num_layers=split)
                else:
                    out = self.encoder(features, attention_mask=mel_mask, target_counts=target_counts)
            if cache is not None and keys is not None:
                cache.put(keys, out)
        return self.encoder.encode_suffix(out, split) if split is not None else out

    def embed_audio(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        target_counts: torch.Tensor | None = None,
        cache_keys: list[str] | None = None,
        compress: bool = True,
    ) -> AudioEmbeddings:
        """``input_features (B, n_mels, T)``, mel ``attention_mask (B, T)`` -> :class:`AudioEmbeddings`;
        ``compress=False`` skips CTC compression (the CTC loss alone needs only the projector outputs)."""
        enc = self._encode(input_features, attention_mask, target_counts, cache_keys)
        hidden = cast(torch.Tensor, enc.last_hidden_state)
        projected, projected_mask = self.projector(hidden, enc.encoder_attention_mask)
        embeds, mask = projected, projected_mask
        head = self.projector.ctc_head
        batch, length = input_features.shape[0], input_features.shape[-1]
        mel_frames = (
            attention_mask.sum(1)
            if attention_mask is not None
            else torch.full((batch,), length, device=projected.device)
        )
        if self.config.ctc_compression and compress and head is not None:
            table, threshold = self._token_table(), self.config.ctc_blank_threshold
            rate, pooling = self.config.ctc_max_tokens_per_second, self.config.ctc_pooling
            log_blank: torch.Tensor | None = None
            budget: torch.Tensor | None = None
            if rate is None and pooling == "spikes":  # log P(blank) over the vocabulary only where needed
                best = head.best_path(projected, table, threshold)
            else:
                best, log_blank = head.emissions(projected, table, threshold)
            if rate is not None:
                budget = (mel_frames * rate / FRAMES_PER_SECOND).floor().long()
            embeds, mask = merge_ctc_spikes(
                projected, projected_mask, best, table.shape[0], log_blank, budget, pooling
            )
        frames_before = enc.frames_before
        return AudioEmbeddings(
            embeds,
            mask,
            frames_before=frames_before
            if frames_before is not None
            else torch.full_like(mel_frames, hidden.shape[1]),
            seconds=mel_frames.float() / FRAMES_PER_SECOND,
            silent=_flat(input_features, attention_mask),
            boundary_loss=enc.boundary_loss,
            boundary_outputs=enc.boundary_outputs,
            projected=projected,
            projected_mask=projected_mask,
        )

    def build_inputs(
        self,
        audio: AudioEmbeddings,
        responses: list[list[int]] | None = None,
        padding_side: str = "right",
    ) -> LLMInputs:
        """Assemble the prompts (one ``<audio>`` per projector output) and splice the audio in."""
        batch = self.prompt.assemble(audio.counts.tolist(), responses, padding_side)
        device = audio.embeds.device
        ids, audio_mask = batch.input_ids.to(device), batch.audio_mask.to(device)
        embeds = self.llm.get_input_embeddings()(ids.masked_fill(audio_mask, self.prompt.pad_id))
        values = audio.embeds[audio.mask.bool()].to(embeds.dtype)
        if values.shape[0] != int(audio_mask.sum()):  # cannot happen unless assemble() is broken
            raise RuntimeError(
                f"{values.shape[0]} audio embeddings for {int(audio_mask.sum())} <audio> slots"
            )
        embeds = embeds.masked_scatter(audio_mask[..., None], values)
        labels = batch.labels.to(device) if batch.labels is not None else None
        return LLMInputs(embeds, batch.attention_mask.to(device), ids, audio_mask, labels)

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        target_counts: torch.Tensor | None = None,
        cache_keys: list[str] | None = None,
    ) -> SpeechLLMOutput:
        """``input_features (B, n_mels, T)`` at their true length, ``attention_mask (B, T)`` over mel
        frames, ``labels (B, N)`` the response tokens (transcript + end-of-turn, -100 padded) that the
        model places after each prompt, ``target_counts (P, B)``, ``cache_keys`` (B utterance keys).

        Prompts are right-padded, so each sample's logits are those it gets alone (eval mode).
        """
        audio = self.embed_audio(input_features, attention_mask, target_counts, cache_keys)
        responses = _responses(labels) if labels is not None else None
        inputs = self.build_inputs(audio, responses)
        extra = {}
        if inputs.labels is not None and self._keeps_logits:
            extra["logits_to_keep"] = _logits_window(inputs.labels)
        out = self.llm(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, use_cache=False, **extra
        )
        asr_loss = response_loss(out.logits, inputs.labels) if inputs.labels is not None else None
        ctc_loss = self.ctc_loss(audio, responses) if responses is not None else None
        loss = asr_loss
        if loss is not None and audio.boundary_loss is not None:
            loss = loss + self.config.boundary_loss_weight * audio.boundary_loss
        if loss is not None and ctc_loss is not None:
            loss = loss + self.config.ctc_loss_weight * ctc_loss
        return SpeechLLMOutput(
            loss=loss,
            logits=out.logits,
            asr_loss=asr_loss,
            boundary_loss=audio.boundary_loss,
            ctc_loss=ctc_loss,
            frames_before=audio.frames_before,
            frames_after=audio.counts,
            boundary_outputs=audio.boundary_outputs,
            attention_mask=inputs.attention_mask,
            labels=inputs.labels,
        )

    def alignment_loss(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        target_counts: torch.Tensor | None = None,
        cache_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, AudioEmbeddings]:
        """CTC (+ weighted boundary) loss of the audio tokens alone, without running the LLM: the
        projector warm-up of ``training/speech_llm.ctc_warmup``. Arguments as in :meth:`forward`."""
        audio = self.embed_audio(input_features, attention_mask, target_counts, cache_keys, compress=False)
        loss = self.ctc_loss(audio, _responses(labels))
        if loss is None:
            raise ValueError("alignment_loss needs a CTC head: set ctc_loss_weight > 0")
        if audio.boundary_loss is not None:
            loss = loss + self.config.boundary_loss_weight * audio.boundary_loss
        return loss, audio

    def _token_table(self) -> torch.Tensor:
        """The LLM's token embedding table ``(V, H)``: the classes of the CTC head."""
        return cast(nn.Embedding, self.llm.get_input_embeddings()).weight

    def ctc_emissions(self, audio: AudioEmbeddings) -> CTCEmissions:
        """The CTC head's outputs on ``audio``'s projector outputs (before any CTC compression), for joint
        CTC / LLM decoding (``decoding["ctc_weight"]``, :mod:`magnet_asr.models.ctc_prefix_score`)."""
        head = self.projector.ctc_head
        if head is None:
            raise ValueError(
                "decoding ctc_weight > 0 needs a CTC head: this model has none (ctc_loss_weight 0)"
            )
        embeds, mask = audio.ctc_inputs
        return head.search_emissions(embeds, mask, self._token_table())

    def ctc_loss(self, audio: AudioEmbeddings, responses: list[list[int]]) -> torch.Tensor | None:
        """Auxiliary CTC loss of the audio tokens on the transcript tokens (responses without their
        end-of-turn); None without a CTC head."""
        head = self.projector.ctc_head
        if head is None:
            return None
        table = self._token_table()
        embeds, mask = audio.ctc_inputs
        return head(embeds, mask, table, [row[:-1] for row in responses])

    @torch.no_grad()
    def generate(
        self,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        audio: AudioEmbeddings | None = None,
        skip: torch.Tensor | None = None,
        **settings: Any,
    ) -> torch.Tensor:
        """Transcript token ids ``(B, N)`` (pad-filled, no end-of-turn); see
        :func:`magnet_asr.models.speech_llm_generation.generate_tokens` for ``settings``. Pass ``audio``
        from :meth:`embed_audio` to reuse an encoder pass; ``skip (B,)`` forces empty outputs.

        Called the way transformers' ASR pipeline calls a seq2seq model's ``generate`` too: the special-token
        ids it adds are the prompt's business here (:data:`PIPELINE_IGNORED`), and a ``generation_config``
        contributes the settings it shares with ours (``num_beams``, ``max_new_tokens``...)."""
        from magnet_asr.models.speech_llm_generation import generate_tokens, settings_from_generation

        generation_config = settings.pop("generation_config", None)
        settings = {k: v for k, v in settings.items() if k not in PIPELINE_IGNORED}
        if generation_config is not None:
            settings = {**settings_from_generation(generation_config), **settings}
        if audio is None:
            if input_features is None:
                raise ValueError("generate needs input_features or audio")
            audio = self.embed_audio(input_features, attention_mask)
        return generate_tokens(self, audio, skip=skip, **settings)

    # --- save / load ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, state_dict: dict | None = None, **kwargs: Any):  # type: ignore[override]
        """Save the config and only the trained tensors (:meth:`is_saved_key`), as safetensors; with LoRA,
        also the adapters as PEFT's own files in ``ADAPTER_FOLDER`` (``adapter_config.json``,
        ``adapter_model.safetensors``), which ``PeftModel.from_pretrained(llm, DIR/adapter)`` loads on the
        base LLM. A subfolder, because transformers takes a directory with ``adapter_config.json`` at its top
        for an adapter of the model that config names."""
        state = state_dict if state_dict is not None else self.state_dict()
        kept = {k: v for k, v in state.items() if self.is_saved_key(k)}
        adapter = self.adapter_tensors(kept) if self.config.llm_finetune == "lora" else None
        main = kwargs.get("is_main_process", True)
        names = {field: getattr(self.config, field) for field in SOURCE_FIELDS}
        saved = copy_local_sources(self.config, Path(save_directory)) if main else names
        try:  # the config is written naming the copies; the model in memory keeps its own sources
            for field, name in saved.items():
                setattr(self.config, field, name)
            result = super().save_pretrained(save_directory, state_dict=kept, **kwargs)  # it empties `kept`
            if adapter is not None and main:
                from safetensors.torch import save_file

                directory = Path(save_directory) / ADAPTER_FOLDER
                directory.mkdir(parents=True, exist_ok=True)
                lora_config(self.config).save_pretrained(str(directory))
                save_file(adapter, str(directory / "adapter_model.safetensors"))
        finally:
            for field, name in names.items():
                setattr(self.config, field, name)
        return result

    def adapter_tensors(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The LoRA tensors of ``state`` (default: this model's) under the keys of PEFT's adapter file:
        the LLM's own parameter names under ``base_model.model.``, without the adapter's name."""
        state = state if state is not None else self.state_dict()
        return {
            "base_model.model." + k[len("llm.") :].replace(".default.", "."): v.detach().contiguous()
            for k, v in state.items()
            if k.startswith("llm.") and "lora_" in k
        }

    def merged(self) -> SpeechLLM:
        """This model with its LoRA adapters merged into the LLM (``llm_finetune='full'``): the same outputs,
        no PEFT layers, loadable and servable as a plain model (``magnet-asr export --merge``)."""
        from peft import get_peft_model, set_peft_model_state_dict

        if self.config.llm_finetune != "lora":
            raise ValueError(
                f"nothing to merge: this SpeechLLM's llm_finetune is '{self.config.llm_finetune}'"
            )
        llm = load_llm(self.config)
        llm.to(self.device)  # type: ignore[arg-type]  # PreTrainedModel.to's functools.wraps stub
        base = get_peft_model(llm, lora_config(self.config))
        unknown = getattr(set_peft_model_state_dict(base, self.adapter_tensors()), "unexpected_keys", [])
        if unknown:
            raise RuntimeError(f"LoRA tensors PEFT does not know: {unknown[:3]}")
        config = copy.deepcopy(self.config)
        config.llm_finetune = "full"
        out = type(self)(config, encoder=self.encoder, llm=cast(PreTrainedModel, base.merge_and_unload()))
        out.projector.load_state_dict(self.projector.state_dict())
        return out.eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load trained tensors; frozen keys are not expected (they come from the named sources)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        tied = set(getattr(self, "all_tied_weights_keys", None) or {})
        missing = [k for k in result.missing_keys if self.is_saved_key(k) and k not in tied]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"SpeechLLM checkpoint mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        if self.config.llm_finetune == "full":
            self.llm.tie_weights()
        return _IncompatibleKeys(missing, result.unexpected_keys)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any) -> SpeechLLM:  # type: ignore[override]
        """Load a saved SpeechLLM: frozen parts from their sources, trained tensors from the directory.

        ``device`` (keyword) moves the model; the model is returned in eval mode, as HF does.
        """
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        given = kwargs.pop("config", None)  # what AutoModel passes: the directory's own config, read again
        subfolder = kwargs.pop("subfolder", None) or ""
        for key in LOADER_IGNORED:
            kwargs.pop(key, None)
        if args or kwargs:  # silently ignoring e.g. quantization would hand back something else than asked
            raise TypeError(
                f"SpeechLLM.from_pretrained takes a path, device= and dtype=, got {args} {sorted(kwargs)}"
            )
        path = Path(pretrained_model_name_or_path) / subfolder
        config = given if isinstance(given, SpeechLLMConfig) else SpeechLLMConfig.from_pretrained(str(path))
        model = cls(with_saved_sources(config, path))
        model.load_state_dict(read_weights(path), strict=True)
        if isinstance(dtype, torch.dtype):  # "auto" or None: as saved (float32)
            model.to(dtype)  # type: ignore[arg-type]  # PreTrainedModel.to's functools.wraps stub
        if device is not None:
            model.to(device)
        return model.eval()

    @classmethod
    def can_generate(cls) -> bool:
        """True: :meth:`generate` takes input features and returns token ids, as a seq2seq model's does
        (transformers' pipelines ask before they call it)."""
        return True


def export_merged(source: str | Path, out: str | Path) -> Path:
    """Write ``source`` (a saved LoRA SpeechLLM) to ``out`` with its adapters merged into the LLM, with
    its tokenizer; returns ``out``."""
    model = SpeechLLM.from_pretrained(source).merged()
    out = Path(out)
    model.save_pretrained(out)
    if (Path(source) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(out))
    return out


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved directory (``model.safetensors`` or its sharded index)."""
    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{directory}: no model.safetensors (or index) to load")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(directory / shard)))
    return state


def load_tokenizer(name_or_path: str) -> Any:
    """The LLM's tokenizer (bundled name, local dir or hub name) with the ``<audio>`` token added."""
    from transformers import AutoTokenizer

    from magnet_asr.models.processing_speech_llm import prepare_tokenizer
    from magnet_asr.weights import resolve_model

    return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_model(name_or_path)))


def copy_local_sources(config: SpeechLLMConfig, directory: Path) -> dict[str, str | None]:
    """Copy each frozen part named by a local directory into ``directory/SOURCES_FOLDER/<part>`` (its top-level
    files: config, weights, tokenizer) and return the names a saved config gives them: the copies, relative
    to ``directory``; bundled and hub names unchanged. A part already inside ``directory`` is not copied again."""
    import shutil

    from magnet_asr.weights import BUNDLED

    names: dict[str, str | None] = {}
    for field in SOURCE_FIELDS:
        name = getattr(config, field)
        source = Path(name) if name else None
        if source is None or name in BUNDLED or not source.is_dir():
            names[field] = name
            continue
        relative = f"{SOURCES_FOLDER}/{field.removesuffix('_name')}"
        target = directory / relative
        if not (target.is_dir() and target.resolve() == source.resolve()):
            target.mkdir(parents=True, exist_ok=True)
            for item in source.iterdir():
                if item.is_file():
                    shutil.copy2(item, target / item.name)
        names[field] = relative
    return names


def with_saved_sources(config: SpeechLLMConfig, directory: Path) -> SpeechLLMConfig:
    """``config`` (read from ``directory``) with its frozen parts that were copied into the directory
    (:func:`copy_local_sources`) named by their path here, so they load wherever the directory lies."""
    for field in SOURCE_FIELDS:
        name = getattr(config, field)
        if name and name.startswith(f"{SOURCES_FOLDER}/") and (directory / name).is_dir():
            setattr(config, field, str((directory / name).resolve()))
    return config


def _source_name(name: str) -> str:
    """A saved model names its sources: local directories become absolute so it loads from anywhere."""
    from magnet_asr.weights import BUNDLED

    return str(Path(name).resolve()) if name not in BUNDLED and Path(name).is_dir() else name


def build_speech_llm(
    encoder_name: str, llm_name: str, tokenizer: Any | None = None, **settings: Any
) -> tuple[SpeechLLM, Any]:
    """A new SpeechLLM from a Whisper checkpoint and a causal LM; returns ``(model, tokenizer)``.

    ``settings`` are :class:`SpeechLLMConfig` fields; the prompt is rendered from the tokenizer's chat
    template with ``settings['instruction']`` and ``settings['system_prompt']``.
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(llm_name)
    encoder_name, llm_name = _source_name(encoder_name), _source_name(llm_name)
    prompt = ChatPrompt.from_tokenizer(
        tokenizer,
        instruction=settings.get("instruction", DEFAULT_INSTRUCTION),
        system_prompt=settings.get("system_prompt"),
    )
    config = SpeechLLMConfig(
        encoder_name=encoder_name, llm_name=llm_name, prompt=prompt.to_dict(), **settings
    )
    return SpeechLLM(config), tokenizer
