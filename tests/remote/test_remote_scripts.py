"""The remote commands without a server: generated scripts, ssh/rsync argument lists, parsing, secrets."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from datetime import datetime, timezone

import pytest

from magnet_asr.remote.cli import add_remote_parser, run_remote, script_main
from magnet_asr.remote.scripts import (
    RemoteLayout,
    deps_script,
    list_script,
    logs_script,
    mkdir_script,
    run_file_text,
    session_name,
    setup_script,
    start_script,
    training_command,
)
from magnet_asr.remote.session import choose_session, collect_secrets, default_session
from magnet_asr.remote.ssh import (
    RemoteError,
    RemoteInfo,
    SshTarget,
    child_env,
    parse_probe,
    rsync_argv,
    wrap_script,
)

LAYOUT = RemoteLayout("/workspace/magnet-asr", "/root/.magnet-asr", "/workspace/.cache", tmux_socket="t s")
TARGET = SshTarget("pod.example", 2222, identity="/keys/id", known_hosts="/tmp/k h", accept_new_host_key=True)


def all_scripts() -> dict[str, str]:
    run = run_file_text(LAYOUT, "train_x", "python3 -m magnet_asr train '+experiments=a b'")
    return {
        "setup": setup_script(),
        "mkdir": mkdir_script("/a b/c"),
        "deps": deps_script(LAYOUT, "python3", ("wandb",)),
        "run": run,
        "start": start_script(LAYOUT, "train_x", run, {"HF_TOKEN": "it's $secret"}, force=False),
        "start_force": start_script(LAYOUT, "train_x", run, {}, force=True),
        "list": list_script(LAYOUT),
        "names": list_script(LAYOUT, names_only=True),
        "logs": logs_script(LAYOUT, None, 50, follow=False),
        "logs_follow": logs_script(LAYOUT, "train_x", 50, follow=True),
    }


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", sorted(all_scripts()))
def test_generated_scripts_are_valid_bash(name: str) -> None:
    script = wrap_script(all_scripts()[name])
    result = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_wrapped_script_is_not_eaten_by_a_command_reading_stdin() -> None:
    result = subprocess.run(
        ["bash", "-s"], input=wrap_script("cat\necho after"), text=True, capture_output=True
    )
    assert result.stdout == "after\n"


def test_secret_only_travels_inside_the_start_script() -> None:
    run = run_file_text(LAYOUT, "s", "true")
    script = start_script(LAYOUT, "s", run, {"HF_TOKEN": "tok-123"}, force=False)
    assert "tok-123" not in run
    # Written by the printf builtin into the secrets file, under umask 077; never exported here.
    line = next(line for line in script.splitlines() if "tok-123" in line)
    assert line.startswith("printf '%s\\n' ") and line.endswith("> /root/.magnet-asr/secrets.env")
    assert script.index("umask 077") < script.index(line)


def test_run_file_sets_the_cache_variables_and_unsets_secrets_before_idling() -> None:
    run = run_file_text(LAYOUT, "s", "true", ["HF_TOKEN", "WANDB_API_KEY", "EXTRA"])
    for expected in (
        "export HF_HOME=/workspace/.cache/huggingface",
        "export HF_DATASETS_CACHE=/workspace/.cache/huggingface/datasets",
        "export HF_HUB_ENABLE_HF_TRANSFER=1",
        "export TOKENIZERS_PARALLELISM=false",
        "tee -a /workspace/magnet-asr/logs/s.log",
    ):
        assert expected in run
    assert run.index("unset HF_TOKEN WANDB_API_KEY EXTRA") < run.index("exec bash")


def test_deps_keep_the_installed_torch() -> None:
    script = deps_script(LAYOUT, "python3", ("wandb",))
    assert 'echo "torch==$torch_version" > /root/.magnet-asr/constraints.txt' in script
    assert "-m pip install -c /root/.magnet-asr/constraints.txt -e '.[wandb]' hf_transfer" in script


def test_training_command() -> None:
    assert training_command("python3", "production") == "python3 -m magnet_asr train +experiments=production"
    cmd = training_command("python3", "mac_minimal", ["training.max_steps=5"], accelerate_config="a40")
    assert cmd == (
        "python3 -m accelerate.commands.launch --config_file configs/accelerate/a40.yaml "
        "-m magnet_asr train +experiments=mac_minimal training.max_steps=5"
    )


def test_session_names() -> None:
    assert session_name("train_a.b:c d") == "train_a_b_c_d"
    assert (
        default_session("prod", datetime(2025, 1, 2, 3, 4, tzinfo=timezone.utc)) == "train_prod_20250102_0304"
    )
    with pytest.raises(ValueError):
        session_name("...")


def test_collect_secrets_only_when_set() -> None:
    env = {"HF_TOKEN": "x", "WANDB_API_KEY": "", "OTHER": "y"}
    assert collect_secrets(environ=env) == {"HF_TOKEN": "x"}
    assert collect_secrets(["HF_TOKEN", "OTHER", "HF_TOKEN"], environ=env) == {"HF_TOKEN": "x", "OTHER": "y"}
    with pytest.raises(ValueError):
        collect_secrets(["NOT OK"], environ=env)


def test_ssh_and_rsync_arguments() -> None:
    argv = TARGET.ssh_argv("bash -s")
    assert argv[:3] == ["ssh", "-p", "2222"] and argv[-2:] == ["root@pod.example", "bash -s"]
    assert "StrictHostKeyChecking=accept-new" in argv and 'UserKnownHostsFile="/tmp/k h"' in argv
    assert argv[argv.index("-i") + 1] == "/keys/id"
    rsync = rsync_argv(TARGET, "/workspace/magnet-asr")
    assert rsync[-2:] == ["./", "root@pod.example:/workspace/magnet-asr/"]
    assert "--files-from=-" in rsync and "-0" in rsync
    assert rsync[rsync.index("-e") + 1].startswith("ssh -p 2222 ")
    assert SshTarget("::1").rsync_destination("/x") == "root@[::1]:/x/"


def test_child_env_drops_secrets() -> None:
    env = child_env({"HF_TOKEN": "a", "WANDB_API_KEY": "b", "SSH_AUTH_SOCK": "/s", "PATH": "/bin"})
    assert env == {"SSH_AUTH_SOCK": "/s", "PATH": "/bin"}


def test_probe_parsing_and_path_resolution() -> None:
    out = "motd noise\nmagnet-asr-probe home=/root\nmagnet-asr-probe have=bash\nmagnet-asr-probe have=tmux\n"
    info = parse_probe(out)
    assert info == RemoteInfo("/root", frozenset({"bash", "tmux"}))
    assert info.resolve("~/.magnet-asr") == "/root/.magnet-asr"
    assert info.resolve("work") == "/root/work" and info.resolve("/abs") == "/abs"
    with pytest.raises(RemoteError, match="rsync"):
        info.require("rsync", "run deploy")
    with pytest.raises(RemoteError, match="bash"):
        parse_probe("magnet-asr-probe home=/root\n")
    layout = RemoteLayout.resolved(info, "~/ws/", "~/.state", "cache")
    assert (layout.remote_dir, layout.state_dir, layout.cache_dir) == (
        "/root/ws",
        "/root/.state",
        "/root/cache",
    )


def test_choose_session() -> None:
    assert choose_session(["only"], "h") == "only"
    with pytest.raises(RemoteError, match="no tmux sessions"):
        choose_session([], "h")
    with pytest.raises(RemoteError, match="--session-name"):
        choose_session(["a", "b"], "h")
    assert choose_session(["a", "b"], "h", ask=lambda prompt: "2") == "b"


def test_parser_wires_into_a_parent_cli() -> None:
    parser = argparse.ArgumentParser(prog="magnet-asr")
    add_remote_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["remote", "deploy", "me@pod", "2222", "--skip-deps", "-i", "k"])
    assert args.func is run_remote and args.remote_command == "deploy"
    assert (args.host, args.port, args.skip_deps, args.identity) == ("me@pod", 2222, True, "k")
    args = parser.parse_args(["remote", "attach", "pod", "22", "-l", "-n", "5"])
    assert args.list and args.lines == 5


def test_script_main_reports_one_line_errors(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("PATH", "")
    assert script_main("start", ["pod", "22", "--no-attach", "--session-name", "!!!"]) == 2
    assert (
        capsys.readouterr().err.strip() == "magnet-asr remote start: error: unusable tmux session name: '!!!'"
    )
