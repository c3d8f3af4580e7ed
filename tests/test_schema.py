"""Every YAML file in configs/ composes against the typed schemas; unknown keys fail."""

from pathlib import Path

import pytest

from magnet_asr.schema import GROUP_SCHEMAS, configs_dir, load_run_config

CONFIGS = configs_dir()
GROUP_FILES = sorted(
    (group, path.stem)
    for group in [*GROUP_SCHEMAS, "experiments"]
    for path in (CONFIGS / group).glob("*.yaml")
)


def test_every_group_has_files():
    groups = {g for g, _ in GROUP_FILES}
    assert groups == {*GROUP_SCHEMAS, "experiments"}
    assert {"mac_minimal", "production"} <= {n for g, n in GROUP_FILES if g == "experiments"}


@pytest.mark.parametrize("group,name", GROUP_FILES, ids=[f"{g}/{n}" for g, n in GROUP_FILES])
def test_compose_every_config_file(group, name):
    override = f"+experiments={name}" if group == "experiments" else f"{group}={name}"
    cfg = load_run_config([override])
    assert cfg.training.output_dir.startswith("runs/")


def test_all_yaml_files_are_covered():
    yaml_files = {p.relative_to(CONFIGS).with_suffix("").as_posix() for p in CONFIGS.rglob("*.yaml")}
    covered = {f"{g}/{n}" for g, n in GROUP_FILES} | {"config"}
    # accelerate launch configs are not Hydra configs; they are checked by their own test
    assert {f for f in yaml_files if not f.startswith("accelerate/")} == covered


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("training.no_such_key=1", "training.no_such_key"),
        ("encoder.nmae=x", "encoder.nmae"),
        ("model=whisperx", "whisperx"),
        ("training.max_steps=many", "max_steps"),
    ],
)
def test_bad_keys_and_values_fail_with_one_line(override, fragment):
    with pytest.raises(ValueError) as info:
        load_run_config([override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unknown_key_in_a_yaml_file_fails(tmp_path, monkeypatch):
    import shutil

    shutil.copytree(CONFIGS, tmp_path / "configs")
    bad = tmp_path / "configs" / "encoder" / "typo.yaml"
    bad.write_text("defaults:\n  - base_encoder\nnmae: whisper-base\n")
    monkeypatch.setenv("MAGNET_ASR_CONFIGS", str(tmp_path / "configs"))
    with pytest.raises(ValueError, match="nmae"):
        load_run_config(["encoder=typo"])


def test_experiment_overrides_groups():
    cfg = load_run_config(["+experiments=production"])
    assert cfg.encoder.name == "openai/whisper-small" and cfg.training.precision == "bf16"
    assert Path(cfg.training.output_dir) == Path("runs/production")
