"""MagnetWhisper: Whisper with boundary predictors inside its encoder, on variable-length input.

The encoder (``models/encoder.py``) runs on the true input length and pools its sequence at predicted
boundaries; the decoder cross-attends to the real segments only (1-D key mask). With no predictors
and ``learned`` positions the model *is* Hugging Face Whisper: same state dict, same logits on 30 s
input. ``rope`` replaces absolute positions with rotary embeddings in encoder self-attention and in
decoder self- and cross-attention. Generation goes through transformers' Whisper ``generate``.

The key/value cache is passed to transformers under the name the installed version declares
(:data:`CACHE_ARGUMENT`), and received under either name.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, cast

import torch
import transformers
from torch import nn
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, Seq2SeqLMOutput
from transformers.models.whisper.modeling_whisper import (
    WhisperDecoder,
    WhisperDecoderLayer,
    WhisperModel,
    WhisperPreTrainedModel,
    shift_tokens_right,
)

from magnet_asr.data.collator import IGNORE_INDEX
from magnet_asr.models.attention import RopeWhisperAttention, RotaryEmbedding, additive_mask
from magnet_asr.models.encoder import MagnetEncoderOutput, MagnetWhisperEncoder, init_own_parameters

POSITION_ENCODINGS = ("learned", "rope")


def _cache_argument() -> str:
    """The cache keyword of the installed transformers, read off Whisper's decoder layer.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` in one go: model and layer arguments,
    ``create_causal_mask``, output fields, and the name ``generate`` passes the cache by (the old name
    stays a deprecated alias for a while). Using the name the installed version declares keeps us on its
    supported path on both sides of the rename; an unknown third name fails here, at import, instead of
    as a cache that is silently dropped (every transcript then stops after its first word).
    """
    accepted = inspect.signature(WhisperDecoderLayer.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in accepted:
            return name
    raise ImportError(
        f"transformers {transformers.__version__}: WhisperDecoderLayer.forward takes neither `cache` nor "
        "`past_key_values`; this magnet-asr cannot pass it a key/value cache"
    )


CACHE_ARGUMENT = _cache_argument()


def _cache_kwarg(cache: Cache | None) -> dict[str, Any]:
    """``cache`` as the keyword argument the installed transformers' functions and outputs take."""
    return {CACHE_ARGUMENT: cache}


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache a forward got under either name: ``generate`` and Whisper's own modules pass it as
    :data:`CACHE_ARGUMENT`; code written for the other side of the rename uses the other name."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the key/value cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class MagnetWhisperConfig(WhisperConfig):
    """``WhisperConfig`` plus boundary predictors, position encoding and fixed-stride convolutions.

    predictor_layers: encoder layer indices k; a predictor pools the sequence *before* layer k
        (k = encoder_layers pools after the last layer).
    predictor_settings: keyword arguments of ``BoundaryPredictorConfig`` shared by all predictors
        (variant, prior, temperature, threshold, pooling, target, loss...).
    boundary_loss_weight: weight of the predictors' losses added to the ASR loss.
    position_encoding: ``learned`` (Whisper's embeddings sliced to the input) or ``rope``.
    extra_conv_strides: fixed-stride convolutions after the conv stem (a fixed-rate baseline).
    proportional_attention: every attention that reads pooled segments (later encoder layers, decoder
        cross-attention) adds ``log(frames in the segment)`` to its logits (Token Merging, Bolya et al.
        2023), so a segment of alike frames draws the attention its frames drew in the pretrained model.
    """

    model_type = "magnet_whisper"

    def __init__(
        self,
        predictor_layers: list[int] | None = None,
        predictor_settings: dict[str, Any] | None = None,
        boundary_loss_weight: float = 1.0,
        position_encoding: str = "learned",
        rope_theta: float = 10_000.0,
        extra_conv_strides: list[int] | None = None,
        proportional_attention: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.proportional_attention = bool(proportional_attention)
        self.predictor_layers = sorted(int(k) for k in (predictor_layers or []))
        self.predictor_settings = dict(predictor_settings or {})
        self.boundary_loss_weight = float(boundary_loss_weight)
        self.position_encoding = position_encoding
        self.rope_theta = float(rope_theta)
        self.extra_conv_strides = [int(s) for s in (extra_conv_strides or [])]
        self._check()

    def _check(self) -> None:
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(
                f"position_encoding: '{self.position_encoding}' is not one of {POSITION_ENCODINGS}"
            )
        bad = [k for k in self.predictor_layers if not 0 <= k <= self.encoder_layers]
        if bad:
            raise ValueError(f"predictor_layers: {bad} outside 0..{self.encoder_layers}")
        if len(set(self.predictor_layers)) != len(self.predictor_layers):
            raise ValueError(f"predictor_layers: duplicates in {self.predictor_layers}")
        if any(s < 2 for s in self.extra_conv_strides):
            raise ValueError(f"extra_conv_strides: each stride must be >= 2, got {self.extra_conv_strides}")


class MagnetWhisperDecoder(WhisperDecoder):
    """Whisper's decoder with a key mask over the encoder segments, and optional rotary positions."""

    def __init__(self, config: MagnetWhisperConfig) -> None:
        super().__init__(config)
        self.rotary: RotaryEmbedding | None = None
        if config.position_encoding == "rope":
            self.rotary = RotaryEmbedding(config.d_model // config.decoder_attention_heads, config.rope_theta)
            for index, layer in enumerate(self.layers):
                heads, drop = config.decoder_attention_heads, config.attention_dropout
                layer.self_attn = RopeWhisperAttention(
                    config.d_model,
                    heads,
                    dropout=drop,
                    is_decoder=True,
                    is_causal=True,
                    layer_idx=index,
                    config=config,
                )
                layer.encoder_attn = RopeWhisperAttention(
                    config.d_model, heads, dropout=drop, is_decoder=True, layer_idx=index, config=config
                )

    def forward(  # type: ignore[override]
        self,
        input_ids=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds=None,
        position_ids=None,
        use_cache=None,
        encoder_segment_sizes: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """As ``WhisperDecoder.forward``; ``encoder_attention_mask (B, S)`` masks padded encoder segments,
        ``encoder_segment_sizes (B, S)`` (frames per segment) biases cross-attention when the config asks
        for proportional attention. The cache comes as ``cache`` or ``past_key_values``."""
        cache = _one_cache(cache, past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            # WhisperConfig.num_hidden_layers is the *encoder's* depth: size the cache for the decoder
            cache_config = copy.deepcopy(self.config)
            cache_config.num_hidden_layers = self.config.decoder_layers
            cache = EncoderDecoderCache(DynamicCache(config=cache_config), DynamicCache(config=cache_config))
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length
            position_ids = position_ids.unsqueeze(0).repeat(inputs_embeds.shape[0], 1)

        hidden = inputs_embeds
        layer_kwargs: dict[str, Any] = {}
        if self.rotary is None:
            hidden = hidden + self.embed_positions(input_ids, past_length, position_ids=position_ids).to(
                hidden.device
            )
        else:
            layer_kwargs["rope_query"] = self.rotary(position_ids)
            segments = torch.arange(encoder_hidden_states.shape[1], device=hidden.device)
            layer_kwargs["rope_key"] = self.rotary(segments[None].expand(hidden.shape[0], -1))
        hidden = nn.functional.dropout(hidden, p=self.dropout, training=self.training)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **_cache_kwarg(cache),
        )
        sizes = encoder_segment_sizes if self.config.proportional_attention else None
        cross_mask = additive_mask(encoder_attention_mask, hidden.dtype, sizes)
        for layer in self.layers:
            hidden = self._run_layer(
                layer,
                hidden,
                causal_mask,
                encoder_hidden_states,
                cross_mask,
                cache if use_cache else None,
                use_cache,
                layer_kwargs,
            )
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=self.layer_norm(hidden), **_cache_kwarg(cache)
        )

    def _run_layer(self, layer, hidden, causal_mask, encoder_hidden, cross_mask, cache, use_cache, rope):
        if self.rotary is None:
            return layer(
                hidden,
                causal_mask,
                encoder_hidden,
                encoder_attention_mask=cross_mask,
                use_cache=use_cache,
                **_cache_kwarg(cache),
            )
        # Self- and cross-attention need different key positions: run the sub-blocks here.
        residual = hidden
        x, _ = layer.self_attn(
            layer.self_attn_layer_norm(hidden),
            cache=cache,
            attention_mask=causal_mask,
            rope_query=rope["rope_query"],
            rope_key=rope["rope_query"],
        )
        hidden = residual + nn.functional.dropout(x, p=layer.dropout, training=self.training)
        residual = hidden
        x, _ = layer.encoder_attn(
            layer.encoder_attn_layer_norm(hidden),
            key_value_states=encoder_hidden,
            cache=cache,
            attention_mask=cross_mask,
            rope_query=rope["rope_query"],
            rope_key=rope["rope_key"],
        )
        hidden = residual + nn.functional.dropout(x, p=layer.dropout, training=self.training)
        residual = hidden
        x = layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden)))
        x = nn.functional.dropout(x, p=layer.activation_dropout, training=self.training)
        x = nn.functional.dropout(layer.fc2(x), p=layer.dropout, training=self.training)
        return residual + x


class MagnetWhisperModel(WhisperModel):
    config_class = MagnetWhisperConfig
    config: MagnetWhisperConfig

    def __init__(self, config: MagnetWhisperConfig) -> None:
        WhisperPreTrainedModel.__init__(self, config)  # skip WhisperModel's own encoder/decoder
        # replaces Whisper's encoder (same parameter names, but not a WhisperEncoder subclass)
        self.encoder: MagnetWhisperEncoder = MagnetWhisperEncoder(config)  # type: ignore[assignment]
        self.decoder: MagnetWhisperDecoder = MagnetWhisperDecoder(config)
        self.post_init()

    def init_weights(self) -> None:
        super().init_weights()
        init_own_parameters(self)


@dataclass
class MagnetWhisperOutput(Seq2SeqLMOutput):
    """``loss`` = ASR loss + ``boundary_loss_weight`` x boundary loss; both parts are kept separately."""

    asr_loss: torch.Tensor | None = None
    boundary_loss: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None
    frames_before: torch.Tensor | None = None
    frames_after: torch.Tensor | None = None
    boundary_outputs: tuple[Any, ...] | None = None
    boundary_log_prob: torch.Tensor | None = None
    predictor_inputs: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None


class MagnetWhisper(WhisperForConditionalGeneration):
    """Whisper encoder-decoder with learned boundary compression. A Hugging Face ``PreTrainedModel``."""

    config_class = MagnetWhisperConfig
    base_model_prefix = "model"
    config: MagnetWhisperConfig

    def __init__(self, config: MagnetWhisperConfig) -> None:
        WhisperPreTrainedModel.__init__(self, config)  # skip building a plain WhisperModel first
        self.model: MagnetWhisperModel = MagnetWhisperModel(config)
        self.proj_out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.max_target_positions = config.max_target_positions
        self.post_init()

    @classmethod
    def from_whisper(cls, name_or_path: str, **settings: Any) -> MagnetWhisper:
        """Build from any Whisper checkpoint (bundled name, local dir or hub name); ``settings`` go to
        :class:`MagnetWhisperConfig` (``predictor_layers``, ``predictor_settings``, ``position_encoding``...).
        Predictors and extra convolutions are newly initialized; everything else is loaded."""
        from magnet_asr.weights import resolve_model

        path = resolve_model(name_or_path)
        base = WhisperForConditionalGeneration.from_pretrained(path)
        config = MagnetWhisperConfig(**{**base.config.to_dict(), **settings})
        model = cls(config)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        new = ("model.encoder.predictors.", "model.encoder.extra_convs.")
        missing = [k for k in missing if not k.startswith(new)]
        if missing or unexpected:
            raise ValueError(
                f"{name_or_path}: not a Whisper checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        model.generation_config = copy.deepcopy(base.generation_config)
        return model

    def init_weights(self) -> None:
        super().init_weights()
        init_own_parameters(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):  # type: ignore[override]
        """As ``PreTrainedModel.from_pretrained``, but a missing or unexpected tensor is an error, not a
        warning: a silently re-initialized predictor would look trained and be random."""
        want_info = kwargs.pop("output_loading_info", False)
        # mismatched shapes are collected (not raised bare) so the error below can name them
        kwargs.setdefault("ignore_mismatched_sizes", True)
        # with output_loading_info=True, from_pretrained returns (model, info); its annotation omits that
        model, info = cast(
            "tuple[MagnetWhisper, dict[str, Any]]",
            super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs),
        )
        problems = {
            k: sorted(v)[:5]
            for k, v in info.items()
            if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
        }
        if problems:
            detail = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in problems.items())
            raise ValueError(
                f"{pretrained_model_name_or_path}: checkpoint does not match the model ({detail})"
            )
        return (model, info) if want_info else model

    def get_encoder(self):  # noqa: D102 - the generation mixin asks for it
        return self.model.encoder

    def forward(  # type: ignore[override]
        self,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: MagnetEncoderOutput | None = None,
        cache: Cache | None = None,
        decoder_inputs_embeds=None,
        decoder_position_ids=None,
        labels: torch.Tensor | None = None,
        target_counts: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_boundary_samples: int = 0,
        phone_boundaries: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> MagnetWhisperOutput:
        """``input_features (B, n_mels, T)`` at their true length, ``attention_mask (B, T)`` over mel frames,
        ``labels (B, N)`` with -100 for padding, ``target_counts (num_predictors, B)``,
        ``phone_boundaries (B, ceil(T/2))`` (true phone ends for the ``phones`` loss, training only, optional;
        :meth:`~magnet_asr.models.encoder.MagnetWhisperEncoder.forward`).

        ``num_boundary_samples = K > 0`` (GRPO, :mod:`magnet_asr.training.grpo`): the encoder draws ``K``
        boundary configurations per input in one batched pass; labels and decoder inputs (given per input)
        are repeated input-major, so logits and per-sample outputs have ``K * B`` rows (row ``i * K + k``
        is draw ``k`` of input ``i``) and ``boundary_log_prob (K*B,)`` is each draw's log-probability.

        The key/value cache comes as ``cache`` (what ``generate`` passes from transformers 5.24 on) or
        ``past_key_values`` (before); the output carries it in the installed version's field."""
        if num_boundary_samples:
            if encoder_outputs is not None:
                raise ValueError("num_boundary_samples draws boundaries in the encoder: pass input_features")
            labels, decoder_input_ids, decoder_attention_mask = (
                None if x is None else x.repeat_interleave(num_boundary_samples, dim=0)
                for x in (labels, decoder_input_ids, decoder_attention_mask)
            )
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            # shift_tokens_right raises its own error for a missing pad_token_id
            decoder_input_ids = shift_tokens_right(
                labels, cast(int, self.config.pad_token_id), self.config.decoder_start_token_id
            )
        if encoder_outputs is None:
            encoder_outputs = self.model.encoder(
                input_features,
                attention_mask=attention_mask,
                target_counts=target_counts,
                num_boundary_samples=num_boundary_samples,
                phone_boundaries=phone_boundaries,
            )
        decoded = self.model.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=getattr(encoder_outputs, "encoder_attention_mask", None),
            encoder_segment_sizes=getattr(encoder_outputs, "segment_sizes", None),
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=decoder_inputs_embeds,
            position_ids=decoder_position_ids,
            use_cache=use_cache,
        )
        logits = self.proj_out(decoded.last_hidden_state)
        asr_loss = loss = None
        boundary_loss = getattr(encoder_outputs, "boundary_loss", None)
        if labels is not None:
            asr_loss = nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
            loss = (
                asr_loss
                if boundary_loss is None
                else asr_loss + self.config.boundary_loss_weight * boundary_loss
            )
        return MagnetWhisperOutput(
            loss=loss,
            logits=logits,
            **_cache_kwarg(getattr(decoded, CACHE_ARGUMENT)),
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            asr_loss=asr_loss,
            boundary_loss=boundary_loss,
            encoder_attention_mask=getattr(encoder_outputs, "encoder_attention_mask", None),
            frames_before=getattr(encoder_outputs, "frames_before", None),
            frames_after=getattr(encoder_outputs, "frames_after", None),
            boundary_outputs=getattr(encoder_outputs, "boundary_outputs", None),
            boundary_log_prob=getattr(encoder_outputs, "boundary_log_prob", None),
            predictor_inputs=getattr(encoder_outputs, "predictor_inputs", None),
        )

    @torch.no_grad()
    def encode(
        self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> MagnetEncoderOutput:
        """Encoder pass for generation: the tensors ``generate`` carries, plus the predictors' decisions.

        ``last_hidden_state``, ``encoder_attention_mask``, ``frames_before`` / ``frames_after`` are tensors,
        which ``generate`` expands in place for beams (``repeat_interleave``): read them before generating.
        ``boundary_outputs`` (one ``BoundaryOutput`` per predictor, ``boundaries`` and ``mask`` ``(B, L_k)``
        at that predictor's input) is a tuple, which ``generate`` passes along untouched, so it keeps ``B``
        rows; the decoder never reads it. No loss, no sampling state.
        """
        out = self.model.encoder(input_features, attention_mask=attention_mask)
        return MagnetEncoderOutput(
            last_hidden_state=out.last_hidden_state,
            encoder_attention_mask=out.encoder_attention_mask,
            segment_sizes=out.segment_sizes,
            frames_before=out.frames_before,
            frames_after=out.frames_after,
            boundary_outputs=out.boundary_outputs,
        )

    def generate(  # type: ignore[override]
        self,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Whisper ``generate`` on the compressed, variable-length encoder output (no padding to 30 s)."""
        if input_features is not None and "encoder_outputs" not in kwargs:
            kwargs["encoder_outputs"] = self.encode(input_features, attention_mask)
        if attention_mask is not None:  # generate asks for it in a batch; the decoder reads the encoder's own
            kwargs["attention_mask"] = attention_mask
        return super().generate(**kwargs)
