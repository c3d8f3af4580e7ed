"""Convert a faster-whisper (CTranslate2) Whisper model into a Hugging Face ``WhisperForConditionalGeneration``.

Input: ``model.bin`` (one file or parts), faster-whisper's ``config.json`` (suppressed tokens, alignment
heads) and ``tokenizer.json``. Output: a directory that ``from_pretrained`` loads offline: config,
float32 safetensors, tokenizer, feature extractor / processor and generation config.

Name mapping (learned from CTranslate2's ``WhisperSpec`` and its Transformers converter): CT2 scopes are
``encoder|decoder/layer_<i>/<block>/<layer>/<leaf>`` with layer norms as ``gamma``/``beta``. CT2 fuses the
self-attention q, k, v projections into one ``linear_0`` and the cross-attention k, v into ``linear_1``;
they are split back along the output dimension. Whisper's key projections have no bias: CT2 stores
zeros in that slot, and dropping them is exact anyway, since a key bias adds the same ``q . b`` to
every key's score of a query, which the softmax cancels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magnet_asr.weights.ctranslate2 import CT2Reader, dequantize
from magnet_asr.weights.packages import WeightsError

WHISPER_HEAD_DIM = 64  # every Whisper size uses 64-dim attention heads (fallback when num_heads is absent)
MULTILINGUAL_VOCAB = 51865  # Whisper's rule: a vocabulary this large (or larger) is multilingual
TIME_PRECISION = 0.02  # seconds per timestamp token
MAX_INITIAL_TIMESTAMP_INDEX = 50  # openai/whisper's default (1 s), as in the hub's generation configs

_LEAVES = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias", "encodings": "weight"}
# (stack, module) -> HF module, for variables outside the layers.
_TOP_MODULES = {
    ("encoder", "conv1"): "model.encoder.conv1",
    ("encoder", "conv2"): "model.encoder.conv2",
    ("encoder", "position_encodings"): "model.encoder.embed_positions",
    ("encoder", "layer_norm"): "model.encoder.layer_norm",
    ("decoder", "embeddings"): "model.decoder.embed_tokens",
    ("decoder", "position_encodings"): "model.decoder.embed_positions",
    ("decoder", "layer_norm"): "model.decoder.layer_norm",
    ("decoder", "projection"): "proj_out",
}
# (block, layer) inside a layer -> HF modules; several modules = a fused projection split along dim 0.
_LAYER_MODULES = {
    ("self_attention", "layer_norm"): ("self_attn_layer_norm",),
    ("self_attention", "linear_0"): ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attention", "linear_1"): ("self_attn.out_proj",),
    ("attention", "layer_norm"): ("encoder_attn_layer_norm",),
    ("attention", "linear_0"): ("encoder_attn.q_proj",),
    ("attention", "linear_1"): ("encoder_attn.k_proj", "encoder_attn.v_proj"),
    ("attention", "linear_2"): ("encoder_attn.out_proj",),
    ("ffn", "layer_norm"): ("final_layer_norm",),
    ("ffn", "linear_0"): ("fc1",),
    ("ffn", "linear_1"): ("fc2",),
}
_LAYER = re.compile(r"layer_(\d+)")


def hf_names(ct2_name: str) -> tuple[str, ...] | None:
    """HF parameter names one CT2 variable becomes (several for fused projections), or None if unknown."""
    parts = ct2_name.split("/")
    leaf = _LEAVES.get(parts[-1])
    if leaf is None or parts[0] not in ("encoder", "decoder"):
        return None
    if len(parts) == 3 and (parts[0], parts[1]) in _TOP_MODULES:
        return (f"{_TOP_MODULES[parts[0], parts[1]]}.{leaf}",)
    match = _LAYER.fullmatch(parts[1]) if len(parts) == 5 else None
    modules = _LAYER_MODULES.get((parts[2], parts[3])) if match else None
    if match is None or modules is None:
        return None
    prefix = f"model.{parts[0]}.layers.{match.group(1)}"
    return tuple(f"{prefix}.{m}.{leaf}" for m in modules)


def split_variable(ct2_name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    """Map one CT2 tensor to HF tensors: rename, split fused projections, drop key biases."""
    names = hf_names(ct2_name)
    if names is None:
        raise WeightsError(f"unexpected variable '{ct2_name}' in a Whisper model.bin (unsupported variant?)")
    if value.shape[0] % len(names):
        raise WeightsError(
            f"variable '{ct2_name}' {value.shape} cannot be split into {len(names)} projections"
        )
    pieces = np.split(value, len(names), axis=0)
    return {n: p for n, p in zip(names, pieces) if not n.endswith("k_proj.bias")}


@dataclass
class CT2Whisper:
    """A CT2 Whisper model read into HF names: float32 tensors plus CT2's scalar settings."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict[str, float] = field(default_factory=dict)  # e.g. "encoder/num_heads" -> 6
    tied_projection: bool = True


def read_ct2_whisper(parts: Sequence[Path], progress: Callable[[int], None] | None = None) -> CT2Whisper:
    """Stream a Whisper ``model.bin`` into float32 HF tensors; ``progress(bytes_read)`` is called as it goes."""
    out = CT2Whisper()
    full: dict[str, np.ndarray] = {}  # float32 arrays by CT2 name, shared with the split views (no copy)
    with CT2Reader(parts) as reader:
        if reader.spec_name != "WhisperSpec":
            raise WeightsError(f"{reader.name}: spec '{reader.spec_name}' is not a Whisper model")
        for name, value in dequantize(reader.variables()):
            if progress is not None:
                progress(reader.offset)
            if value.ndim == 0:
                out.settings[name] = value.item()
                continue
            full[name] = value.astype(np.float32, copy=False)
            for hf, piece in split_variable(name, full[name]).items():
                out.state[hf] = torch.from_numpy(piece)
        aliases = dict(reader.aliases)
        if progress is not None:
            progress(reader.offset)  # the alias table is read: the whole file
    for alias, target in aliases.items():
        if target not in full:
            raise WeightsError(f"alias '{alias}' points to missing variable '{target}'")
        for hf, piece in split_variable(alias, full[target]).items():
            out.state[hf] = torch.from_numpy(piece)
    _untie_if_needed(out, aliases)
    return out


def _untie_if_needed(model: CT2Whisper, aliases: dict[str, str]) -> None:
    # HF ties proj_out to the token embeddings. CT2 aliases them when equal; a model whose output
    # projection differs must keep its own copy and be saved untied.
    emb, proj = model.state["model.decoder.embed_tokens.weight"], model.state.get("proj_out.weight")
    aliased = aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    model.tied_projection = proj is None or aliased or torch.equal(emb, proj)
    if model.tied_projection:
        model.state.pop("proj_out.weight", None)


# -- tokens -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WhisperTokens:
    """Special token ids, read from the tokenizer (they differ between English-only and multilingual)."""

    eot: int
    sot: int
    translate: int
    transcribe: int
    startoflm: int
    startofprev: int
    nospeech: int
    notimestamps: int
    languages: dict[str, int]  # "<|en|>" -> id

    @classmethod
    def from_added_tokens(cls, added: list[dict[str, Any]]) -> WhisperTokens:
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        ids = {t["content"]: int(t["id"]) for t in added}
        names = {
            "eot": "<|endoftext|>",
            "sot": "<|startoftranscript|>",
            "translate": "<|translate|>",
            "transcribe": "<|transcribe|>",
            "startoflm": "<|startoflm|>",
            "startofprev": "<|startofprev|>",
            "notimestamps": "<|notimestamps|>",
        }
        missing = [tok for tok in names.values() if tok not in ids]
        nospeech = ids.get("<|nospeech|>", ids.get("<|nocaptions|>"))  # renamed in newer tokenizers
        if missing or nospeech is None:
            raise WeightsError(f"tokenizer.json lacks Whisper special tokens {missing or ['<|nospeech|>']}")
        langs = {f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in ids}
        return cls(**{k: ids[v] for k, v in names.items()}, nospeech=nospeech, languages=langs)


def repair_merges(bpe: dict[str, Any], special_ids: set[int]) -> int:
    """Add BPE merges that a tokenizer.json lost; returns how many were added.

    Whisper's vocabularies come from tiktoken, where a token's id is its merge rank (+256 byte tokens),
    so the merges list is sorted by the id of the token each merge produces. faster-whisper's
    multilingual tokenizer.json lacks the very first merge ("Ġ" + "t" -> "Ġt"), so every word starting
    with " t" was encoded as two tokens the model never saw in training. A missing merge is rebuilt
    from the two vocabulary tokens that spell it and put back at its rank.
    """
    vocab: dict[str, int] = bpe["vocab"]
    as_pairs = bool(bpe["merges"]) and not isinstance(bpe["merges"][0], str)
    merges = [tuple(m) if as_pairs else tuple(m.split(" ", 1)) for m in bpe["merges"]]
    result_ids = [vocab.get(a + b, -1) for a, b in merges]
    if any(x >= y for x, y in zip(result_ids, result_ids[1:])):
        return 0  # not rank-ordered: not a tiktoken-style vocabulary, leave it alone
    produced = {a + b for a, b in merges}
    added = 0
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        if idx < 256 or len(token) < 2 or token in produced or idx in special_ids:
            continue
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(a, b) for a, b in splits if vocab.get(a, idx) < idx and vocab.get(b, idx) < idx]
        if not splits:
            continue
        pair = min(splits, key=lambda ab: max(vocab[ab[0]], vocab[ab[1]]))
        pos = int(np.searchsorted(result_ids, idx))
        merges.insert(pos, pair)
        result_ids.insert(pos, idx)
        added += 1
    bpe["merges"] = [list(m) if as_pairs else " ".join(m) for m in merges]
    return added


def add_timestamp_tokens(data: dict[str, Any], vocab_size: int) -> int:
    """Append the ``<|0.00|>`` ... ``<|30.00|>`` tokens that fill the vocabulary after ``<|notimestamps|>``.

    faster-whisper's tokenizer.json stops at ``<|notimestamps|>``; transformers' tokenizer needs them to
    decode timestamps (and ``len(tokenizer)`` then matches the model's vocabulary). Not special, as in
    the hub's Whisper tokenizers: ``decode`` filters them unless asked for timestamps.
    """
    added = data["added_tokens"]
    last = max(int(t["id"]) for t in added)
    if last >= vocab_size:
        raise WeightsError(f"tokenizer has token id {last}, beyond the model's vocabulary of {vocab_size}")
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": False}
    for i in range(vocab_size - last - 1):
        added.append({"id": last + 1 + i, "content": f"<|{i * TIME_PRECISION:.2f}|>", **flags})
    return vocab_size - last - 1


# -- configs ------------------------------------------------------------------------------------------


def _num_layers(state: dict[str, torch.Tensor], stack: str) -> int:
    pattern = re.compile(rf"model\.{stack}\.layers\.(\d+)\.fc1\.weight")
    found = [int(m.group(1)) for k in state if (m := pattern.fullmatch(k))]
    return max(found) + 1 if found else 0


def whisper_config(model: CT2Whisper, tokens: WhisperTokens, ct2_config: dict[str, Any]) -> Any:
    """A ``WhisperConfig`` whose dimensions are inferred from the tensors themselves."""
    from transformers import WhisperConfig

    state, settings = model.state, model.settings
    d_model, n_mels = state["model.encoder.conv1.weight"].shape[:2]
    default_heads = d_model // WHISPER_HEAD_DIM
    return WhisperConfig(
        vocab_size=state["model.decoder.embed_tokens.weight"].shape[0],
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_num_layers(state, "encoder"),
        decoder_layers=_num_layers(state, "decoder"),
        encoder_attention_heads=int(settings.get("encoder/num_heads", default_heads)),
        decoder_attention_heads=int(settings.get("decoder/num_heads", default_heads)),
        encoder_ffn_dim=state["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=state["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=state["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=state["model.decoder.embed_positions.weight"].shape[0],
        bos_token_id=tokens.eot,
        eos_token_id=tokens.eot,
        pad_token_id=tokens.eot,
        decoder_start_token_id=tokens.sot,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, tokens.eot])),
        tie_word_embeddings=model.tied_projection,
    )


def _alignment_heads(ct2_config: dict[str, Any], layers: int, heads: int) -> list[list[int]]:
    # Cross-attention heads that track word timing (token timestamps); faster-whisper ships them.
    # Without them, fall back to all heads of the second half of the decoder, as CTranslate2 does.
    pairs = [[int(a), int(b)] for a, b in ct2_config.get("alignment_heads") or []]
    if pairs and all(0 <= a < layers and 0 <= b < heads for a, b in pairs):
        return pairs
    return [[a, b] for a in range(layers // 2, layers) for b in range(heads)]


def generation_config(config: Any, tokens: WhisperTokens, ct2_config: dict[str, Any]) -> Any:
    """Whisper's generation settings, as the hub's openai/whisper-* checkpoints carry them.

    ``_from_model_config=False`` marks them as the checkpoint's own: otherwise transformers rebuilds the
    generation config from the model config on reload and drops ``lang_to_id``/``task_to_id``, so
    ``generate(language=...)`` fails (docs/architecture.md). English-only models get no language/task tables, so
    a plain ``generate()`` starts with ``<|startoftranscript|><|notimestamps|>``. Multilingual ones default
    to ``task="transcribe"``: without it a plain ``generate()`` detects the language but then prompts
    ``<|startoftranscript|><|en|><|notimestamps|>`` with no task token, and the decoder loops (measured
    on whisper-base); the hub checkpoints get the same effect from their ``forced_decoder_ids``.
    """
    from transformers import GenerationConfig

    multilingual = config.vocab_size >= MULTILINGUAL_VOCAB
    settings: dict[str, Any] = {
        "bos_token_id": tokens.eot,
        "eos_token_id": tokens.eot,
        "pad_token_id": tokens.eot,
        "decoder_start_token_id": tokens.sot,
        "max_length": config.max_target_positions,
        "suppress_tokens": list(config.suppress_tokens or []),
        "begin_suppress_tokens": list(config.begin_suppress_tokens or []),
        "no_timestamps_token_id": tokens.notimestamps,
        "prev_sot_token_id": tokens.startofprev,
        "is_multilingual": multilingual,
        "return_timestamps": False,
        "max_initial_timestamp_index": MAX_INITIAL_TIMESTAMP_INDEX,
        "alignment_heads": _alignment_heads(
            ct2_config, config.decoder_layers, config.decoder_attention_heads
        ),
    }
    if multilingual:
        settings["lang_to_id"] = dict(tokens.languages)
        settings["task_to_id"] = {"translate": tokens.translate, "transcribe": tokens.transcribe}
        settings["task"] = "transcribe"
    return GenerationConfig(**settings, _from_model_config=False)


def save_processor(tokenizer_json: Path, config: Any, out_dir: Path) -> int:
    """Write tokenizer (repaired merges + timestamp tokens) and feature extractor files; returns merges added."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    special = [t for t in data["added_tokens"] if t.get("special")]
    repaired = repair_merges(data["model"], {int(t["id"]) for t in data["added_tokens"]})
    add_timestamp_tokens(data, config.vocab_size)
    staged = out_dir / "tokenizer.json"  # save_pretrained rewrites it in place
    staged.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(staged),
        extra_special_tokens=[t["content"] for t in sorted(special, key=lambda t: t["id"])],
        model_max_length=config.max_target_positions,
    )
    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(out_dir)
    return repaired


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ``WhisperForConditionalGeneration`` for ``config`` (built on meta)."""
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("proj_out.weight", None)
    return shapes


def check_state(state: dict[str, torch.Tensor], config: Any) -> None:
    """Every HF parameter filled with the right shape, nothing left over; else a one-line error."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if tuple(state[k].shape) != want[k])
    if missing or unexpected or wrong:
        raise WeightsError(
            f"converted Whisper does not match the HF layout: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}"
        )


# -- conversion and verification -----------------------------------------------------------------------


def convert_whisper(
    parts: Sequence[Path],
    ct2_config_json: Path,
    tokenizer_json: Path,
    out_dir: Path,
    progress: Callable[[int], None] | None = None,
    sanity_check: bool = True,
) -> dict[str, Any]:
    """Convert a faster-whisper model into an HF directory at ``out_dir`` (which must exist), then verify it.

    ``sanity_check=False`` skips the language-model check (for random test weights). Returns facts for
    the completion marker (dimensions, merges repaired, sanity NLLs).
    """
    from safetensors.torch import save_file

    ct2_config = json.loads(ct2_config_json.read_text(encoding="utf-8"))
    tokens = WhisperTokens.from_added_tokens(
        json.loads(tokenizer_json.read_text(encoding="utf-8"))["added_tokens"]
    )
    model = read_ct2_whisper(parts, progress)
    config = whisper_config(model, tokens, ct2_config)
    check_state(model.state, config)
    config.architectures = ["WhisperForConditionalGeneration"]
    config.save_pretrained(out_dir)
    state = {k: v.contiguous() for k, v in sorted(model.state.items())}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    generation_config(config, tokens, ct2_config).save_pretrained(out_dir)
    repaired = save_processor(tokenizer_json, config, out_dir)
    facts = verify_whisper(out_dir, state, sanity_check)
    return facts | {
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "layers": [config.encoder_layers, config.decoder_layers],
        "multilingual": config.vocab_size >= MULTILINGUAL_VOCAB,
        "bpe_merges_repaired": repaired,
    }


def verify_whisper(
    out_dir: Path, state: dict[str, torch.Tensor] | None = None, sanity_check: bool = True
) -> dict[str, float]:
    """Reload ``out_dir`` as transformers would and check it is complete, exact and sane.

    Checks: no missing/unexpected/mismatched keys; tensors equal to ``state`` (if given); tokenizer
    covers the vocabulary and knows ``<|notimestamps|>``; the generation config carries its token
    tables; and the decoder, as a language model, prefers an English sentence to the same words
    scrambled (random or misplaced weights cannot). Returns the two per-token NLLs.
    """
    from transformers import AutoTokenizer, GenerationConfig, WhisperForConditionalGeneration

    loaded: Any = WhisperForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True)
    model, info = loaded
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if problems:
        raise WeightsError(f"{out_dir}: reloading gives {problems}")
    for name, tensor in (state or {}).items():
        if not torch.equal(model.get_parameter(name), tensor):
            raise WeightsError(f"{out_dir}: parameter {name} differs after reload")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    gen: Any = GenerationConfig.from_pretrained(out_dir)  # Whisper keys are not declared attributes
    if (
        len(tokenizer) != model.config.vocab_size
        or tokenizer.all_special_ids[-1] != gen.no_timestamps_token_id
    ):
        raise WeightsError(f"{out_dir}: tokenizer does not match the model's vocabulary")
    if gen.is_multilingual and not ({"lang_to_id", "task_to_id"} <= set(gen.to_dict())):
        raise WeightsError(f"{out_dir}: generation config lacks lang_to_id/task_to_id")
    if not sanity_check:
        return {}
    natural, scrambled = decoder_nll(model.eval(), tokenizer, gen)
    if not natural + 1.0 < scrambled:
        raise WeightsError(f"{out_dir}: sanity check failed (NLL {natural:.2f} vs scrambled {scrambled:.2f})")
    return {"nll_natural": natural, "nll_scrambled": scrambled}


SANITY_TEXT = " The quick brown fox jumps over the lazy dog, and then it runs back into the forest."


@torch.inference_mode()
def decoder_nll(model: Any, tokenizer: Any, gen: Any) -> tuple[float, float]:
    """Mean per-token NLL of :data:`SANITY_TEXT` and of its words reversed, given 30 s of silence."""
    from magnet_asr.audio import N_SAMPLES, log_mel_spectrogram

    features = log_mel_spectrogram(np.zeros(N_SAMPLES, dtype=np.float32), model.config.num_mel_bins)[None]
    encoded = model.get_encoder()(features).last_hidden_state
    prompt = [gen.decoder_start_token_id]
    if gen.is_multilingual:
        prompt += [gen.lang_to_id["<|en|>"], gen.task_to_id["transcribe"]]
    prompt.append(gen.no_timestamps_token_id)

    def nll(text: str) -> float:
        target = tokenizer(text, add_special_tokens=False).input_ids + [gen.eos_token_id]
        ids = torch.tensor([prompt + target])
        logits = model(encoder_outputs=(encoded,), decoder_input_ids=ids[:, :-1]).logits[0, len(prompt) - 1 :]
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(target)))

    scrambled = " " + " ".join(reversed(SANITY_TEXT.split()))
    return nll(SANITY_TEXT), nll(scrambled)
