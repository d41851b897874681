#!/usr/bin/env bash
# System packages the tests need, from Debian: chromium (the browser e2e tests
# drive it; never a browser downloaded by playwright) with its fonts, and
# promtool (package prometheus) to check the alert rules, redis-server (the
# response-cache tests start their own on a free port), PostgreSQL (the run store's
# tests start a real server; it runs as user postgres), curl, and the build of the
# native inference frontend (scripts/build-native.sh: g++, Debian's grpc++ and protobuf,
# pybind11, the Python headers). Idempotent: installs
# only what is missing. Needs root (apt-get) the first time.
set -euo pipefail

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-dejavu-core)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v curl >/dev/null 2>&1 || missing+=(curl)  # the README's curl example runs in a test
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -f /usr/include/grpcpp/grpcpp.h ] || missing+=(libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev)
[ -f /usr/include/pybind11/pybind11.h ] || missing+=(pybind11-dev)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  2>/dev/null || missing+=(python3-dev)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-deps: missing ${missing[*]} and this is not root;" \
       "run 'sudo apt-get install ${missing[*]}' (the tests that need them will skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
[ -x /usr/bin/chromium ] && /usr/bin/chromium --version
command -v promtool >/dev/null && promtool --version | head -1
command -v redis-server >/dev/null && redis-server --version
ls /usr/lib/postgresql/*/bin/postgres 2>/dev/null | head -1
