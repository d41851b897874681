#!/usr/bin/env bash
# System packages the browser end-to-end tests need: Debian's chromium (never a
# browser downloaded by playwright) and its fonts. Idempotent: does nothing when
# /usr/bin/chromium is already there. Needs root (apt-get) the first time.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-deps: /usr/bin/chromium is missing and this is not root;" \
       "run 'sudo apt-get install chromium fonts-dejavu-core' (browser tests will skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version
