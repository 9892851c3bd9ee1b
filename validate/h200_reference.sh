#!/usr/bin/env bash
# The H200 reference validation, item by item from docs/validation/h200/plan.yaml, each command
# under 10 minutes. Run from the repository root with djinnsim installed:
#
#   ITEMS="calibrate exp21-25" bash validate/h200_reference.sh    # command 1: full calibration, then Exp 2.1
#   ITEMS="agents-124" bash validate/h200_reference.sh            # command 2 (same warm machine, or carry results/h200)
#   ITEMS="agents-8" bash validate/h200_reference.sh              # command 3
#   ITEMS="calibrate pool djinn-fcfs-32a" ...                       # pool: refit with plan.yaml's level_from
#
# `calibrate` writes the profile to results/h200/ (ignored by git; kept on a warm machine, else
# carried back with the run tool's `carry: ["results/h200"]`) and a copy to $OUT/profile/ to commit.
# Every later item validates against that profile, frozen (sha256) before its real runs start;
# `python -m djinnsim.validate.plan docs/validation/h200/plan.yaml` lists the items and their
# estimated device time. Every report folder, each item's log and its validation.md travel in
# $OUT/h200-reference.tar.gz: the run tool brings back at most 8 files, so $OUT gets only that
# tarball and machine.txt (the short table is printed last).
set -uo pipefail
PLAN=docs/validation/h200/plan.yaml
OUT=${OUT:-results/validation/h200}
TOTAL_S=${TOTAL_S:-570}  # seconds from the script's start; the device allows 600 per command
ITEMS=${ITEMS:?set ITEMS, e.g. ITEMS=\"calibrate exp21-25\"}
PROFILE=$(python3 -c "import yaml; print(yaml.safe_load(open('$PLAN'))['profile'])")
WORK=$(mktemp -d /tmp/djinnsim-h200.XXXXXX)
mkdir -p "$OUT" "$(dirname "$PROFILE")"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  git rev-parse HEAD 2>/dev/null || echo "no git"
  nproc; free -g | head -2
} > "$OUT/machine.txt" 2>&1

for item in $ITEMS; do
  left=$(( TOTAL_S - $(elapsed) ))
  if [ "$item" = calibrate ]; then
    cmd=$(python3 -c "import yaml; print(yaml.safe_load(open('$PLAN'))['calibration']['command'])")
    echo "calibrate: $cmd" >> "$OUT/machine.txt"
    timeout --kill-after=10 "$left" $cmd > "$OUT/calibrate.log" 2>&1
    echo "calibrate: exit $? at $(elapsed) s" >> "$OUT/machine.txt"
    mkdir -p "$WORK/profile" && cp "$(dirname "$PROFILE")"/* "$WORK/profile/" 2>> "$OUT/machine.txt"
    continue
  fi
  if [ "$item" = pool ]; then
    # The profile refitted in place with the batch-1 spells of the earlier calibrations (plan.yaml's
    # level_from), before any real run of the items after it, which judge it frozen.
    froms=$(python3 -c "import yaml; print(' '.join('--level-from ' + p for p in yaml.safe_load(open('$PLAN')).get('level_from', [])))")
    # A calibration interrupted before some of its load stages (TOTAL_S) carries those of plan.yaml's
    # loads_from (whole-model loads, k-process loads, k-process decoding), named in every run's warnings.
    if python3 -c "import json, sys; p = json.load(open('$PROFILE')); sys.exit(0 if p['weight_load'] and p['loads_mp'] and p['timeslice_mp'] else 1)"; then :; else
      froms="$froms --loads-from $(python3 -c "import yaml; print(yaml.safe_load(open('$PLAN'))['loads_from'])")"
    fi
    echo "pool: djinnsim calibrate --refit $PROFILE $froms --quiet" >> "$OUT/machine.txt"
    djinnsim calibrate --refit "$PROFILE" $froms --quiet >> "$OUT/machine.txt" 2>&1
    code=$?
    echo "pool: exit $code at $(elapsed) s" >> "$OUT/machine.txt"
    if [ "$code" -ne 0 ]; then  # the items after it would judge the unpooled profile
      echo "pool failed: no later item runs" >> "$OUT/machine.txt"
      break
    fi
    # Beside it, the same profile with its point at the median level its bands draw (`--level-point
    # median`), also made and hashed before any real run: the items judge the plain profile live,
    # and re-judged offline on this one (`djinnsim validate --from-real DIR --calibration
    # .../h200-llama-2-7b-median.json`) they are held out too.
    median="${PROFILE%.json}-median.json"
    djinnsim calibrate --refit "$PROFILE" --level-point median --out "$median" --quiet >> "$OUT/machine.txt" 2>&1
    echo "pool: median point exit $? at $(elapsed) s" >> "$OUT/machine.txt"
    sha256sum "$PROFILE" "$median" >> "$OUT/machine.txt" 2>&1
    # The pooled profile comes back in h200-reference.tar.gz (profile/): extract it into
    # results/h200/ before carrying that folder to a later command, or its items judge another profile.
    mkdir -p "$WORK/profile" && cp "$(dirname "$PROFILE")"/* "$WORK/profile/" 2>> "$OUT/machine.txt"
    continue
  fi
  if [ ! -f "$PROFILE" ]; then
    echo "$item: not run: no profile at $PROFILE (run ITEMS=calibrate first, or carry results/h200)" >> "$OUT/machine.txt"
    continue
  fi
  if [ "$left" -lt 90 ]; then
    echo "$item: not run: ${left} s left" >> "$OUT/machine.txt"
    continue
  fi
  cmd=$(python3 -m djinnsim.validate.plan "$PLAN" --command "$item" --profile "$PROFILE" --budget-s $(( left - 45 )))
  echo "$item: $cmd" >> "$OUT/machine.txt"
  OUT="$WORK" timeout --kill-after=10 "$left" bash -c "$cmd" > "$WORK/$item.log" 2>&1
  echo "$item: exit $? at $(elapsed) s" >> "$OUT/machine.txt"
  [ -f "$WORK/$item/validation.md" ] && cp "$WORK/$item/validation.md" "$WORK/$item.md"
done

cp "$OUT/machine.txt" "$WORK/machine.txt"
tar czf "$OUT/h200-reference.tar.gz" -C "$WORK" . 2>> "$OUT/machine.txt"
cat "$OUT/machine.txt"
for item in $ITEMS; do
  [ -f "$WORK/$item.log" ] || continue
  echo "== $item"
  sed -n '/^point /,/^report:/p' "$WORK/$item.log" | grep -v '^report:'
  grep -E '^error:|Traceback' "$WORK/$item.log" | head -3
done
echo "total $(elapsed) s"
