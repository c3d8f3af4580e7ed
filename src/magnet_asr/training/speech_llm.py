"""SpeechLLM training setup, for the ``magnet-asr train`` recipe when ``cfg.model == "speech_llm"``.

:func:`setup_speech_llm` turns the Hydra groups into what the recipe's trainer needs:

- ``encoder``: the Whisper checkpoint, ``freeze`` (default for SpeechLLM runs: true);
- ``compressor``: boundary predictors inside the encoder (learned compression, trained even when the
  encoder is frozen), settings shared with MagnetWhisper (:func:`~magnet_asr.training.builders.predictor_settings`);
- ``projector``: stacking ``k``, MLP width, dropout, encoder-output cache size, and the auxiliary CTC
  loss against the LLM's token embeddings with its warm-up (:func:`ctc_warmup`);
- ``llm``: the causal LM, ``finetune`` (lora | full | frozen), LoRA settings, instruction, decoding;
- ``training``: separate learning rates for the projector and the predictors (LoRA gets the base rate).
  SLAM-ASR trains a freshly initialized projector with a larger rate than adapters on a pretrained LLM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from magnet_asr.evaluation.decode import SpeechLLMRecognizer
from magnet_asr.models.speech_llm import SpeechLLM, build_speech_llm
from magnet_asr.training.builders import ModelSetup, encoder_settings
from magnet_asr.training.trainer import parameter_groups

__all__ = ["ctc_warmup", "learning_rates", "setup_speech_llm", "speech_llm_settings"]


def _decoding(cfg: Any) -> dict[str, Any]:
    llm = cfg.llm
    return {
        "num_beams": llm.num_beams,
        "max_new_tokens_per_second": llm.max_new_tokens_per_second,
        "repetition_penalty": llm.repetition_penalty,
        "no_repeat_ngram_size": llm.no_repeat_ngram_size,
        "loop_guard": llm.loop_guard,
        "max_window_seconds": llm.max_window_seconds,
        "ctc_weight": llm.ctc_weight,
        "ctc_pre_beam": llm.ctc_pre_beam,
    }


def speech_llm_settings(cfg: Any) -> dict[str, Any]:
    """:class:`~magnet_asr.models.speech_llm.SpeechLLMConfig` fields from a composed run config."""
    llm, projector = cfg.llm, cfg.projector
    return {
        "encoder_settings": encoder_settings(cfg),
        "freeze_encoder": bool(cfg.encoder.freeze),
        "encoder_train_layers": int(cfg.encoder.train_layers),
        "llm_finetune": llm.finetune,
        "llm_freeze_embeddings": bool(llm.freeze_embeddings),
        "lora_rank": llm.lora_rank,
        "lora_alpha": llm.lora_alpha,
        "lora_dropout": llm.lora_dropout,
        "lora_target_modules": list(llm.lora_target_modules),
        "projector_stack": projector.stack,
        "projector_hidden_size": projector.hidden_size,
        "projector_dropout": projector.dropout,
        "projector_num_layers": projector.num_layers,
        "projector_num_heads": projector.num_heads,
        "ctc_loss_weight": projector.ctc_loss_weight,
        "ctc_compression": projector.ctc_compression,
        "ctc_blank_threshold": projector.ctc_blank_threshold,
        "ctc_max_tokens_per_second": projector.ctc_max_tokens_per_second,
        "ctc_pooling": projector.ctc_pooling,
        "encoder_cache_gb": projector.encoder_cache_gb,
        "instruction": llm.prompt,
        "system_prompt": llm.system_prompt,
        "decoding": _decoding(cfg),
    }


def learning_rates(cfg: Any) -> dict[str, float]:
    """``{parameter-name substring: learning rate}`` for ``MagnetTrainer(learning_rates=...)``."""
    rates: dict[str, float] = {}
    if cfg.training.projector_learning_rate is not None:
        rates["projector."] = float(cfg.training.projector_learning_rate)
    if cfg.training.predictor_learning_rate is not None:
        rates["predictors."] = float(cfg.training.predictor_learning_rate)
    if cfg.training.encoder_learning_rate is not None:
        rates["encoder.layer"] = float(cfg.training.encoder_learning_rate)  # layers.N. and layer_norm.
    return rates


def ctc_warmup(
    model: SpeechLLM,
    dataset: Any,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    accelerator: Any = None,
    learning_rates: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Train the projector (and predictors) on the CTC loss alone before the LLM trains.

    Why: a new projector learns only through the LLM otherwise, and with a frozen or LoRA LLM that
    alignment phase is long (issue 5: 600 CPU steps left the loss at 3.6 and the LLM ignoring the
    audio). Without the LLM's forward a step costs about 1/20 of a full one, and a few hundred of
    them already make the audio tokens decodable by CTC alone (the closing note of issue 5 has the
    figures). The frozen encoder's outputs come from the model's cache after the first epoch.

    It runs before the Trainer wraps the model, so it does what the Trainer would
    (docs/architecture.md, "Several processes"), given the run's ``accelerator``: each rank reads its
    own share of the data (``dataset[rank::world]``); the parts it uses (encoder, projector, the LLM's
    token embeddings, not the LLM) run on the accelerator's device, and go back where they were after
    (under FSDP the model waits on the CPU for its wrapping); the forward runs under the configured
    mixed precision (``accelerator.autocast()``, with a gradient scaler for fp16); and the gradients are
    averaged over the ranks before every step, so every rank keeps the same projector. Without an
    accelerator: one process, the model's device, fp32.

    Bad batches (every sample unreadable, or a non-finite loss) are skipped and counted; under several
    processes the ranks skip together (the gradient average is a collective every rank must enter).
    ``learning_rates``: ``{parameter-name substring: rate}`` as the Trainer takes them (:func:`learning_rates`);
    the other parameters train at ``learning_rate``.
    Returns the figures the run reports: steps, first and last mean CTC loss of this rank (without the
    boundary loss that the predictors also train on), seconds, skipped batches.
    """
    from contextlib import nullcontext

    from torch.utils.data import DataLoader, Subset

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("llm.")]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(
        parameter_groups(named, learning_rates or {}, learning_rate), lr=learning_rate
    )
    generator = torch.Generator().manual_seed(seed)
    shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    loader = DataLoader(shard, batch_size, shuffle=True, collate_fn=collator, generator=generator)
    home = next(model.parameters()).device
    device = accelerator.device if accelerator else home
    parts = [model.encoder, model.projector, model.llm.get_input_embeddings()]
    for part in parts:
        part.to(device)
    fp16 = accelerator is not None and accelerator.mixed_precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    model.train()
    losses: list[float] = []
    skipped, done, start = 0, 0, time.perf_counter()
    with tqdm(total=steps, desc="CTC warm-up (projector)", disable=rank > 0) as progress:
        while done < steps:
            for batch in loader:
                if done >= steps:
                    break
                done += 1
                progress.update(1)
                optimizer.zero_grad(set_to_none=False)
                loss = None
                if "input_features" in batch:
                    with accelerator.autocast() if accelerator else nullcontext():
                        loss, audio = model.alignment_loss(
                            batch["input_features"].to(device),
                            batch["attention_mask"].to(device),
                            batch["labels"].to(device),
                            batch["target_counts"].to(device) if "target_counts" in batch else None,
                            batch["cache_keys"],
                        )
                    if torch.isfinite(loss):
                        scaler.scale(loss).backward()
                    else:
                        loss = None
                if not _average_gradients(params, bad=loss is None, world=world):
                    skipped += 1
                    continue
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                assert loss is not None  # a rank without a loss made every rank skip
                ctc = loss.detach().float()
                if audio.boundary_loss is not None:  # report the CTC part alone
                    ctc = ctc - model.config.boundary_loss_weight * audio.boundary_loss.detach().float()
                losses.append(float(ctc))
                progress.set_postfix(ctc_loss=f"{losses[-1]:.3f}")
    for part in parts:
        part.to(home)
    window = max(1, min(50, len(losses) // 4))
    stats = {
        "ctc_warmup_steps": steps,
        "ctc_loss_first": sum(losses[:window]) / window if losses else math.nan,
        "ctc_loss_last": sum(losses[-window:]) / window if losses else math.nan,
        "seconds": round(time.perf_counter() - start, 1),
        "skipped_batches": skipped,
    }
    if rank == 0:
        print(
            f"CTC warm-up: {steps} steps in {stats['seconds']} s, CTC loss {stats['ctc_loss_first']:.3f} -> "
            f"{stats['ctc_loss_last']:.3f}, {skipped} batch(es) skipped"
            + (f" ({world} processes, each on its share of the data)" if world > 1 else "")
        )
    return stats


def _average_gradients(params: list[torch.nn.Parameter], bad: bool, world: int) -> bool:
    """Average the gradients of ``params`` over ``world`` ranks in one all-reduce, with a flag for a rank
    whose batch was bad (its gradients are zero); returns whether the step goes ahead (no rank was
    bad). A gradient that is None counts as zero: every rank sends the same layout."""
    if world == 1:
        return not bad
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [grads[0].new_tensor([float(bad)]).float()])
    dist.all_reduce(flat)
    if flat[-1] > 0:
        return False
    flat = flat[:-1] / world
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset : offset + grad.numel()].view_as(grad).to(grad.dtype)
        offset += grad.numel()
    return True


def setup_speech_llm(cfg: Any) -> ModelSetup:
    """The model, tokenizer, collator, recognizer factory and learning rates of a ``speech_llm`` run,
    and the CTC warm-up (``projector.ctc_warmup_steps``) to run before training.

    The tokenizer carries the added ``<audio>`` token; save it beside the model (``from_pretrained`` of
    the recognizer falls back to the LLM's own tokenizer otherwise).
    """
    from transformers import WhisperFeatureExtractor

    from magnet_asr.data.llm_collator import SpeechLLMCollator

    projector = cfg.projector
    if projector.ctc_warmup_steps > 0 and projector.ctc_loss_weight <= 0:
        raise ValueError("projector.ctc_warmup_steps needs the CTC head: set projector.ctc_loss_weight > 0")
    model, tokenizer = build_speech_llm(cfg.encoder.name, cfg.llm.name, **speech_llm_settings(cfg))
    if cfg.llm.gradient_checkpointing or cfg.encoder.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    collator = SpeechLLMCollator(
        tokenizer,
        model.prompt,
        n_mels=int(model.encoder.config.num_mel_bins),
        target=cfg.compressor.target if cfg.compressor.enabled else None,
        num_predictors=len(model.config.predictor_layers),
        boundaries_per_unit=cfg.compressor.boundaries_per_unit,
    )

    def make_recognizer(trained: Any) -> SpeechLLMRecognizer:
        return SpeechLLMRecognizer(trained, tokenizer, name=cfg.run_name)

    def warm_up(trainer: Any) -> dict[str, Any]:
        t = cfg.training
        return ctc_warmup(
            model,
            trainer.train_dataset,
            collator,
            steps=projector.ctc_warmup_steps,
            batch_size=t.per_device_batch_size,
            learning_rate=float(t.projector_learning_rate or t.learning_rate),
            seed=t.seed,
            accelerator=trainer.accelerator,
            learning_rates={k: v for k, v in learning_rates(cfg).items() if k != "projector."},
        )

    def audio_figures(trained: Any, trainer: Any) -> dict[str, float]:
        from accelerate.utils import gather_object

        from magnet_asr.training.audio_reliance import audio_loss_gap

        return audio_loss_gap(
            trained,
            trainer.eval_dataset,
            collator,
            trainer.args.per_device_eval_batch_size,
            rank=trainer.accelerator.process_index,
            world_size=trainer.accelerator.num_processes,
            gather=gather_object,
        )

    distiller = None
    if cfg.distillation.enabled:  # KL on the response tokens from a trained (uncompressed) SpeechLLM
        from magnet_asr.training.distillation import build_distiller

        distiller = build_distiller(cfg)
        collator.keep_ids = True
    return ModelSetup(
        model,
        tokenizer,
        collator,
        make_recognizer,
        learning_rates(cfg),
        before_training=warm_up if projector.ctc_warmup_steps > 0 else None,
        distiller=distiller,
        feature_extractor=WhisperFeatureExtractor(feature_size=model.encoder.config.num_mel_bins),
        evaluation_figures=audio_figures,
    )
