"""The SpeechLLM's processor: its chat prompt around the audio, and the ``<audio>`` placeholders.

**Where the prompt is assembled.** With learned compression the number of audio tokens of a sample is
known only after the encoder has run, so the collator cannot write the final token sequence. Instead:

- :class:`ChatPrompt` renders the LLM's own chat template *once* (``apply_chat_template`` with a user
  turn ``"<instruction>\\n<audio>"`` and the generation prompt) and splits it at the single ``<audio>``
  placeholder into ``prefix_ids`` / ``suffix_ids``. These ids are stored in the model config, so training
  and inference use the very same template (docs/architecture.md, "Known traps").
- :class:`~magnet_asr.data.llm_collator.SpeechLLMCollator` batches features, masks and the tokenized
  *response* (transcript + end-of-turn token) only.
- The model encodes the audio, counts the projector outputs ``n_i`` of each sample and calls
  :meth:`ChatPrompt.assemble`: ``prefix + [<audio>] * n_i + suffix + response``, labels only on the
  response, right-padded for training and left-padded for generation. The ``<audio>`` positions are
  then overwritten with the projector outputs (as Ultravox does with its ``<|audio|>`` placeholder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from magnet_asr.data.collator import IGNORE_INDEX

__all__ = ["AUDIO_TOKEN", "DEFAULT_INSTRUCTION", "ChatPrompt", "PromptBatch", "prepare_tokenizer"]

DEFAULT_INSTRUCTION = "Transcribe the audio."
AUDIO_TOKEN = "<audio>"
_SENTINEL = "TRANSCRIPTSENTINEL"  # a plain word: any chat template renders it verbatim


def prepare_tokenizer(tokenizer: Any, audio_token: str = AUDIO_TOKEN) -> Any:
    """Add ``audio_token`` as a special token (in place; returns the tokenizer).

    The LLM's embedding matrix is *not* resized: ``<audio>`` positions never go through the embedding
    table (the model writes projector outputs there), so the id may lie past the LLM's vocabulary.
    """
    if audio_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([audio_token], special_tokens=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _user_content(instruction: str, audio_token: str) -> str:
    # Instruction first, audio last: the answer starts right after the audio it transcribes.
    return instruction if audio_token in instruction else f"{instruction}\n{audio_token}"


def _messages(instruction: str, audio_token: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": _user_content(instruction, audio_token)}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


@dataclass
class PromptBatch:
    """An assembled batch: ``input_ids``, ``attention_mask``, ``audio_mask`` (bool) ``(B, T)`` and
    ``labels (B, T)`` (-100 outside the response; None when no responses were given)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    audio_mask: torch.Tensor
    labels: torch.Tensor | None = None


@dataclass
class ChatPrompt:
    """The rendered chat template around the audio, as token ids.

    ``prefix_ids`` / ``suffix_ids``: the generation prompt before / after the ``<audio>`` slot.
    ``end_id``: the end-of-turn token that closes a response (trained on, and a stop token).
    ``stop_ids``: tokens that end generation (end-of-turn and end-of-sequence).
    """

    prefix_ids: list[int]
    suffix_ids: list[int]
    audio_token_id: int
    end_id: int
    stop_ids: list[int]
    pad_id: int

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        instruction: str = "Transcribe the audio.",
        system_prompt: str | None = None,
        audio_token: str = AUDIO_TOKEN,
    ) -> ChatPrompt:
        """Render ``tokenizer``'s chat template (a plain ``instruction\\n<audio>\\n`` without one)."""
        prepare_tokenizer(tokenizer, audio_token)
        audio_id = tokenizer.convert_tokens_to_ids(audio_token)
        messages = _messages(instruction, audio_token, system_prompt)
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            end_id = _end_of_turn_id(tokenizer, messages)
        else:
            text = "".join(m["content"] + "\n" for m in messages)
            end_id = tokenizer.eos_token_id
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if ids.count(audio_id) != 1:
            raise ValueError(f"the rendered prompt must hold exactly one {audio_token}, got {text!r}")
        cut = ids.index(audio_id)
        stops = [end_id] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, end_id) else [])
        return cls(ids[:cut], ids[cut + 1 :], audio_id, end_id, stops, int(tokenizer.pad_token_id))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatPrompt:
        return cls(**data)

    def response_ids(self, tokenizer: Any, text: str) -> list[int]:
        """Transcript tokens followed by the end-of-turn token (what the model learns to write)."""
        return tokenizer(text, add_special_tokens=False).input_ids + [self.end_id]

    def sequence(self, num_audio: int, response: Sequence[int] = ()) -> list[int]:
        return [*self.prefix_ids, *([self.audio_token_id] * num_audio), *self.suffix_ids, *response]

    def assemble(
        self,
        audio_counts: Sequence[int],
        responses: Sequence[Sequence[int]] | None = None,
        padding_side: str = "right",
    ) -> PromptBatch:
        """Token ids for a batch: ``prefix + <audio> * n_i + suffix (+ response_i)``.

        ``padding_side='right'`` for training and scoring (positions 0.. per sample, so logits do not
        depend on the batch); ``'left'`` for generation (every prompt ends at the last column).
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if responses is not None and len(responses) != len(audio_counts):
            raise ValueError(f"{len(responses)} responses for {len(audio_counts)} audio samples")
        rows = [self.sequence(int(n), responses[i] if responses else ()) for i, n in enumerate(audio_counts)]
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX) if responses is not None else None
        for i, row in enumerate(rows):
            start = longest - len(row) if padding_side == "left" else 0
            input_ids[i, start : start + len(row)] = torch.tensor(row)
            attention[i, start : start + len(row)] = 1
            if labels is not None and responses is not None and len(responses[i]):
                end = start + len(row)
                labels[i, end - len(responses[i]) : end] = torch.tensor(list(responses[i]))
        audio_mask = (input_ids == self.audio_token_id) & attention.bool()
        return PromptBatch(input_ids, attention, audio_mask, labels)


def _end_of_turn_id(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """The first token the template writes after an assistant message (``<|im_end|>``, ``<|eot_id|>``)."""
    conversation = [*messages, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    tail = text.split(_SENTINEL, 1)[1] if _SENTINEL in text else ""
    tail_ids = tokenizer(tail, add_special_tokens=False).input_ids if tail.strip() else []
    if tail_ids:
        return int(tail_ids[0])
    if tokenizer.eos_token_id is None:
        raise ValueError("the chat template closes no turn and the tokenizer has no eos token")
    return int(tokenizer.eos_token_id)
