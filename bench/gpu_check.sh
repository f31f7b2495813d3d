#!/usr/bin/env bash
# One call on a GPU machine: install the project without network, run the GPU tests and the
# benchmarks, and pack the results under $OUT.
#
#   BINDECODE_COMMIT=$(git rev-parse HEAD) bash bench/gpu_check.sh [STAGE ...]
#
# STAGE is any of: tests kernels l2flush linear chain lmhead persistent layers engine profile
# sampling e2e serve (default: all but linear, whose sweep only retunes kernels.linear, and
# persistent, a design study). Wheels for packages the GPU image lacks (FastAPI, uvicorn, pydantic) are taken
# from .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
RES=$OUT/results
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 BINDECODE_COMMIT=${BINDECODE_COMMIT:-unknown}
stages=${*:-tests kernels l2flush chain lmhead layers engine profile sampling e2e serve}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RES/gpu.txt"

status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED rc=$rc"; status=1; }
}

for stage in $stages; do
  case $stage in
    tests)   run gpu_tests python3 -m pytest -m gpu -q -x --timeout=300 -p no:cacheprovider ;;
    kernels) run kernels python3 -m bench.kernels --out "$RES" ;;
    l2flush) run l2_flush python3 -m bench.l2_flush --out "$RES" ;;
    linear)  run kernel_linear python3 -m bench.kernel_linear --sweep ;;
    chain)   run gemm_chain python3 -m bench.gemm_chain --out "$RES" ;;
    lmhead)  run lm_head python3 -m bench.lm_head --out "$RES" ;;
    persistent) run persistent_chain python3 -m bench.persistent_chain --out "$RES" \
               --variants "x6w16,x8w12,x6w16 chunk-waits,x6w16 no-x-loads,x6w16 weights-only,x6w16 weights-only no-mma"
               run persistent_trace python3 -m bench.persistent_trace --out "$RES" \
               --variants "x6w16,x6w16 no-mma,x6w16 no-x-loads no-mma,x6w16 weights-only no-mma" ;;
    layers)  run attention_layers python3 -m bench.attention_layers --out "$RES" ;;
    engine)  run engine python3 -m bench.engine --hf-compile --out "$RES" ;;
    profile) run profile python3 -m bench.profile_step --out "$RES" ;;
    sampling) run sampling python3 -m bench.sampling --models dummy:llama-3.2-1b,dummy:llama-3.1-8b \
               --out "$RES" ;;
    e2e)     run e2e python3 -m bench.e2e --out "$RES" ;;
    serve)   run serve python3 -m bench.serve --launch-server --model dummy:llama-3.2-1b --batch-size 64 \
               --bins 4 --num-requests 1024 --rate inf --compare-offline --out "$RES/serve" ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done

# At most 8 files come back: logs and results travel as one tarball, the key JSON/PNG beside it.
tar -czf "$OUT/bundle.tgz" -C "$OUT" results $(cd "$OUT" && ls *.log 2>/dev/null)
exit $status
