#!/usr/bin/env bash
# Debian packages magnet-asr uses: speech synthesis (espeak-ng, flite), the real speech corpus
# (asterisk prompts + transcripts), sentence text (fortunes), libsndfile, and sshd/tmux/rsync for the
# remote-deployment tests. Installed only where we are root on Debian/Ubuntu; otherwise we say what is
# missing and go on with what is there.
set -u
PACKAGES="espeak-ng flite fortunes fortunes-min asterisk-core-sounds-en-wav asterisk-core-sounds-en libsndfile1 openssh-server openssh-client tmux rsync"

missing=""
if command -v dpkg-query >/dev/null 2>&1; then
  for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
else
  echo "install_system_deps: not a Debian/Ubuntu system; make sure these are installed:$PACKAGES" >&2
  exit 0
fi
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || echo "install_system_deps: apt-get update failed; trying anyway" >&2
  # shellcheck disable=SC2086
  if ! apt-get install -y -qq --no-install-recommends $missing >/dev/null; then
    echo "install_system_deps: could not install some of:$missing (continuing with what is there)" >&2
  fi
else
  echo "install_system_deps: not root; please install:$missing (continuing with what is there)" >&2
fi
exit 0
