"""`magnet-asr train` end to end on a tiny model: checkpoints, bad samples, atomic saves, resume, DDP."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import run_pipeline
from processes import two_process_launcher

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "model.safetensors")


def test_train_end_to_end_skips_bad_samples(
    tmp_path, tiny_whisper_dir, speech_manifest, train_args, start_training
):
    out_dir = tmp_path / "run"
    overrides = train_args(
        tiny_whisper_dir,
        speech_manifest,
        out_dir,
        **{
            "compressor": "phoneme",
            "compressor.loss_weight": 1.0,
            "compressor.phone_supervision_weight": 1.0,
            "training.eval_steps": 2,
            "training.average_checkpoints": 2,
        },
    )
    log = finish(start_training(overrides))
    results = json.loads((out_dir / "results.json").read_text())
    # final/ is the mean of the last two checkpoints
    assert results["averaged_checkpoints"] == [4, 6] and "the checkpoints at steps [4, 6]" in log
    four, six = (load_file(out_dir / name / "model.safetensors") for name in ("checkpoint-4", "checkpoint-6"))
    for name, tensor in final_weights(out_dir).items():
        torch.testing.assert_close(tensor, (four[name] + six[name]) / 2, msg=name)
    assert results["train_skipped_samples"] >= 1  # the corrupt file, every time it is drawn
    figures = results["train_figures"]  # what scripts/gpu_check.sh prints
    assert figures["train_steps_per_second"] > 0 and figures["peak_memory_gb"] is None  # no GPU here
    test = results["test"][str(speech_manifest)]
    assert test["num_utterances"] == 2 and test["mean_compression"] > 1.0
    # the validation curve: one entry per evaluation
    assert [e["step"] for e in results["evaluations"]] == [2, 4, 6]
    assert all(e["eval_wer"] >= 0 for e in results["evaluations"])
    assert sorted(p.name for p in out_dir.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert not list(out_dir.glob(".tmp-checkpoint-*"))
    assert "eval_wer" in log and "boundary_rate_train_0" in log and "compression" in log
    # each boundary loss term, unweighted; the train rows' phone times reach the phones loss
    phones = [float(v) for v in re.findall(r"'boundary_phones_0': '?([0-9.e-]+)", log)]
    assert "boundary_binomial_0" in log and phones and all(v > 0 for v in phones)
    from magnet_asr.models import MagnetWhisper

    loaded = MagnetWhisper.from_pretrained(out_dir / "final")
    assert loaded.config.predictor_layers == [1]
    card = (out_dir / "final" / "README.md").read_text()
    assert f"- {tiny_whisper_dir.name}" in card and "magnet-asr train " in card
    assert f"| {speech_manifest.name} test | " in card
    # no pickle in what users share (the Trainer writes its arguments as one; checkpoints keep it)
    assert not (out_dir / "final" / "training_args.bin").exists()
    assert (out_dir / "checkpoint-6" / "training_args.bin").exists()
    for saved in (out_dir / "final").iterdir():  # the directory can be copied or pushed as it is
        if saved.suffix in (".json", ".md", ".txt", ".jinja"):
            text = saved.read_text()
            assert str(tmp_path) not in text and str(tiny_whisper_dir.parent) not in text, saved.name
    # transformers' own ASR pipeline reads final/ in a fresh interpreter: 2 s, and 70 s in 30 s chunks
    proc = run_pipeline(out_dir / "final", {"max_new_tokens": 8})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["str", "str"]


def test_killed_run_resumes_to_the_same_weights(
    tmp_path, tiny_whisper_dir, speech_manifest, train_args, start_training
):
    reference = tmp_path / "reference"
    finish(
        start_training(train_args(tiny_whisper_dir, speech_manifest, reference, **{"training.max_steps": 8}))
    )

    crashed = tmp_path / "crashed"
    overrides = train_args(tiny_whisper_dir, speech_manifest, crashed, **{"training.max_steps": 8})
    proc = start_training(overrides)
    deadline = time.time() + 300
    while not (crashed / "checkpoint-4").is_dir():
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        assert time.time() < deadline, "no checkpoint-4 in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "final").exists()
    # a half-written checkpoint (what a crash mid-save leaves) must be ignored by auto-resume
    (crashed / ".tmp-checkpoint-7").mkdir(exist_ok=True)
    (crashed / ".tmp-checkpoint-7" / "trainer_state.json").write_text("{broken")

    log = finish(start_training([*overrides, "training.resume_from_checkpoint=auto"]))
    assert re.search(r"resum", log, re.IGNORECASE) or (crashed / "final").is_dir()
    state = json.loads((crashed / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    expected, got = final_weights(reference), final_weights(crashed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("launcher", "extra"),
    [
        ("accelerate", {}),
        # torchrun, with duration batching sharded by rank and W&B, which must log offline (no API key)
        ("torchrun", {"training.max_batch_seconds": 5.0, "training.report_to": "[tensorboard,wandb]"}),
    ],
)
def test_two_process_cpu_ddp(
    tmp_path, tiny_whisper_dir, speech_manifest, train_args, start_training, monkeypatch, launcher, extra
):
    if "wandb" in extra.get("training.report_to", ""):
        pytest.importorskip("wandb")
        for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
            monkeypatch.delenv(name, raising=False)
    out_dir = tmp_path / "ddp"
    overrides = train_args(
        tiny_whisper_dir,
        speech_manifest,
        out_dir,
        **{
            "training.max_steps": 4,
            "training.save_steps": 4,
            "training.eval_steps": 4,  # evaluation shards the utterances over ranks and gathers them
            "training.report_to": "[tensorboard]",
            "training.log_weights_checksum": "true",
            **extra,
        },
    )
    port = 29533 if launcher == "accelerate" else 29534
    log = finish(start_training(overrides, launcher=two_process_launcher(launcher, port)), timeout=900)
    # hex only: the parse still tolerates one rank's line running into the other's (before print_rank_line)
    checksums = dict(re.findall(r"rank (\d) weights checksum ([0-9a-f]{16})", log))
    assert set(checksums) == {"0", "1"} and checksums["0"] == checksums["1"], log[-4000:]
    assert "effective batch size: 8 (2 process(es))" in log
    assert [p.name for p in out_dir.glob("checkpoint-*")] == ["checkpoint-4"]
    assert len(list((out_dir / "logs").glob("events.out.tfevents.*"))) == 1
    assert (out_dir / "results.json").is_file()
    assert "'eval_num_utterances': '2'" in log  # both ranks' shards of the 2 validation utterances
    if "wandb" in extra.get("training.report_to", ""):
        assert "logging offline" in log
        assert len(list((out_dir / "wandb").glob("offline-run-*"))) == 1  # rank 0 only


def test_speech_llm_run_warms_up_the_projector_once(
    tmp_path, tiny_whisper_dir, tiny_llm_dir, speech_manifest, train_args, start_training
):
    out_dir = tmp_path / "speech_llm"
    overrides = [
        "+experiments=speech_llm_demo",
        *train_args(tiny_whisper_dir, speech_manifest, out_dir, **{"training.max_steps": 2}),
        f"llm.name={tiny_llm_dir}",
        "projector.hidden_size=32",
        "projector.ctc_warmup_steps=3",
        "training.warmup_steps=0",
    ]
    log = finish(start_training(overrides))
    assert "CTC warm-up: 3 steps" in log
    results = json.loads((out_dir / "results.json").read_text())
    warmup = results["before_training"]
    assert warmup["ctc_warmup_steps"] == 3 and warmup["ctc_loss_last"] > 0
    assert results["test"][str(speech_manifest)]["num_utterances"] == 2
    # a resumed run continues from its checkpoint, whose projector already went through the warm-up
    log = finish(start_training([*overrides, "training.max_steps=4", "training.resume_from_checkpoint=auto"]))
    assert "CTC warm-up" not in log
    assert (out_dir / "checkpoint-4").is_dir()


def test_a_limited_split_takes_the_first_utterances_of_each_corpus_in_turn(tmp_path):
    import json

    from magnet_asr.training.recipe import _utterances

    manifests = []
    for name, count in (("a", 5), ("b", 2)):
        rows = [
            {"id": f"{name}{i}", "audio": f"{name}{i}.wav", "text": "x", "split": "test"}
            for i in range(count)
        ]
        manifests.append(tmp_path / f"{name}.jsonl")
        manifests[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))

    def ids(specs, limit):
        return [u.id for u in _utterances([str(m) for m in specs], "test", limit, None)]

    assert ids(manifests[:1], 3) == ["a0", "a1", "a2"]  # what `eval --limit 3` scores
    assert ids(manifests, 5) == ["a0", "b0", "a1", "b1", "a2"]
    assert ids(manifests, None) == ["a0", "a1", "a2", "a3", "a4", "b0", "b1"]
