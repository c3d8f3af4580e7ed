"""Streamed training under two processes: a run killed after a checkpoint resumes and continues the stream
where it stopped, ending at the same step with the weights of a run that was never interrupted."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from librispeech_fixtures import utterances, write_librispeech_folder
from processes import kill_tree, two_process_launcher

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]

STEPS = 12  # killed at checkpoint-4 (of every 2 steps): the rest is well beyond the kill's latency


def _run(start_training, overrides: list[str], port: int) -> str:
    proc = start_training(overrides, launcher=two_process_launcher("accelerate", port))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_streamed_two_process_run_resumes_the_stream(tmp_path, tiny_whisper_dir, train_args, start_training):
    root = write_librispeech_folder(tmp_path / "LibriSpeech", utterances())

    def overrides(out: Path, steps: int, *extra: str) -> list[str]:
        # a constant learning rate: a killed and resumed run follows the path of an uninterrupted one
        settings = {
            "data.train": "[librispeech:train.clean.100]",
            "data.validation": "[librispeech:dev-clean]",
            "data.test": "[librispeech:test-clean]",
            "data.librispeech_root": str(root),
            "data.streaming": "true",
            "data.stream_buffer_size": 3,
            "training.max_batch_seconds": 6.0,
            "training.per_device_batch_size": 2,
            "training.lr_scheduler_type": "constant",
            "training.max_steps": steps,
            "training.save_steps": 2,
            "training.log_weights_checksum": "true",
        }
        return [*train_args(tiny_whisper_dir, root, out, **settings), *extra]

    reference = tmp_path / "reference"
    _run(start_training, overrides(reference, STEPS), 29541)
    killed = tmp_path / "killed"
    proc = start_training(overrides(killed, STEPS), launcher=two_process_launcher("accelerate", 29542))
    deadline = time.time() + 300
    while not (killed / "checkpoint-4").is_dir():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint-4 in time"
        time.sleep(0.1)
    kill_tree(proc)
    assert not (killed / "final").exists(), "the run ended before it was killed"
    last = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    states = [
        json.loads((killed / f"checkpoint-{last}" / f"stream_state_rank{r}.json").read_text()) for r in (0, 1)
    ]
    assert all(s["world"] == 2 for s in states)
    log = _run(start_training, overrides(killed, STEPS, "training.resume_from_checkpoint=auto"), 29543)

    # each rank continues its own stream: from a position past the start, never from the beginning
    # ranks now write each line in one call (print_rank_line); the parse still tolerates one rank's line
    # running into the other's, as when print wrote the newline apart
    resumed = dict(re.findall(r"rank (\d): the training stream resumes at (.*?)(?=rank \d: |$)", log, re.M))
    assert set(resumed) == {"0", "1"} and not any("the start" in where for where in resumed.values()), log[
        -3000:
    ]
    state = json.loads((killed / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    # hex only: the parse still tolerates one rank's line running into the other's (before print_rank_line)
    checksums = dict(re.findall(r"rank (\d) weights checksum ([0-9a-f]{16})", log))
    assert set(checksums) == {"0", "1"} and checksums["0"] == checksums["1"], log[-3000:]
    # the same batches in the same order as the uninterrupted run: the same weights
    expected = load_file(reference / "final" / "model.safetensors")
    got = load_file(killed / "final" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
