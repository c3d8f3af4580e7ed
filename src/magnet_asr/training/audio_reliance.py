"""Does the LLM read the audio? The response loss with each utterance's own audio against the loss with
the batch's audio rolled by one.

A SpeechLLM can lower its loss by learning the transcripts' language alone (issue 15: telephone prompts
are formulaic). Pairing every transcript with another utterance's audio (``roll(audio, 1)`` along the batch)
removes what the audio tells; the gap ``rolled - own`` is what the model takes from it: about zero for a
model that ignores the audio, several nats per token for one that reads it. Computed on the validation set
at each evaluation and written to ``results.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from magnet_asr.data.collator import IGNORE_INDEX

__all__ = ["AUDIO_KEYS", "audio_loss_gap", "roll_audio"]

# the batch entries that belong to an utterance's audio (the transcript's labels stay in place)
AUDIO_KEYS = ("input_features", "attention_mask", "cache_keys", "target_counts")


def roll_audio(batch: dict[str, Any], shifts: int = 1) -> dict[str, Any]:
    """``batch`` with its audio rolled by ``shifts`` along the batch: sample ``i`` gets the audio of sample
    ``i - shifts`` and keeps its own labels. ``target_counts`` is ``(P, B)``: rolled along its batch dim."""
    out = dict(batch)
    for key in AUDIO_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            out[key] = torch.roll(value, shifts, dims=1 if key == "target_counts" else 0)
        else:  # a list (cache keys): the cached encoder outputs travel with their audio
            out[key] = value[-shifts:] + value[:-shifts]
    return out


@torch.no_grad()
def audio_loss_gap(
    model: torch.nn.Module,
    dataset: Any,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list[Any]], list[Any]] | None = None,
) -> dict[str, float]:
    """Mean response-token loss (``asr_loss``) with own and with rolled audio over ``dataset`` (its
    ``rank::world_size`` share on this process; ``gather`` = accelerate's ``gather_object`` joins the
    shares), in eval mode. Returns ``audio_loss_own``, ``audio_loss_rolled``, ``audio_loss_gap``
    (rolled - own) and ``audio_loss_tokens``; batches of one sample (nothing to roll) are left out."""
    indices = list(range(rank, len(dataset), world_size))
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size, shuffle=False, collate_fn=collator
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0]  # own loss x tokens, rolled loss x tokens, tokens
    for batch in loader:
        if "input_features" not in batch or batch["input_features"].shape[0] < 2:
            continue
        inputs = {k: batch[k] for k in (*AUDIO_KEYS, "labels") if k in batch}
        count = float((batch["labels"] != IGNORE_INDEX).sum())
        for slot, candidate in enumerate((inputs, roll_audio(inputs))):
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in candidate.items()}
            sums[slot] += float(model(**moved).asr_loss) * count
        sums[2] += count
    model.train(was_training)
    shares = gather([tuple(sums)]) if gather is not None else [tuple(sums)]
    own, rolled, tokens = (sum(share[i] for share in shares) for i in range(3))
    if not tokens:
        return {}
    return {
        "audio_loss_own": own / tokens,
        "audio_loss_rolled": rolled / tokens,
        "audio_loss_gap": (rolled - own) / tokens,
        "audio_loss_tokens": float(tokens),
    }
