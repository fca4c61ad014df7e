#!/usr/bin/env bash
# One call on a GPU machine without internet: install dsv4 from carried wheels, check every Triton kernel and
# graph replay against the CPU reference, certify the exact level, and time the decode step, the layer and a stack.
# Each stage has its own time limit; logs and JSON go to $OUT (the device tool brings them back).
#
# usage (from the repository root, wheels in .whl/: dsv4 built by `pip wheel --no-deps -w .whl .`, plus click; the
# machine's own torch, triton and pytest are used):  OUT=/tmp/out COMMIT=... BUDGET=S tools/gpu_session.sh [STAGE ...]
# BUDGET (seconds, default 570) bounds the whole call: a stage gets what is left of it at most, and a stage that
# would start with less than 20 s left is skipped (said in the log), so the stages are listed in order of importance.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dsv4-gpu}
mkdir -p "$OUT"
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
dsv4=(python3 -P -m dsv4.cli)     # -P: the installed dsv4, not the checkout's dsv4/ folder (no backends/ inside)
log="$OUT/session.log"
BUDGET=${BUDGET:-570}
stage() {   # stage NAME SECONDS COMMAND...: run it, time it, keep its output in the log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then echo "$name: skipped, ${left} s of the budget left" | tee -a "$log"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  echo "$name: exit $?, $((SECONDS - t0)) s"
}
wanted() { [ $# -eq 0 ] || [[ " $STAGES " == *" $1 "* ]]; }
STAGES="$*"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${COMMIT:-unknown}"; date -u; } | tee -a "$log"

wanted kernels && stage kernels 200 python3 -P -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py -k gpu \
  tests/test_graphs.py
wanted verify && stage verify 200 "${dsv4[@]}" verify --backend cuda --level exact --report "$OUT/cuda-exact.json" --quiet
wanted verify && stage compare 30 "${dsv4[@]}" compare docs/conformance/cpu-exact.json "$OUT/cuda-exact.json"
wanted speculate && stage speculate 120 python3 -P -m pytest -q -p no:cacheprovider -m cuda tests/test_speculative.py
wanted verify-invariant && stage verify-invariant 150 "${dsv4[@]}" verify --backend cuda --level batch-invariant \
  --report "$OUT/cuda-batch-invariant.json" --quiet
wanted run && for level in fast batch-invariant exact; do   # the first run of a level compiles its kernels
  stage "run-$level-compile" 45 "${dsv4[@]}" run --device cuda --determinism "$level" --max-new-tokens 16 --quiet
  stage "run-$level" 45 "${dsv4[@]}" run --device cuda --determinism "$level" --max-new-tokens 256 --quiet
done
wanted layer && stage layer 150 "${dsv4[@]}" bench layer --batches 1,64 --prefills "" --json "$OUT/layer.json" --quiet
wanted model && stage model 150 "${dsv4[@]}" bench model --layers 4 --batches 1,16,64 --long-contexts 1048576 \
  --prefill 0 --json "$OUT/model.json" --quiet
# the server runs as `python -m dsv4.cli serve`: from outside the checkout, so that the installed dsv4 is imported
wanted serve-bench && stage serve-bench 90 env -C /tmp "${dsv4[@]}" bench serve --device cuda \
  --determinism batch-invariant --max-batch 16 --requests 32 --concurrency 16 --json "$OUT/serve.json"
wanted speculate-bench && stage speculate-bench 240 "${dsv4[@]}" bench speculate --device cuda \
  --levels fast,batch-invariant,exact --batches 1,4,16 --speculate 1,2 --repeats 1 --json "$OUT/speculate.json"
grep -E "passed|failed|error|difference|tok/s|FAILED|OK$|Traceback" "$log" | tail -40
