#!/usr/bin/env bash
# Install the peer engines, each in its own virtual environment under $JAXRS_PEERS
# (default ~/.cache/jaxrs/peers), so they never touch jaxrs's own. llama-cpp-python compiles
# llama.cpp from source (about 7 minutes on 2 cores) into $JAXRS_PEERS/wheels, so a second run
# takes seconds. transformers is measured from jaxrs's own environment (the `test` extra installs
# it with CPU torch).
#
# llama.cpp is built for this CPU's SIMD features but without AMX: a virtual machine may expose AMX
# in cpuid yet fault on its tile instructions (a general protection fault at `ldtilecfg`). Set
# LLAMACPP_CMAKE_ARGS to build it otherwise (e.g. "-DGGML_NATIVE=ON" on a host where AMX works).
#
#   bash bench/setup_peers.sh          # both peers
#   bash bench/setup_peers.sh llamacpp # one
set -euo pipefail
ROOT="${JAXRS_PEERS:-$HOME/.cache/jaxrs/peers}"
mkdir -p "$ROOT"

install_peer() {  # name, module to import, pip requirement
  local name=$1 module=$2 requirement=$3 venv="$ROOT/$1"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import $module" 2>/dev/null; then
    echo "$name: ready ($venv)"
    return
  fi
  echo "$name: installing $requirement into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check -q "$requirement"
  "$venv/bin/python" -c "import $module" && echo "$name: ready ($venv)"
}

llamacpp_cmake_args() {  # GGML flags for this CPU's features, AMX left out
  local flags args="-DGGML_NATIVE=OFF"
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
      avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    [[ $flags == *" ${pair%%:*} "* ]] && args+=" -DGGML_${pair#*:}=ON"
  done
  echo "$args"
}

build_llamacpp_wheel() {  # requirement: build once into $ROOT/wheels, install from there
  local version=${1#*==} wheels="$ROOT/wheels"
  if ! compgen -G "$wheels/llama_cpp_python-$version-*.whl" >/dev/null; then
    local cmake_args=${LLAMACPP_CMAKE_ARGS:-$(llamacpp_cmake_args)}
    echo "llamacpp: building llama-cpp-python $version with CMAKE_ARGS=$cmake_args (several minutes)" >&2
    python3 -m venv "$ROOT/build-venv"
    CMAKE_ARGS="$cmake_args" "$ROOT/build-venv/bin/pip" wheel --disable-pip-version-check -q \
      --no-cache-dir --no-deps -w "$wheels" "$1"
  fi
  compgen -G "$wheels/llama_cpp_python-$version-*.whl" | head -n 1
}

want=("${@:-llamacpp mistralrs}")
for peer in ${want[@]}; do
  case $peer in
    llamacpp) install_peer llamacpp llama_cpp "$(build_llamacpp_wheel llama-cpp-python==0.3.36)" ;;
    mistralrs) install_peer mistralrs mistralrs "mistralrs==0.9.5" ;;
    *) echo "unknown peer $peer (choose llamacpp, mistralrs)" >&2; exit 2 ;;
  esac
done
