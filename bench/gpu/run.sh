#!/usr/bin/env bash
# bench/gpu/run.sh: build everything against one CUDA build of the vendored llama.cpp on a
# GPU host with no network, write a larger synthetic-weights model, and run the batching
# and single-stream benchmarks against llama-server, llama-bench and llama-cpp-python, then
# issue 20's tables (forced-acceptance speculation, grammar cost, KV cache types).
#
# Why one script: a lent GPU machine is short-lived and bare, so the whole job (build,
# model, benchmarks) runs as one timed command whose results land in $OUT as it goes.
# Why one build: compiling ggml-cuda takes minutes even on 16 cores, so inferd's module,
# llama.cpp's tools and llama-cpp-python's ctypes library (LLAMA_CPP_LIB_PATH) all use
# the same shared libllama/ggml (INFERD_LLAMA_SHARED, vendor/llama.cmake).
#
# Inputs, in $CARRY (default .devcarry), prepared on a machine with an index:
#   llama-src.tar.gz     the pinned, verified vendor/llama.cpp tree (without models/docs)
#   llama_cpp_py.tar.gz  llama-cpp-python's Python package from the same pinned sdist
#   skel.gguf            SmolLM2's tokenizer and chat template (bench/synth_model.py)
#   *.whl                Python wheels the host lacks (orjson, diskcache)
# Environment: OUT (results folder), SCRATCH (work folder), GPU=0 for a CPU dry run,
# SHAPE (smollm2-1.7b), DEADLINE_S (seconds from the start after which the remaining
# benchmarks are skipped: 540), SERVING=0 (issue 20's tables only), ROUNDS, CONC, THREADS,
# JOBS, PY, BUILD.
set -uo pipefail
T0=$(date +%s)
CARRY=${CARRY:-.devcarry}
SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}/inferd-gpu}  # wheels, llama_cpp package, the model
OUT=${OUT:-$SCRATCH/out}
GPU=${GPU:-1}
SHAPE=${SHAPE:-smollm2-1.7b}
DEADLINE_S=${DEADLINE_S:-540}
JOBS=${JOBS:-$(nproc)}
PY=${PY:-python3}
BUILD=${BUILD:-build/gpu}
mkdir -p "$OUT" "$SCRATCH"
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }

log "host: $(nproc) CPUs, $($PY -V 2>&1)"
[ "$GPU" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
$PY -m pip install -q --no-index --no-deps --upgrade --target "$SCRATCH/site" "$CARRY"/*.whl \
  || exit 1
export PYTHONPATH=$SCRATCH/site:$SCRATCH/lcp:$PWD/src:$PWD
mkdir -p "$SCRATCH/lcp" vendor/llama.cpp
tar xzf "$CARRY/llama_cpp_py.tar.gz" -C "$SCRATCH/lcp"
[ -f vendor/llama.cpp/CMakeLists.txt ] || tar xzf "$CARRY/llama-src.tar.gz" -C vendor/llama.cpp
$PY -c "import sysconfig, os; p = sysconfig.get_paths()['include']; \
print('Python.h:', os.path.exists(os.path.join(p, 'Python.h')), p)"

cuda_args=()
if [ "$GPU" = 1 ]; then
  # NO_VMM: no libcuda link at build time; NCCL: one GPU. Same build for every peer.
  cuda_args=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NO_VMM=ON
             -DGGML_CUDA_NCCL=OFF)
  log "nvcc: $(nvcc --version | tail -1)"
fi
configure() {
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v $PY)" \
    -DINFERD_LLAMA_CPP_DIR="$PWD/vendor/llama.cpp" -DINFERD_LLAMA_SHARED=ON \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    "${cuda_args[@]}" "$@" > "$OUT/configure.log" 2>&1
}
log "configure"
if ! configure; then
  tail -15 "$OUT/configure.log"
  [ "$GPU" = 1 ] || exit 1
  # A toolkit without cuBLAS: take it from the nvidia-cublas wheel (vendor/README.md).
  C=$($PY -c "import nvidia, os; print(next(os.path.join(p, 'cu13') for p in nvidia.__path__ \
if os.path.exists(os.path.join(p, 'cu13', 'lib', 'libcublas.so.13'))))") || exit 1
  log "retrying with cuBLAS from $C"
  rm -rf "$BUILD"
  configure -DCUDA_cublas_LIBRARY="$C/lib/libcublas.so.13" \
    -DCUDA_cublasLt_LIBRARY="$C/lib/libcublasLt.so.13" \
    "-DCMAKE_CUDA_FLAGS=-I$C/include" "-DCMAKE_CXX_FLAGS=-I$C/include" \
    || { tail -40 "$OUT/configure.log"; exit 1; }
fi
log "build ($JOBS jobs)"
cmake --build "$BUILD" -j "$JOBS" --target _llama _sse_c _chunks_c llama-server llama-bench \
  > "$OUT/build.log" 2>&1 || { grep -m5 -B2 -A8 "error" "$OUT/build.log"; tail -20 "$OUT/build.log"; exit 1; }
log "built"
cp "$BUILD"/_llama.*.so "$BUILD"/_sse_c.*.so "$BUILD"/_chunks_c.*.so src/inferd/_fast/
export INFERD_PEERS_DIR=$PWD/$BUILD LLAMA_CPP_LIB_PATH=$PWD/$BUILD/bin
$PY -c "import inferd; print(inferd.about())" | tee "$OUT/about.txt"

MODEL=$SCRATCH/$SHAPE.gguf
log "model: $SHAPE"
$PY bench/synth_model.py --from "$CARRY/skel.gguf" --shape "$SHAPE" "$MODEL" || exit 1
NGL=$([ "$GPU" = 1 ] && echo -1 || echo 0)
THREADS=${THREADS:-4}
TITLE="$SHAPE (synthetic F16), $( [ "$GPU" = 1 ] && nvidia-smi --query-gpu=name --format=csv,noheader || echo CPU)"

SERVING=${SERVING:-1}  # SERVING=0: skip the batching and single-stream runs (issue 20 only)
if [ "$SERVING" = 1 ]; then
  log "batching benchmark ($(left) s left)"
  timeout "$(left)" $PY bench/bench_batching.py --model "$MODEL" --gpu-layers "$NGL" \
    --threads "$THREADS" --rounds "${ROUNDS:-3}" --conc "${CONC:-1,4,8,16}" --tokens 128 \
    --json "$OUT/batching.json" --plot "$OUT/batching.png" --title "$TITLE" 2>&1 \
    | tee "$OUT/batching.txt"
  log "batching done ($(left) s left)"
fi

if [ "$SERVING" = 1 ] && [ "$(left)" -gt 60 ]; then
  timeout "$(left)" $PY bench/bench_llamacpp.py --model "$MODEL" --gpu-layers "$NGL" \
    --threads "$THREADS" --rounds 2 --repeats 3 --json "$OUT/single.json" 2>&1 \
    | tee "$OUT/single.txt"
fi
# issue 20's tables on the same model: verification at forced acceptance rates, grammar
# cost, KV cache types (each skipped when the deadline is near)
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" $PY bench/bench_spec_forced.py --model "$MODEL" --gpu-layers "$NGL" \
    --threads "$THREADS" --rounds 2 --streams 1,8 2>&1 | tee "$OUT/spec_forced.txt"
fi
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" $PY bench/bench_grammar.py --model "$MODEL" --gpu-layers "$NGL" \
    --threads "$THREADS" --rounds 3 2>&1 | tee "$OUT/grammar.txt"
fi
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" $PY bench/bench_kv_quant.py --model "$MODEL" --gpu-layers "$NGL" \
    --threads "$THREADS" --rounds 2 2>&1 | tee "$OUT/kv_quant.txt"
fi
log "end"
