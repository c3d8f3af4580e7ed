"""Every accelerate launch config parses with accelerate's own loader and names a real option set."""

from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "accelerate").glob("*.yaml"))
EXPECTED = {
    "cpu_ddp": ("MULTI_GPU", 2, "no"),  # torchrun; each process falls back to the CPU with gloo
    "a40": ("NO", 1, "bf16"),
    "multi_gpu": ("MULTI_GPU", 4, "bf16"),
    "fsdp": ("FSDP", 4, "bf16"),
    "deepspeed_zero2": ("DEEPSPEED", 4, "bf16"),
}


def test_all_expected_configs_exist():
    assert {p.stem for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # rejects unknown keys
    distributed, processes, precision = EXPECTED[path.stem]
    assert config.distributed_type.value == distributed
    assert config.num_processes == processes
    assert config.mixed_precision == precision
    if path.stem == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
    if path.stem == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2
