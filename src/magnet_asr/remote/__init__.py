"""Cloud GPU deployment over SSH + tmux (the RunPod workflow): ``magnet-asr remote ...``.

Three commands, each also a script in ``scripts/`` with the same arguments:

- ``deploy HOST PORT``: install tmux and rsync with apt if missing; rsync the git-tracked files
  (``git ls-files``: nothing untracked, so no caches, runs or stray ``.env`` files) to
  ``--remote-dir`` (default ``/workspace/magnet-asr``); ``pip install -e .`` with the remote's
  system Python under a constraint pinning its preinstalled CUDA torch (never replaced).
- ``start HOST PORT --experiment NAME``: ``python3 -m magnet_asr train +experiments=NAME`` (or
  ``--command``) in a detached tmux session, teed to ``REMOTE_DIR/logs/SESSION.log``, with
  ``HF_HOME``, ``HF_DATASETS_CACHE``, ``HF_HUB_ENABLE_HF_TRANSFER`` set.
- ``attach HOST PORT``: attach (``ssh -t``), ``--list`` the sessions, or print ``--logs``.

Only the system ``ssh`` and ``rsync`` are used. Host keys are checked as ssh does by default;
``--accept-new-host-key`` trusts a first-seen key (``StrictHostKeyChecking=accept-new``),
``--known-hosts FILE`` points at another known_hosts file.

Secrets (``HF_TOKEN``, ``WANDB_API_KEY``) are forwarded only when set locally, and never on a
command line, in the synced files or in a log. We do not use ``ssh -o SendEnv``: it only works if the
pod's sshd lists the names in ``AcceptEnv`` (RunPod's accepts ``LANG LC_*``), and the values would
then live only in that one ssh session, not in a tmux session that outlives it. Instead ``start``
sends its set-up script on ssh's **stdin**; the script writes the values with bash's builtin ``printf``
(no child process, so no argv) into ``STATE_DIR/secrets.env`` (mode 0600, default ``~/.magnet-asr``:
outside the synced checkout and off the shared ``/workspace`` volume). The tmux run script sources that
file, so only the training process's environment holds them. Each ``start`` rewrites the file with
exactly the secrets set at that time (none: the file is removed).
"""

from magnet_asr.remote.ssh import SECRET_NAMES, RemoteError, SshTarget

__all__ = ["SECRET_NAMES", "RemoteError", "SshTarget"]
