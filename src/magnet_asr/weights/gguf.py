"""Convert a GGUF causal LM (e.g. SmolLM2-135M-Instruct, Q4_1) into a Hugging Face directory.

transformers reads GGUF through the ``gguf`` package and dequantizes every tensor to float32; the
tokenizer (and its chat template) comes from the GGUF metadata. The result is saved as safetensors so
that later loads are plain ``from_pretrained(dir)``: fast, no ``gguf`` needed, and LoRA/training work on
ordinary float weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from magnet_asr.weights.packages import WeightsError

SANITY_TEXT = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."


def load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a GGUF file, dequantized to float32."""
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file; fail with the fix instead
    except ImportError:
        raise WeightsError("reading GGUF weights needs the 'gguf' package; run `pip install gguf`") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model, tokenizer


def _plain_checkpoint(model: Any, tokenizer: Any, name: str) -> None:
    # The loaded model remembers its GGUF origin (a "gguf" quantizer and quantization_config) and the
    # GGUF's internal training-run name (general.name). The weights are already plain float32, so saving them as a quantized
    # checkpoint would be wrong: a reload would look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.__dict__.pop("_model_name_or_path", None)
    model.config._name_or_path = name
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    # GGUF metadata has no tokenizer length limit (transformers writes ~1e30); use the model's context.
    tokenizer.model_max_length = model.config.max_position_embeddings
    for key in ("is_local", "local_files_only"):  # facts about this load, not about the tokenizer
        tokenizer.init_kwargs.pop(key, None)


def convert_gguf_causal_lm(gguf_path: Path, out_dir: Path, name: str) -> dict[str, Any]:
    """Write ``out_dir`` (must exist): config, float32 safetensors, tokenizer with chat template."""
    model, tokenizer = load_gguf(gguf_path)
    if not tokenizer.chat_template:
        raise WeightsError(f"{gguf_path.name}: the GGUF carries no chat template")
    _plain_checkpoint(model, tokenizer, name)
    model.generation_config._from_model_config = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    facts = verify_causal_lm(out_dir, model)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_type": model.config.model_type,
    } | facts


def verify_causal_lm(out_dir: Path, reference: Any | None = None) -> dict[str, float]:
    """Reload ``out_dir`` and check: complete, same logits as ``reference``, chat template, sane LM.

    The sanity check: an English sentence must get a much lower per-token NLL than the same words
    reversed, which random or misassigned weights cannot manage. Returns the two NLLs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded: Any = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    model, info = loaded
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if problems:
        raise WeightsError(f"{out_dir}: reloading gives {problems}")
    if getattr(model.config, "quantization_config", None) is not None:
        raise WeightsError(f"{out_dir}: config still carries a quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if not tokenizer.chat_template:
        raise WeightsError(f"{out_dir}: tokenizer lost its chat template")
    ids = tokenizer(SANITY_TEXT, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model.eval()(ids).logits
        if reference is not None and not torch.allclose(logits, reference.eval()(ids).logits, atol=1e-4):
            raise WeightsError(f"{out_dir}: reloaded model gives different logits")
    natural = lm_nll(model, tokenizer, SANITY_TEXT)
    scrambled = lm_nll(model, tokenizer, " ".join(reversed(SANITY_TEXT.split())))
    if not natural + 1.0 < scrambled:
        raise WeightsError(f"{out_dir}: sanity check failed (NLL {natural:.2f} vs scrambled {scrambled:.2f})")
    return {"nll_natural": natural, "nll_scrambled": scrambled}


@torch.inference_mode()
def lm_nll(model: Any, tokenizer: Any, text: str) -> float:
    """Mean per-token negative log-likelihood of ``text`` under a causal LM."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    return float(model(ids, labels=ids).loss)
