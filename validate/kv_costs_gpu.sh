#!/usr/bin/env bash
# Real KV swaps, re-prefills and reuse on the GPU against what the simulator charges (issue 10,
# item 3; docs/validation/kv-costs.md). One device command of about a minute, run from the
# repository root minutes after a calibration of the same machine and model:
#
#   PROFILE=results/h200/h200-llama-2-7b.json bash validate/kv_costs_gpu.sh
#
# PROFILE is used frozen (its sha256 is recorded before the first real run, nothing is refitted).
# Without simpy/pydantic on the machine, djinnsim installs from the wheels of validate/device_wheels.sh
# in .whl/ (carry it). Writes kv_costs.json, kv_costs.md and the log under $OUT; the short table is
# printed last. CONTEXTS (default 128,512,1024,2048), REPEATS (15), WARMUPS (3) override the defaults;
# DEVICE=cpu is a dry run with the tiny model (its profile must be a CPU one of tiny-llama).
set -uo pipefail
PROFILE=${PROFILE:?set PROFILE to the profile calibrated on this machine minutes before}
OUT=${OUT:-results/kv_costs}
DEVICE=${DEVICE:-cuda}
CONTEXTS=${CONTEXTS:-128,512,1024,2048}
REPEATS=${REPEATS:-15}
WARMUPS=${WARMUPS:-3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)

if ! python3 -c "import simpy, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/djinnsim-site .whl/*.whl && export PYTHONPATH=/tmp/djinnsim-site
fi
# Always this checkout: a djinnsim installed earlier on a warm machine may be another commit.
python3 -m pip install -q --no-deps --no-build-isolation --no-index . > "$OUT/install.log" 2>&1 \
  || { echo "error: cannot install djinnsim here (see $OUT/install.log)"; exit 1; }
{
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  git rev-parse HEAD 2>/dev/null || echo "no git"
  nproc; free -g | head -2
} > "$OUT/machine.txt" 2>&1

timeout --kill-after=10 300 python3 -m djinnsim.validate.kv_costs --device "$DEVICE" --profile "$PROFILE" \
  --out "$OUT" --contexts "$CONTEXTS" --repeats "$REPEATS" --warmups "$WARMUPS" > "$OUT/kv_costs.log" 2>&1
rc=$?
cat "$OUT/machine.txt"
echo "kv_costs: exit $rc in $(( $(date +%s) - t0 )) s"
grep -E '^(error:|Traceback)' "$OUT/kv_costs.log" | head -3
sed -n '/^wrote /,$p' "$OUT/kv_costs.log"
exit $rc
