"""setup_speech_llm: run config -> model, collator, recognizer, learning rates; a MagnetTrainer run on it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_pipeline
from magnet_asr.schema import load_run_config
from magnet_asr.training.recipe import _training_arguments
from magnet_asr.training.speech_llm import setup_speech_llm, speech_llm_settings


def _tiny_models():
    """The tiny random sources of tests/models/test_speech_llm.py (test files are not a package)."""
    path = Path(__file__).parents[1] / "models" / "test_speech_llm.py"
    spec = importlib.util.spec_from_file_location("speech_llm_tiny_sources", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _tiny_models()
sources = TINY.sources  # the module-scoped fixture: tiny Whisper + tiny Llama checkpoints on disk


@pytest.fixture(scope="module")
def whisper_window_sources(tmp_path_factory, sources):
    """``sources`` with a tiny Whisper that has Whisper's 1500 positions (30 s): what a pipeline's feature
    extractor pads every chunk to."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from tiny import TINY_WHISPER

    out = tmp_path_factory.mktemp("whisper_1500")
    torch.manual_seed(0)
    config = WhisperConfig(**{**TINY_WHISPER, "max_source_positions": 1500})
    WhisperForConditionalGeneration(config).save_pretrained(out)
    return str(out), sources[1]


def _config(sources, experiment: str, *extra: str):
    whisper, llm = sources
    return load_run_config(
        [
            f"+experiments={experiment}",
            f"encoder.name={whisper}",
            f"llm.name={llm}",
            "llm.prompt=transcribe the audio .",
            "llm.finetune=lora",  # the tiny tests exercise the LoRA path; full fine-tuning below
            "llm.lora_rank=4",
            "projector.hidden_size=48",
            *extra,
        ]
    )


def test_demo_configs_compose_to_speech_llm_runs():
    base = load_run_config(["+experiments=speech_llm_demo"])
    compressed = load_run_config(["+experiments=speech_llm_demo_compressed"])
    assert base.model == compressed.model == "speech_llm" and base.encoder.freeze
    assert base.projector.stack == 4 and not base.compressor.enabled and base.llm.finetune == "full"
    assert compressed.llm.finetune == "lora" and compressed.training.learning_rate == 3e-4
    # the base keeps its last step (a 23-prompt validation is too noisy to pick by); the compressed
    # variant the best-validated one it was measured with
    assert not _training_arguments(base, Path("runs")).load_best_model_at_end
    assert _training_arguments(compressed, Path("runs")).load_best_model_at_end
    assert compressed.compressor.enabled and compressed.compressor.target == "phoneme"
    # 50 frames/s -> ~11 phoneme segments/s -> stack 2: ~5.5 audio tokens/s against the baseline's 12.5/s
    assert compressed.projector.stack == 2 and 50 / base.projector.stack == 12.5
    # LoRA (llm.finetune=lora) on every linear layer of the base's blocks; the compressed variant keeps
    # the attention-only LoRA it was measured with
    mlp = {"gate_proj", "up_proj", "down_proj"}
    assert mlp < set(base.llm.lora_target_modules) and base.llm.lora_rank == 16
    assert not mlp & set(compressed.llm.lora_target_modules) and compressed.llm.lora_rank == 8
    # both align the projector with CTC first; the compressed variant keeps the encoder and warm-up it
    # was measured with
    assert base.projector.ctc_warmup_steps == 3000 and base.encoder.name == "whisper-base"
    assert compressed.projector.ctc_warmup_steps == 1000 and compressed.encoder.name == "whisper-tiny.en"
    assert base.projector.ctc_loss_weight > 0 and compressed.projector.ctc_loss_weight > 0
    # the base trains on 10,000 synthetic utterances with the real prompts listed 5 times; the compressed
    # variant keeps the 2,000 it was measured with
    assert list(base.data.train) == ["synth:12000", "asterisk"] and base.data.train_repeats == {"asterisk": 5}
    assert list(compressed.data.train) == ["synth", "asterisk"] and compressed.data.train_repeats == {
        "asterisk": 1
    }
    # the CTC variant starts from the trained base run and distils from it: no warm-up of its own
    ctc = load_run_config(["+experiments=speech_llm_demo_ctc"])
    assert ctc.projector.ctc_compression and ctc.projector.ctc_warmup_steps == 0
    assert ctc.distillation.enabled and ctc.distillation.teacher == ctc.training.init_from
    assert ctc.distillation.teacher == "runs/speech_llm_demo/final" and ctc.encoder.name == base.encoder.name
    assert ctc.data == base.data  # the student reads what its teacher read
    # init_from copies tensors by name: a LoRA student would leave a fully fine-tuned teacher's LLM behind
    assert ctc.llm.finetune == base.llm.finetune
    # and the embeddings train in both (frozen, they read synth test 0.330 against 0.308)
    assert not ctc.llm.freeze_embeddings and not base.llm.freeze_embeddings
    # it also passes the tokens where CTC's blank is unsure, and the model is built with that setting
    assert speech_llm_settings(ctc)["ctc_blank_threshold"] == ctc.projector.ctc_blank_threshold == 0.85
    assert base.projector.ctc_blank_threshold is None
    # the base and its CTC student decode with joint CTC / LLM beam search, saved in the model's config
    assert base.llm.ctc_weight == ctc.llm.ctc_weight == 0.2 and compressed.llm.ctc_weight == 0.0
    assert speech_llm_settings(base)["decoding"]["ctc_weight"] == 0.2


def test_setup_builds_the_configured_model(sources):
    cfg = _config(sources, "speech_llm_demo_compressed", "compressor.layers=[2]", "llm.num_beams=2")
    setup = setup_speech_llm(cfg)
    model, collator = setup.model, setup.collator
    assert setup.before_training is not None  # the CTC warm-up the demo experiments configure
    assert model.config.projector_stack == 2 and model.config.predictor_layers == [2]
    assert model.config.decoding["num_beams"] == 2 and model.config.system_prompt == ""
    assert model.encoder.predictors["2"].config.target == "phoneme"
    assert model.encoder.predictors["2"].config.train_sampling == "threshold"  # train rate = eval rate
    assert setup.learning_rates == {"projector.": 1e-3, "predictors.": 1e-3}
    assert collator.n_mels == 8 and collator.num_predictors == 1 and collator.target == "phoneme"
    assert setup.tokenizer.decode(model.prompt.prefix_ids).startswith("<|im_start|> system <|im_end|>")
    assert setup.make_recognizer(model).name == "speech_llm_demo_compressed"
    assert model.encoder_cache is None  # a predictor sits in the encoder


def _utterances(root: Path, count: int):
    import soundfile as sf

    from magnet_asr.data.manifest import Utterance

    rng = np.random.default_rng(0)
    texts = ["a cat sat", "hello world", "the dog", "yes no one two"]
    out = []
    for i in range(count):
        audio = (0.1 * rng.normal(size=4000 + 800 * i)).astype(np.float32)
        sf.write(root / f"u{i}.wav", audio, 16_000)
        out.append(Utterance(f"u{i}", str(root / f"u{i}.wav"), texts[i % 4], len(audio) / 16_000))
    return out


def test_magnet_trainer_trains_evaluates_and_saves_a_speech_llm(whisper_window_sources, tmp_path):
    sources = whisper_window_sources
    from transformers import TrainingArguments

    from magnet_asr.data.collator import SpeechDataset
    from magnet_asr.evaluation.decode import SpeechLLMRecognizer
    from magnet_asr.training.trainer import MagnetTrainer

    torch.manual_seed(0)
    setup = setup_speech_llm(_config(sources, "speech_llm_demo"))
    model, tokenizer, make_recognizer = setup.model, setup.tokenizer, setup.make_recognizer
    utterances = _utterances(tmp_path, 4)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=5e-4,  # LoRA; the projector gets 1e-3 from the config
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = MagnetTrainer(
        model=model,
        args=args,
        train_dataset=SpeechDataset(utterances),
        eval_dataset=SpeechDataset(utterances[:2]),
        data_collator=setup.collator,
        make_recognizer=make_recognizer,
        eval_utterances=utterances[:2],
        learning_rates=setup.learning_rates,
        evaluation_figures=setup.evaluation_figures,
    )
    projector_before = model.projector.linear_in.weight.detach().clone()
    mlp_adapter = next(p for n, p in model.named_parameters() if "down_proj.lora_B" in n)
    trainer.train()
    assert not torch.equal(projector_before, model.projector.linear_in.weight)
    assert mlp_adapter.abs().sum() > 0  # the demo's LoRA reaches the MLPs (zero-initialised B), and trains
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {5e-4, 1e-3}
    assert len(model.encoder_cache.entries) == 4  # frozen encoder, no predictor: cached after epoch 1
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(np.isfinite(h["loss"]) for h in logged) and "compression" in logged[0]
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_wer"])
    # does the LLM read the audio: both losses on the validation pair, logged with the WER
    assert metrics["eval_audio_loss_tokens"] > 0 and np.isfinite(metrics["eval_audio_loss_gap"])
    assert metrics["eval_audio_loss_gap"] == pytest.approx(
        metrics["eval_audio_loss_rolled"] - metrics["eval_audio_loss_own"]
    )

    final = tmp_path / "final"
    trainer.save_model(str(final))  # what the recipe saves into final/
    tokenizer.save_pretrained(str(final))
    setup.feature_extractor.save_pretrained(str(final))
    reloaded = SpeechLLMRecognizer.from_pretrained(str(final))
    audio = [np.asarray(SpeechDataset(utterances)[1]["audio"])]
    assert reloaded.transcribe(audio) == make_recognizer(model).transcribe(audio)

    # PEFT loads the adapters on the base LLM and gives the trained LLM's logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_llm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(sources[1]), str(final / "adapter")
    )
    ids = torch.randint(4, 20, (1, 6))
    torch.testing.assert_close(peft_llm.eval()(input_ids=ids).logits, model.llm.eval()(input_ids=ids).logits)

    # transformers' own ASR pipeline reads final/ in a fresh interpreter: 2 s, and 70 s in 30 s chunks
    proc = run_pipeline(final)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["str", "str"]


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_llm_finetune_modes_from_config(sources, mode):
    model = setup_speech_llm(_config(sources, "speech_llm_demo", f"llm.finetune={mode}")).model
    llm_trains = any(p.requires_grad for p in model.llm.parameters())
    assert llm_trains == (mode == "full")


def test_gradient_checkpointing_keeps_gradients_flowing(sources):
    setup = setup_speech_llm(_config(sources, "speech_llm_demo", "llm.gradient_checkpointing=true"))
    model, collator = setup.model, setup.collator
    assert model.llm.model.gradient_checkpointing
    batch = collator(
        [{"id": "a", "text": "a cat", "audio": np.full(6000, 0.1, np.float32) * np.sin(np.arange(6000))}]
    )
    batch.pop("num_skipped")
    model.train()(**batch).loss.backward()
    assert model.projector.linear_in.weight.grad.abs().sum() > 0


def test_ctc_warmup_trains_the_projector_without_touching_the_llm(sources, tmp_path):
    from types import SimpleNamespace

    from magnet_asr.data.collator import SpeechDataset

    torch.manual_seed(0)
    cfg = _config(
        sources,
        "speech_llm_demo",
        "projector.ctc_loss_weight=0.5",
        "projector.ctc_warmup_steps=40",
        "training.per_device_batch_size=2",
        "training.projector_learning_rate=0.01",
    )
    setup = setup_speech_llm(cfg)
    model = setup.model
    llm_before = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
    projector_before = model.projector.linear_in.weight.detach().clone()
    utterances = _utterances(tmp_path, 4)
    stats = setup.before_training(SimpleNamespace(train_dataset=SpeechDataset(utterances), accelerator=None))
    assert stats["ctc_warmup_steps"] == 40 and stats["skipped_batches"] == 0
    assert stats["ctc_loss_last"] < 0.8 * stats["ctc_loss_first"]
    assert not torch.equal(projector_before, model.projector.linear_in.weight)
    assert all(torch.equal(p, llm_before[n]) for n, p in model.llm.named_parameters())
    assert len(model.encoder_cache.entries) == 4  # later epochs read the frozen encoder's cache
    batch = setup.collator([SpeechDataset(utterances)[0]])
    batch.pop("num_skipped")
    out = model(**batch)
    torch.testing.assert_close(out.loss, out.asr_loss + 0.5 * out.ctc_loss)


def test_ctc_warmup_trains_the_top_encoder_layers_at_their_own_rate(sources, tmp_path):
    from types import SimpleNamespace

    from magnet_asr.data.collator import SpeechDataset

    data = SimpleNamespace(train_dataset=SpeechDataset(_utterances(tmp_path, 4)), accelerator=None)
    changed = {}
    for rate in (0.0, 0.01):
        cfg = _config(
            sources,
            "speech_llm_demo",
            "projector.ctc_warmup_steps=4",
            "training.per_device_batch_size=2",
            "encoder.train_layers=1",
            f"training.encoder_learning_rate={rate}",
        )
        setup = setup_speech_llm(cfg)
        model = setup.model
        assert setup.learning_rates["encoder.layer"] == rate and model.config.encoder_train_layers == 1
        top = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "encoder." in n
        }
        projector_before = model.projector.linear_in.weight.detach().clone()
        setup.before_training(data)
        assert not torch.equal(projector_before, model.projector.linear_in.weight)
        changed[rate] = [n for n, p in model.named_parameters() if n in top and not torch.equal(p, top[n])]
    # the top layers train in the warm-up, at the configured rate rather than the projector's
    assert changed[0.0] == [] and len(changed[0.01]) > 0
    with pytest.raises(ValueError, match="only a speech_llm run"):
        from magnet_asr.training.recipe import _setup_model

        _setup_model(load_run_config(["+experiments=magnet_demo", "encoder.train_layers=1"]))


WARMUP_RANK = """
import json, sys
import torch
from accelerate import Accelerator
from magnet_asr.data.collator import SpeechDataset
from magnet_asr.data.manifest import read_manifest
from magnet_asr.schema import load_run_config
from magnet_asr.training.recipe import weights_checksum
from magnet_asr.training.speech_llm import ctc_warmup, setup_speech_llm

manifest, out, *overrides = sys.argv[1:]
accelerator = Accelerator(cpu=True, mixed_precision="bf16")
torch.manual_seed(0)  # as the recipe seeds before building: the same projector on every rank
setup = setup_speech_llm(load_run_config(overrides))
model, seen, autocast = setup.model, [], []
model.projector.register_forward_hook(lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))
before = weights_checksum(model.projector)

def collate(items):
    seen.extend(item["id"] for item in items)
    return setup.collator(items)

stats = ctc_warmup(model, SpeechDataset(read_manifest(manifest)), collate, steps=3, batch_size=2,
                   learning_rate=0.01, accelerator=accelerator)
result = {"seen": sorted(set(seen)), "autocast": autocast, "before": before,
          "after": weights_checksum(model.projector), "skipped": stats["skipped_batches"],
          "magnet_asr": __import__("magnet_asr").__file__}
with open(f"{out}/rank{accelerator.process_index}.json", "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
def test_ctc_warmup_shards_the_data_and_keeps_the_ranks_alike(sources, tmp_path):
    """Two CPU processes (torchrun, gloo): each rank warms up on its own share of the utterances, under
    the configured bf16 autocast, and both end with the same projector."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import magnet_asr

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    utterances = _utterances(tmp_path, 6)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": u.id, "audio": u.audio, "text": u.text, "duration": u.duration}) + "\n"
            for u in utterances
        )
    )
    (tmp_path / "rank.py").write_text(WARMUP_RANK)
    whisper, llm = sources
    overrides = [
        "+experiments=speech_llm_demo",
        f"encoder.name={whisper}",
        f"llm.name={llm}",
        "llm.prompt=transcribe the audio .",
        "llm.lora_rank=4",
        "projector.hidden_size=48",
        "projector.ctc_loss_weight=0.5",
    ]
    command = [torchrun, "--nproc_per_node", "2", "--master_port", "29543", str(tmp_path / "rank.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*command, str(manifest), str(tmp_path), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["magnet_asr"] == magnet_asr.__file__  # the ranks ran this checkout
    assert ranks[0]["seen"] == ["u0", "u2", "u4"] and ranks[1]["seen"] == ["u1", "u3", "u5"]
    assert all(r["autocast"] and all(r["autocast"]) for r in ranks)  # bf16, as training.precision says
    assert ranks[0]["before"] == ranks[1]["before"] != ranks[0]["after"]
    assert ranks[0]["after"] == ranks[1]["after"]  # gradients averaged over the ranks before each step
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 0


def test_ctc_warmup_without_a_ctc_head_is_a_config_error(sources):
    with pytest.raises(ValueError, match="ctc_loss_weight"):
        setup_speech_llm(
            _config(sources, "speech_llm_demo", "projector.ctc_loss_weight=0", "projector.ctc_warmup_steps=5")
        )


def test_speech_llm_distils_response_tokens_from_a_speech_llm_run(sources, tmp_path):
    from magnet_asr.data.collator import SpeechDataset
    from magnet_asr.training.distillation import BATCH_KEYS

    torch.manual_seed(0)
    teacher_setup = setup_speech_llm(_config(sources, "speech_llm_demo"))
    teacher_dir = tmp_path / "teacher"
    teacher_setup.model.save_pretrained(str(teacher_dir))
    teacher_setup.tokenizer.save_pretrained(str(teacher_dir))
    distil = ["distillation.enabled=true", f"distillation.teacher={teacher_dir}", "distillation.top_k=8"]
    distil.append(f"distillation.cache_dir={tmp_path / 'cache'}")
    utterances = _utterances(tmp_path, 3)
    items = [SpeechDataset(utterances)[i] for i in range(3)]

    def parts(experiment: str, *extra: str, same_weights: bool = False):
        setup = setup_speech_llm(_config(sources, experiment, *distil, *extra))
        if same_weights:
            setup.model.load_state_dict(teacher_setup.model.state_dict())
        batch = setup.collator(items)
        batch.pop("num_skipped")
        inputs = {k: v for k, v in batch.items() if k not in BATCH_KEYS}
        outputs = setup.model.eval()(**inputs)
        return setup, setup.distiller.loss(outputs, batch)

    setup, (total, found) = parts("speech_llm_demo", same_weights=True)
    assert found["distill_logits_loss"].abs() < 1e-5 and "distill_encoder_loss" not in found
    assert setup.distiller.report.computed == 3  # the teacher ran once per utterance ...
    setup, (total, found) = parts("speech_llm_demo_ctc", "projector.ctc_loss_weight=0.5")
    assert setup.distiller.report is None and setup.distiller.cache.reads == 3  # ... and is read after
    assert found["distill_logits_loss"] > 0
    total.backward()
    assert setup.model.projector.linear_in.weight.grad.abs().sum() > 0


def test_speech_llm_distillation_needs_a_speech_llm_teacher(sources):
    with pytest.raises(ValueError, match="trained SpeechLLM"):
        setup_speech_llm(_config(sources, "speech_llm_demo", "distillation.enabled=true"))
    whisper, _ = sources
    with pytest.raises(ValueError, match="cannot teach"):
        setup_speech_llm(
            _config(
                sources, "speech_llm_demo", "distillation.enabled=true", f"distillation.teacher={whisper}"
            )
        )


def test_init_from_starts_the_ctc_student_where_its_teacher_ended(sources, tmp_path):
    from magnet_asr.training.builders import initialize_from

    torch.manual_seed(0)
    teacher = setup_speech_llm(_config(sources, "speech_llm_demo")).model
    with torch.no_grad():  # a "trained" teacher: projector and LoRA away from their initial values
        for param in teacher.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    teacher.save_pretrained(str(tmp_path / "teacher"))
    torch.manual_seed(1)
    student = setup_speech_llm(_config(sources, "speech_llm_demo_ctc", "distillation=none")).model
    trained = {n: p for n, p in teacher.named_parameters() if p.requires_grad}
    differs = [n for n, p in student.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])]
    assert differs  # before: a fresh student
    counts = initialize_from(student, str(tmp_path / "teacher"))
    assert counts == {"loaded": len(trained), "fresh_trained": 0}
    for name, param in student.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, trained[name]), name
    assert student.config.ctc_compression and not teacher.config.ctc_compression  # its own config stays


def test_init_from_refuses_another_architecture_and_a_missing_directory(sources, tmp_path):
    from magnet_asr.training.builders import initialize_from

    setup_speech_llm(_config(sources, "speech_llm_demo")).model.save_pretrained(str(tmp_path / "run"))
    wider = setup_speech_llm(_config(sources, "speech_llm_demo", "projector.hidden_size=32")).model
    with pytest.raises(ValueError, match=r"training.init_from .*projector\..* in this model"):
        initialize_from(wider, str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="training.init_from"):
        initialize_from(wider, str(tmp_path / "nowhere"))
    # a fully fine-tuned run's embedding table would be loaded into a frozen one and lost at the next save
    full = setup_speech_llm(_config(sources, "speech_llm_demo", "llm.finetune=full")).model
    full.save_pretrained(str(tmp_path / "full"))
    frozen = _config(sources, "speech_llm_demo", "llm.finetune=full", "llm.freeze_embeddings=true")
    with pytest.raises(ValueError, match=r"init_from .*keeps frozen.*embed_tokens"):
        initialize_from(setup_speech_llm(frozen).model, str(tmp_path / "full"))
