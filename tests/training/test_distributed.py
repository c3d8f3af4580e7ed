"""FSDP around the recipe (training/distributed.py): auto-wrap classes per family, the full ``final/``, and what
runs on CPU processes.

What torch and accelerate do on CPUs, found by trying (torch 2.13, accelerate 1.16):
- torch's FSDP2 (``fully_shard``) shards, trains and gathers on CPU processes with gloo:
  :func:`test_fsdp2_on_cpu_trains_and_final_loads` runs it on both families, 2 processes under ``torchrun``.
- accelerate does not: ``Accelerator(cpu=True)`` (the Trainer's ``use_cpu``) sets up ``MULTI_CPU`` and drops the FSDP
  plugin, even one passed explicitly (``AcceleratorState`` turns FSDP on only over an accelerator's process group:
  MULTI_GPU, NPU, XPU...); without ``cpu`` and without a GPU it sets up no process group at all. So ``accelerate launch``
  with the FSDP config cannot run the Trainer sharded on CPUs: the recipe refuses instead of training unsharded
  (:func:`test_fsdp_launch_on_cpu_refuses`). The Trainer's FSDP path (wrapping in ``accelerator.prepare``, sharded
  checkpoints, the gathered ``final/``) and DeepSpeed need GPUs: ``scripts/gpu_check.sh`` and the README say so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType

from magnet_asr.schema import load_run_config
from magnet_asr.training.distributed import FSDP_ENV, prepare_sharding, save_final, wrap_classes
from magnet_asr.training.recipe import _setup_model

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp_worker.py")
# what configs/accelerate/fsdp.yaml named before the classes came from the model
EVERY_FAMILY = ["WhisperEncoderLayer", "WhisperDecoderLayer", "LlamaDecoderLayer", "Qwen2DecoderLayer"]


def magnet_whisper_overrides(tiny_whisper_dir, manifest, out_dir, train_args) -> list[str]:
    return train_args(tiny_whisper_dir, manifest, out_dir)


def speech_llm_overrides(tiny_whisper_dir, tiny_llm_dir, manifest, out_dir, train_args) -> list[str]:
    return [
        "+experiments=speech_llm_demo",
        *train_args(tiny_whisper_dir, manifest, out_dir),
        f"llm.name={tiny_llm_dir}",
        "llm.finetune=lora",  # FSDP over PEFT's wrapping, as the GPU check runs it
        "projector.hidden_size=32",
        "projector.ctc_warmup_steps=0",
        "training.warmup_steps=0",
    ]


@pytest.fixture
def families(tmp_path, tiny_whisper_dir, tiny_llm_dir, train_args):
    """family -> the run overrides of a tiny model of it (the data specs are not read here)."""
    manifest = tmp_path / "unread.jsonl"
    return {
        "magnet_whisper": magnet_whisper_overrides(tiny_whisper_dir, manifest, tmp_path, train_args),
        "speech_llm": speech_llm_overrides(tiny_whisper_dir, tiny_llm_dir, manifest, tmp_path, train_args),
    }


EXPECTED = {
    "magnet_whisper": ["WhisperDecoderLayer", "WhisperEncoderLayer"],
    "speech_llm": ["LlamaDecoderLayer", "WhisperEncoderLayer"],  # the LLM under PEFT's LoRA wrapping
}


def fsdp_plugin(**kw):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        **{"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", **kw}
    )


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_wrap_classes_are_the_blocks_of_the_built_model(families, family):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = _setup_model(load_run_config(families[family])).model
    names = wrap_classes(model)
    assert names == EXPECTED[family]
    # accelerate's own FSDP2 policy takes them and picks every layer: 2 encoder + 2 decoder layers
    policy = fsdp2_prepare_auto_wrap_policy(fsdp_plugin(transformer_cls_names_to_wrap=names), model)
    units = [m for m in model.modules() if policy(m)]
    assert len(units) == 4 and {type(m).__name__ for m in units} == set(names)
    # one list for every family is what accelerate refused
    with pytest.raises(ValueError, match="Could not find the transformer layer class"):
        fsdp2_prepare_auto_wrap_policy(fsdp_plugin(transformer_cls_names_to_wrap=EVERY_FAMILY), model)


def test_wrap_classes_of_a_model_without_blocks():
    with pytest.raises(ValueError, match="Linear: no transformer layer class to wrap"):
        wrap_classes(torch.nn.Linear(2, 2))


def _trainer(plugin, *, fsdp: bool = True, saved: list | None = None) -> SimpleNamespace:
    """The parts of a Trainer that prepare_sharding and save_final read."""
    return SimpleNamespace(
        is_fsdp_enabled=fsdp,
        is_deepspeed_enabled=False,
        accelerator=SimpleNamespace(
            state=SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=None),
            distributed_type=DistributedType.FSDP if fsdp else DistributedType.MULTI_CPU,
            num_processes=2,
        ),
        is_world_process_zero=lambda: True,
        args=SimpleNamespace(should_save=True),
        save_model=lambda directory: saved.append(directory) if saved is not None else None,
    )


def test_prepare_sharding_replaces_the_configured_classes(families, monkeypatch):
    model = _setup_model(load_run_config(families["speech_llm"])).model
    plugin = fsdp_plugin(transformer_cls_names_to_wrap=EVERY_FAMILY)  # as a launch config could name them
    assert model.encoder_cache is not None
    prepare_sharding(_trainer(plugin), model)
    assert plugin.transformer_cls_names_to_wrap == EXPECTED["speech_llm"]
    assert model.encoder_cache is None  # a hit on one rank and a miss on another would desynchronize them
    # FSDP1 flattens frozen and trained parameters of a unit into one tensor
    with pytest.raises(ValueError, match="FSDP1 cannot shard a model with frozen parameters"):
        prepare_sharding(_trainer(fsdp_plugin(fsdp_version=1, use_orig_params=False)), model)
    monkeypatch.setenv(FSDP_ENV, "true")  # launched with FSDP, but accelerate set up none
    with pytest.raises(ValueError, match="accelerate runs FSDP on GPUs .* set up DistributedType.MULTI_CPU"):
        prepare_sharding(_trainer(None, fsdp=False), model)
    monkeypatch.setenv(FSDP_ENV, "false")
    prepare_sharding(_trainer(None, fsdp=False), model)  # DDP or one process: nothing to do


def test_save_final_gathers_a_full_state_dict(tmp_path):
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType

    plugin, saved = fsdp_plugin(state_dict_type="SHARDED_STATE_DICT"), []
    save_final(_trainer(plugin, saved=saved), tmp_path / "final")
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    config = plugin.state_dict_config
    assert isinstance(config, FullStateDictConfig) and config.rank0_only and config.offload_to_cpu
    assert saved == [str(tmp_path / "final")]


def _executable(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} not installed")
    return found


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
@pytest.mark.real_weights
@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_fsdp2_on_cpu_trains_and_final_loads(
    tmp_path, tiny_whisper_dir, tiny_llm_dir, speech_manifest, train_args, family
):
    """torch FSDP2 on 2 CPU processes (gloo): the units come from wrap_classes, the gathered full state dict
    saves with the model's own save_pretrained, loads with from_pretrained and transcribes, and training matches
    an unsharded run on the whole batches (fsdp_worker.py)."""
    if family == "magnet_whisper":
        overrides = magnet_whisper_overrides(tiny_whisper_dir, speech_manifest, tmp_path, train_args)
    else:
        overrides = speech_llm_overrides(
            tiny_whisper_dir, tiny_llm_dir, speech_manifest, tmp_path, train_args
        )
    port = {"magnet_whisper": 29571, "speech_llm": 29572}[family]
    command = [_executable("torchrun"), "--nproc_per_node", "2", "--master_port", str(port)]
    proc = subprocess.run(
        [*command, str(WORKER), str(tmp_path), *overrides],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["wrap_classes"] == report["unit_classes"] == EXPECTED[family] and report["units"] == 4
    full, local = report["example"]["full"], report["example"]["local"]
    assert local[0] == (full[0] + 1) // 2 and local[1:] == full[1:], report["example"]  # dim 0 split in two
    assert report["finite_losses"] and report["trained"] > 0
    assert report["moved"] > 1e-4  # training changed the weights...
    assert report["vs_reference"] < 1e-5  # ...as one process on the whole batches does
    assert report["loaded_vs_gathered"] == 0.0 and report["logits_loaded_vs_sharded"] < 1e-5
    assert "model.safetensors" in report["saved_files"] and "config.json" in report["saved_files"]
    if family == "speech_llm":  # only the trained tensors, and LoRA as PEFT's files
        assert "adapter" in report["saved_files"] and "sources" in report["saved_files"]
    assert report["transcribed"] == 1 and isinstance(report["hypothesis"], str)


@pytest.mark.slow
@pytest.mark.real_weights
def test_fsdp_launch_on_cpu_refuses(tmp_path, tiny_whisper_dir, speech_manifest, train_args):
    """The shipped FSDP config on 2 CPU processes: accelerate would train plain DDP; the run stops at once."""
    config = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no", main_process_ip="127.0.0.1")
    cpu_config = tmp_path / "fsdp_cpu.yaml"
    cpu_config.write_text(yaml.safe_dump(config))
    out_dir = tmp_path / "run"
    launcher = [_executable("accelerate"), "launch", "--config_file", str(cpu_config)]
    proc = subprocess.run(
        [*launcher, "--main_process_port", "29573", "-m", "magnet_asr", "train"]
        + train_args(tiny_whisper_dir, speech_manifest, out_dir),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "accelerate runs FSDP on GPUs (accelerators) only and set up DistributedType.MULTI_CPU" in out
    assert not list(out_dir.glob("checkpoint-*"))


GPU_CHECK = REPO / "scripts" / "gpu_check.sh"


def test_gpu_check_script_is_valid_and_its_run_composes():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0
    printed = subprocess.run(
        ["bash", str(GPU_CHECK), "--print-overrides"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    cfg = load_run_config(printed)
    assert cfg.model == "speech_llm" and cfg.training.precision == "bf16"
    assert cfg.encoder.name == "whisper-base" and cfg.llm.name == "smollm2-135m-instruct"  # largest bundled
    assert cfg.llm.finetune == "lora" and cfg.training.max_batch_seconds == 120  # duration batching
    assert cfg.training.max_steps == 40 and cfg.training.eval_steps == 0
    assert list(cfg.data.train) == ["synth", "asterisk"] and list(cfg.data.test) == ["asterisk"]
    for name in ("a40", "fsdp"):  # the launch configs it names
        assert (REPO / "configs" / "accelerate" / f"{name}.yaml").is_file()
