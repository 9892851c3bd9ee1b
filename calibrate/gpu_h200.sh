#!/usr/bin/env bash
# The full calibration of Llama-2-7B fp16 on one GPU (made for the lent H200), every stage included
# (cached_prefill, loads_mp with k = 1, 2, 4, 8 processes, timeslice_mp with k = 1, 2, 4, 8 model
# copies), in one command of under 10 minutes. Writes under $OUT: the profile (JSON), its samples
# (CSV), the log and machine facts; prints a short table last.
#
# Run from the repository root. The GPU machines lack simpy and pydantic: carry the wheels that
# validate/device_wheels.sh downloads (.whl/); this script installs them, and this tree's djinnsim,
# into a private folder it puts on PYTHONPATH.
#   OUT=... bash calibrate/gpu_h200.sh
# DEVICE=cpu runs the same plumbing with the tiny model (a dry run, no GPU).
set -uo pipefail
OUT=${OUT:-results/calibration/h200}
DEVICE=${DEVICE:-cuda}
TOTAL_S=${TOTAL_S:-560}  # seconds from this script's start (the install included) to the calibration's SIGTERM;
# the device allows 600 per command, and the interrupted calibration needs up to 15 s to write its profile
if [ "$DEVICE" = cpu ]; then MODEL=${MODEL:-tiny-llama}; QUICK=--quick; else MODEL=${MODEL:-llama-2-7b}; QUICK=; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)

# This tree's djinnsim (and the carried wheels) go to a private folder on PYTHONPATH, never into
# the machine's Python: no other checkout's installation is shadowed or replaced.
SITE=$(mktemp -d /tmp/djinnsim-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
if ! python3 -c "import simpy, pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl > "$OUT/install.log" 2>&1
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" . >> "$OUT/install.log" 2>&1 \
  || { echo "cannot build djinnsim from this tree (see $OUT/install.log)"; exit 1; }
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>&1
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  echo "cpus $(nproc)"; free -g | head -2; df -h /tmp | tail -1
  echo "drop_caches writable: $( [ -w /proc/sys/vm/drop_caches ] && echo yes || echo no )"
} > "$OUT/machine.txt" 2>&1

profile="$OUT/$( [ "$DEVICE" = cpu ] && echo cpu || echo h200 )-$MODEL.json"
# SIGTERM at the limit: calibrate writes what it measured (the stages run in order of importance).
left=$(( TOTAL_S - ($(date +%s) - t0) ))
timeout --kill-after=15 "$left" python3 -m djinnsim.cli calibrate --device "$DEVICE" --gpu 0 --model "$MODEL" $QUICK \
  --out "$profile" > "$OUT/calibrate.log" 2>&1
echo "calibrate: exit $? after $(( $(date +%s) - t0 )) s" >> "$OUT/machine.txt"

cat "$OUT/machine.txt"
grep -E '^-- stage|FAILED|^error|Traceback' "$OUT/calibrate.log" | head -40
python3 - "$profile" <<'EOF'
import sys
from pathlib import Path

path = Path(sys.argv[1])
if not path.is_file():
    print(f"no profile written ({path})")
    sys.exit(0)
from djinnsim.sim.profile import load_profile

p = load_profile(path)
e = p.end_to_end
print(f"profile {path} ({p.metadata.gpu_name}, {p.metadata.duration_s} s)")
for tier, loads in p.loads_mp.items():
    cells = "  ".join(f"x{k} {v:6.2f}" for k, v in sorted(loads.aggregate_gbps.items()))
    print(f"loads_mp {tier:9} GB/s  {cells}   [{loads.limit}] {loads.note}")
if p.timeslice_mp is not None:
    ts = p.timeslice_mp
    cells = "  ".join(f"x{q.processes} {q.slowdown_p50:5.2f}" for q in ts.points)
    print(f"timeslice slowdown   {cells}   f={ts.gpu_busy_fraction:.3f} [{ts.limit}]")
if p.cached_prefill is not None:
    pieces = getattr(p.cached_prefill, "pieces", [p.cached_prefill])
    print(f"cached_prefill fit   {len(pieces)} piece(s), max rel err {max(x.max_rel_err or 0 for x in pieces):.1%}")
if p.kv_swaps is not None:
    cells = "  ".join(f"{k} {v.latency_s * 1e3:.2f} ms + B/{v.gbps:.1f} GB/s" for k, v in sorted(p.kv_swaps.fits.items()))
    print(f"kv swaps ({p.kv_swaps.tensors} tensors) {cells}")
if p.cold_shapes is not None:
    print(f"cold shapes          decode +{p.cold_shapes.decode_extra_s * 1e3:.1f} ms ({p.cold_shapes.source})")
if "exp21.total_s.p50" in e:
    print(f"exp2.1 total p50     {e['exp21.total_s.p50'] * 1e3:.1f} ms measured, {e['exp21.predicted.total_s'] * 1e3:.1f} ms fitted")
print("stages               " + ", ".join(f"{k[6:-2]} {v:.0f}s" for k, v in e.items() if k.startswith("stage.")))
EOF
echo "total $(( $(date +%s) - t0 )) s"
