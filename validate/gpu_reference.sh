#!/usr/bin/env bash
# The reference validation on one GPU with Llama-2-7B fp16, in one command of under 10 minutes:
# calibrate (quick) and validate Exp 2.1 and Exp 2.2 back to back on the same machine (these
# machines drift by tens of percent between runs; a profile from another day is no fair reference).
#
#   1. Exp 2.1 without --calibration: validate calibrates first (quick), then runs the 4 backends at
#      25 Gbps, 3 repeats of 4 runs (1 warm-up) of 50 tokens each (240 s of real runs: the first
#      reference run's 170 s ran out before full_djinn, behind partially_aware's 250 ms tokens);
#   2. Exp 2.2 with the profile just made: djinn, Ray keep-alive and Ray serverless (both emulated
#      with processes) at N = 1, 2 with ACT 1 s, 2 repeats; keep-alive copies then loaded one at a
#      time until the first CUDA out-of-memory (the OOM N).
#
# Run from the repository root with djinnsim installed. Everything lands in $OUT (at most 8 files:
# the report folders travel as one tarball); the last lines printed are the short tables.
#
# PART=exp21 then PART=agents splits the two steps over two commands on the same (warm) machine,
# each with more time for real runs: the first keeps its profile in results/reference-profile/
# (ignored by git, kept on the machine between commands), the second validates against it.
set -uo pipefail
OUT=${OUT:-results/validation/reference}
WORK=$(mktemp -d /tmp/djinnsim-reference.XXXXXX)
TOTAL_S=${TOTAL_S:-570}  # seconds from the script's start; the device allows 600 per command
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu runs the same plumbing with the tiny model (a dry run, no GPU)
PART=${PART:-all}  # all | exp21 | agents
KEEP=results/reference-profile
EXP21_BUDGET_S=${EXP21_BUDGET_S:-240}  # seconds of real Exp 2.1 runs
AGENT_REPEATS=${AGENT_REPEATS:-2}
FULL_CALIBRATION=${FULL_CALIBRATION:-0}  # 1: the full calibration (about 300 s on an H100), not --quick (about 110 s)
if [ "$FULL_CALIBRATION" = 1 ]; then CALIBRATION_FLAG=--full-calibration; CALIBRATION_S=360; else CALIBRATION_FLAG=; CALIBRATION_S=160; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  nproc; free -g | head -2
} > "$OUT/machine.txt" 2>&1

if [ "$PART" != agents ]; then
  timeout --kill-after=10 $(( EXP21_BUDGET_S + CALIBRATION_S )) python3 -m djinnsim.cli validate scenarios/exp21_decode.yaml --gpu 0 --device "$DEVICE" \
    --repeats 3 --runs 4 --warmup-runs 1 --time-budget-s "$EXP21_BUDGET_S" $CALIBRATION_FLAG --out "$WORK/exp21" > "$OUT/exp21.log" 2>&1
  echo "exp21: exit $? at $(elapsed) s" >> "$OUT/machine.txt"
  profile=$(ls "$WORK"/exp21/calibration/*.json 2>/dev/null | head -1)
  if [ -n "$profile" ]; then
    rm -rf "$KEEP" && mkdir -p "$KEEP" && cp "$WORK"/exp21/calibration/* "$KEEP"/
  fi
else
  profile=$(ls "$KEEP"/*.json 2>/dev/null | head -1)
  echo "agents: profile kept by PART=exp21: '${profile}'" >> "$OUT/machine.txt"
fi

left=$(( TOTAL_S - $(elapsed) ))
if [ "$PART" = exp21 ]; then
  :
elif [ -n "$profile" ] && [ "$left" -gt 90 ]; then
  timeout --kill-after=10 "$left" python3 -m djinnsim.cli validate scenarios/agents32.yaml --gpu 0 --device "$DEVICE" \
    --calibration "$profile" --agents 1,2 --act-s 1 --repeats "$AGENT_REPEATS" --oom-probe-max 12 \
    --time-budget-s $(( left - 60 )) --out "$WORK/agents" > "$OUT/agents.log" 2>&1
  echo "agents: exit $? at $(elapsed) s" >> "$OUT/machine.txt"
else
  echo "agents: not run (profile '${profile}', ${left} s left)" >> "$OUT/machine.txt"
fi

tar czf "$OUT/reference.tar.gz" -C "$WORK" . 2>> "$OUT/machine.txt"
for part in exp21 agents; do
  [ -f "$WORK/$part/validation.md" ] && cp "$WORK/$part/validation.md" "$OUT/$part.md"
done
cat "$OUT/machine.txt"
for part in exp21 agents; do
  echo "== $part"
  [ -f "$OUT/$part.log" ] && sed -n '/^point /,/^report:/p' "$OUT/$part.log" | grep -v '^report:'
  [ -f "$OUT/$part.log" ] && grep -E '^error:|Traceback' "$OUT/$part.log" | head -3
done
echo "total $(elapsed) s"
