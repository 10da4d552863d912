#!/usr/bin/env bash
# A CUDA machine's whole check in one command, each stage time-boxed and logged as it runs:
#   1. the kernel tests and the model-family tests with the Pallas kernels compiled by Triton (the kernels
#      interpret only on CPU; the engine picks them by default on a GPU), against the XLA references and
#      transformers;
#   2. bench/gpu.py (its JSON is rewritten after every row, so a cut-off run keeps what it measured).
#
#   bash bench/gpu_check.sh OUT_DIR [bench/gpu.py arguments...]
#
# Run from the repository root with a Python that has JAX for CUDA, flax, transformers and torch. For an
# offline machine without gguf, set JAXRS_WHEELS to a folder holding its wheel (installed to a temp dir).
# Time limits (seconds): JAXRS_TEST_S (default 240), JAXRS_BENCH_S (default 300).
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [bench/gpu.py arguments...]}
shift
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n ${JAXRS_WHEELS:-} ]]; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$JAXRS_WHEELS"/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:$site"
fi

{
    date -u
    git log -1 --format='commit %h %s' 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    "$python" -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'
} 2>&1 | tee "$out/env.log"

tests=(tests/test_paged_attention.py tests/test_qmatmul.py tests/test_llama.py tests/test_model_families.py
    tests/test_model_families_2.py tests/test_decoder.py tests/test_model_families_batching.py)
timeout "${JAXRS_TEST_S:-240}" "$python" -m pytest -q -p no:cacheprovider -rfE "${tests[@]}" 2>&1 |
    tee "$out/tests.log"
echo "tests exit: $?" | tee -a "$out/tests.log"

timeout "${JAXRS_BENCH_S:-300}" "$python" bench/gpu.py --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
echo "gpu.py exit: $?" | tee -a "$out/gpu.log"
