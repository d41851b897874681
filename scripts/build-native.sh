#!/usr/bin/env bash
# Builds the native inference frontend (native/frontend.cc) into
# services/inference/_native<EXT_SUFFIX> with Debian's grpc++, protobuf and
# pybind11 (scripts/install-system-deps.sh installs them). Without them it says
# so in one line and exits 0: the service then runs its Python frontend.
# Usage: build-native.sh PYTHON [--asan]   (--asan: an AddressSanitizer test build
# in build/native-asan/, for the fuzz test; never the one the service loads)
set -euo pipefail
PY=${1:-python3}
ASAN=${2:-}
cd "$(dirname "$0")/.."

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
pkg-config --exists grpc++ protobuf 2>/dev/null || missing+=(libgrpc++-dev libprotobuf-dev)
[ -f /usr/include/pybind11/pybind11.h ] || missing+=(pybind11-dev)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
[ -f "$include/Python.h" ] || missing+=(python3-dev)
if [ ${#missing[@]} -ne 0 ]; then
  echo "build-native: skipped, missing ${missing[*]} (the inference service uses its Python frontend)"
  exit 0
fi

if [ "$ASAN" = "--asan" ]; then
  out=build/native-asan; target=$out/_native$suffix
  flags=(-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer)
else
  out=build/native; target=services/inference/_native$suffix
  flags=(-O2)
fi
gen=build/native/gen
protos=(tensorwire/inference/grpc_service.proto tensorwire/inference/model_config.proto)
mkdir -p "$out" "$gen"

# Rebuild only what changed (the generated model_config.pb.cc takes the longest).
if [ ! -f "$gen/.stamp" ] || [ -n "$(find protos/tensorwire/inference -newer "$gen/.stamp" -name '*.proto')" ]; then
  protoc -Iprotos --cpp_out="$gen" "${protos[@]}"
  touch "$gen/.stamp"
fi
cxx=(g++ -std=c++17 -fPIC -fvisibility=hidden "${flags[@]}" -I"$gen" -I"$include" $(pkg-config --cflags grpc++ protobuf))
objs=()
for proto in "${protos[@]}"; do
  src=$gen/${proto%.proto}.pb.cc
  obj=$out/$(basename "${proto%.proto}").pb.o
  objs+=("$obj")
  if [ ! -f "$obj" ] || [ "$src" -nt "$obj" ]; then
    "${cxx[@]}" -c "$src" -o "$obj" &
  fi
done
wait
obj=$out/frontend.o
if [ ! -f "$obj" ] || [ -n "$(find native -newer "$obj" -name "*.cc" -o -newer "$obj" -name "*.h")" ] || [ "$gen/.stamp" -nt "$obj" ]; then
  "${cxx[@]}" -c native/frontend.cc -o "$obj"
fi
objs+=("$obj")
if [ ! -f "$target" ] || [ -n "$(find "${objs[@]}" -newer "$target")" ]; then
  "${cxx[@]}" -shared "${objs[@]}" -o "$target" $(pkg-config --libs grpc++ protobuf) -labsl_synchronization
  echo "build-native: built $target (grpc++ $(pkg-config --modversion grpc++))"
fi
