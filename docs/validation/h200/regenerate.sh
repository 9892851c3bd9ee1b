#!/usr/bin/env bash
# Re-compare the committed H200 reference runs with the simulator as it is now, on the CPU (no GPU,
# nothing real re-run); each section says what it re-makes. First run 1, into run1-decodefit/: Exp 2.1
# judged on the bundled profile refitted without calibrate's own Exp 2.1 runs (as the live
# validation did), the agents on the bundled profile. The re-made folders pooled-level/,
# level-conditioned/, link-serial/, level-point/, run6-rejudge/ and link-path/ commit their reports and
# profiles only: their records and figures (and, in the last three, the refitted profiles' samples
# CSVs) are re-made here and ignored by git (the tree travels to the GPU machine).
# These re-comparisons are in-sample: the decode fit and spread rules they use were designed after
# seeing run 1 (each report labels its figures so).
set -euo pipefail
cd "$(dirname "$0")/../../.."
here=docs/validation/h200
profile=sim/data/profiles/h200-llama-2-7b.json
out=$here/run1-decodefit
djinnsim calibrate --refit $profile --out $out/calibration/h200-llama-2-7b-heldout.json --leave-out exp21_step --quiet
djinnsim validate --from-real $here/run1/exp21-25 --calibration $out/calibration/h200-llama-2-7b-heldout.json \
  --out $out/exp21-25 --quiet --force
for item in agents-124 serverless-124; do
  djinnsim validate --from-real $here/run1/$item --calibration $profile --out $out/$item --quiet --force
done

# Run 3's Exp 2.1 at 25 Gbps re-judged with run 3's own samples (the live report read run 2's
# samples file left beside the run-3 profile; see README, run 3). In-sample by rule (simulator newer
# than the runs), though no model code changed.
run3=$here/run3
cal3=docs/calibration/h200-run3/h200-llama-2-7b.json
djinnsim calibrate --refit $cal3 --out $run3/calibration/h200-llama-2-7b-heldout.json --leave-out exp21_step --quiet
djinnsim validate --from-real $run3/exp21-25 --calibration $run3/calibration/h200-llama-2-7b-heldout.json \
  --out $run3/exp21-25-resim --quiet --force

# Pooled decode level (IN-SAMPLE: `--level-from` was written after seeing run 3): each run's
# profile refitted with the batch-1 spells of the calibrations made before it, runs 2 and 3
# re-judged on it, into pooled-level/.
out=$here/pooled-level
run1=sim/data/profiles/h200-llama-2-7b.json
run2=docs/calibration/h200-run2/h200-llama-2-7b.json
run3=docs/calibration/h200-run3/h200-llama-2-7b.json
mkdir -p $out/calibration
# Each run's profile with the batch-1 spells of the calibrations made before it (run 2: run 1's; run 3: runs 1 and 2).
djinnsim calibrate --refit $run2 --out $out/calibration/run2-pooled.json --level-from $run1 --quiet
djinnsim calibrate --refit $run2 --out $out/calibration/run2-pooled-heldout.json --level-from $run1 --leave-out exp21_step --quiet
djinnsim calibrate --refit $run3 --out $out/calibration/run3-pooled.json --level-from $run1 --level-from $run2 --quiet
djinnsim calibrate --refit $run3 --out $out/calibration/run3-pooled-heldout.json --level-from $run1 --level-from $run2 --leave-out exp21_step --quiet
for item in exp21-25 exp21-10; do
  djinnsim validate --from-real $here/run2/$item --calibration $out/calibration/run2-pooled-heldout.json --out $out/run2-$item --quiet --force
done
for item in agents-8 keepalive-max; do
  djinnsim validate --from-real $here/run2/$item --calibration $out/calibration/run2-pooled.json --out $out/run2-$item --quiet --force
done
djinnsim validate --from-real $here/run3/exp21-25 --calibration $out/calibration/run3-pooled-heldout.json --out $out/run3-exp21-25 --quiet --force
djinnsim validate --from-real $here/run3/djinn-fcfs-16 --calibration $out/calibration/run3-pooled.json --out $out/run3-djinn-fcfs-16 --quiet --force

# Level-conditioned diagnostics (IN-SAMPLE by construction: the profile's passes scaled by the judged
# runs' own compute per token), into level-conditioned/.
out=$here/level-conditioned
run2cal=docs/calibration/h200-run2/h200-llama-2-7b.json
run3cal=docs/calibration/h200-run3/h200-llama-2-7b.json
mkdir -p $out/calibration
djinnsim calibrate --refit $run2cal --out $out/calibration/run2-heldout.json --leave-out exp21_step --quiet
for item in exp21-25 exp21-10; do
  djinnsim validate --from-real $here/run2/$item --calibration $out/calibration/run2-heldout.json --condition-on-level --out $out/run2-$item --quiet --force
done
for item in agents-8; do  # keepalive-max has no point where one process has the GPU
  djinnsim validate --from-real $here/run2/$item --calibration $run2cal --condition-on-level --out $out/run2-$item --quiet --force
done
djinnsim validate --from-real $here/run3/exp21-25 --calibration $here/run3/calibration/h200-llama-2-7b-heldout.json --condition-on-level --out $out/run3-exp21-25 --quiet --force
djinnsim validate --from-real $here/run3/djinn-fcfs-16 --calibration $run3cal --condition-on-level --out $out/run3-djinn-fcfs-16 --quiet --force

# Run 4 on the pooled level, as its `pool` item would have judged it had there been device time
# (plan.yaml's level_from: runs 1-3's calibrations; made after the runs from calibration samples
# only, no code changed since the runs; labelled in-sample by the report's rule), into pooled-level/.
out=$here/pooled-level
run4=docs/calibration/h200-run4/h200-llama-2-7b.json
djinnsim calibrate --refit $run4 --out $out/calibration/run4-pooled.json --level-from $run1 --level-from $run2 --level-from $run3 --quiet
djinnsim calibrate --refit $run4 --out $out/calibration/run4-pooled-heldout.json --level-from $run1 --level-from $run2 --level-from $run3 --leave-out exp21_step --quiet
for item in exp21-25 link-low; do
  djinnsim validate --from-real $here/run4/$item --calibration $out/calibration/run4-pooled-heldout.json --out $out/run4-$item --quiet --force
done
for item in timeslice-12 timeslice-48; do
  djinnsim validate --from-real $here/run4/$item --calibration $out/calibration/run4-pooled.json --out $out/run4-$item --quiet --force
done
# partially_aware's loopback host time in series with the link (IN-SAMPLE: the charge was written after
# seeing runs 3 and 4): calibrate's loopback_serial_gbps computed from each run's own composition rows
# (its calibrate.log) into a copy of the profile that run was judged on, the runs re-judged on it,
# into link-serial/ (README, "Where partially_aware's missing time goes").
out=$here/link-serial
python benchmarks/partially_aware_host.py --calibration docs/calibration/h200-run3/calibrate.log docs/calibration/h200-run4/calibrate.log \
  --profile $here/run3/calibration/h200-llama-2-7b-heldout.json $here/run4/link-low/calibration/h200-llama-2-7b-heldout.json \
  --out $out/calibration/run3 $out/calibration/run4
djinnsim validate --from-real $here/run3/exp21-25 --calibration $out/calibration/run3/h200-llama-2-7b-heldout.json --out $out/run3-exp21-25 --quiet --force
for item in link-low exp21-25; do
  djinnsim validate --from-real $here/run4/$item --calibration $out/calibration/run4/h200-llama-2-7b-heldout.json --out $out/run4-$item --quiet --force
done
# Run 5's Djinn serial FCFS at N = 32: its repeats ran over two device commands (3 + 2) on the one
# pooled profile frozen before the first; judged as one validation (held out when re-made by the code
# that ran them, eb1d587, as committed; re-made by model code committed after the runs, validate labels
# it in-sample).
djinnsim validate --from-real $here/run5/djinn-fcfs-32a --also-real $here/run5/djinn-fcfs-32b \
  --calibration $here/run5/pooled-profile/h200-llama-2-7b.json --out $here/run5/djinn-fcfs-32 --quiet --force

# The point at the band's median level (IN-SAMPLE: `--level-point median` was written after seeing runs
# 1-5): runs 2-5 each on its calibration with the earlier calibrations' batch-1 spells pooled, the point
# at the fit (fit/) and at the median pooled level (median/), judged alike (Exp 2.1 and the link on the
# refit without calibrate's Exp 2.1 runs, as the live runs were), into level-point/.
out=$here/level-point
cal=$out/calibration
pooled=$here/pooled-level/calibration
mkdir -p $cal
for n in 2 3 4; do
  djinnsim calibrate --refit $pooled/run$n-pooled.json --out $cal/run$n-median.json --level-point median --quiet
  djinnsim calibrate --refit $pooled/run$n-pooled.json --out $cal/run$n-median-heldout.json --level-point median --leave-out exp21_step --quiet
done
run5pool=$here/run5/pooled-profile/h200-llama-2-7b.json
djinnsim calibrate --refit $run5pool --out $cal/run5-pooled-heldout.json --leave-out exp21_step --quiet
djinnsim calibrate --refit $run5pool --out $cal/run5-median.json --level-point median --quiet
djinnsim calibrate --refit $run5pool --out $cal/run5-median-heldout.json --level-point median --leave-out exp21_step --quiet
# run:item:profile (held: refitted without calibrate's Exp 2.1 runs; full: the whole profile)
items="2:exp21-25:held 2:exp21-10:held 2:agents-8:full 2:keepalive-max:full 3:exp21-25:held 3:djinn-fcfs-16:full
  4:exp21-25:held 4:link-low:held 4:timeslice-12:full 4:timeslice-48:full 5:exp21-25:held 5:link-low:held 5:djinn-fcfs-32a:full"
for entry in $items; do
  IFS=: read -r n item which <<< "$entry"
  also=(); [ "$item" = djinn-fcfs-32a ] && also=(--also-real $here/run5/djinn-fcfs-32b)
  suffix=; [ "$which" = held ] && suffix=-heldout
  before=$pooled/run$n-pooled$suffix.json
  [ $n = 5 ] && before=$( [ "$which" = held ] && echo $cal/run5-pooled-heldout.json || echo $run5pool )
  djinnsim validate --from-real $here/run$n/$item "${also[@]}" --calibration $before --out $out/fit/run$n-$item --quiet --force
  djinnsim validate --from-real $here/run$n/$item "${also[@]}" --calibration $cal/run$n-median$suffix.json --out $out/median/run$n-$item --quiet --force
done
python benchmarks/level_point_table.py $out > $out/README.md  # the tables, every point

# Run 6 (held out: the pooled profile and its --level-point median twin were both made and hashed on
# the GPU machine before any real run; the code is that which ran them, e32a25e): every item re-judged
# offline on the live profile (fit/: the very files the live items froze, so it must reproduce the
# live reports and their held-out labels) and on the median twin (median/; Exp 2.1 and the links on
# it refitted without calibrate's Exp 2.1 runs, as live). validate labels median/ in-sample: it cannot
# check the twin's hash, which machine-cmd2.txt recorded before the runs. Into run6-rejudge/. As
# committed, made by the code that ran them (bfab232); re-made by later model code, every report is
# labelled in-sample.
rejudge_median() {  # run number, then its items as ITEM:held (judged on the Exp 2.1-held-out refit) or ITEM:full
  local n=$1; shift
  local out=$here/run$n-rejudge run=$here/run$n cal=$here/run$n-rejudge/calibration item which fit med entry
  mkdir -p $cal
  djinnsim calibrate --refit $run/pooled-profile/h200-llama-2-7b-median.json --out $cal/run$n-median-heldout.json --leave-out exp21_step --quiet
  for entry in "$@"; do
    IFS=: read -r item which <<< "$entry"
    if [ "$which" = held ]; then fit=$run/$item/calibration/h200-llama-2-7b-heldout.json; med=$cal/run$n-median-heldout.json
    else fit=$run/pooled-profile/h200-llama-2-7b.json; med=$run/pooled-profile/h200-llama-2-7b-median.json; fi
    djinnsim validate --from-real $run/$item --calibration $fit --out $out/fit/run$n-$item --quiet --force
    djinnsim validate --from-real $run/$item --calibration $med --out $out/median/run$n-$item --quiet --force
  done
  local hashed; hashed=$(cd $run && grep -l -- "-median.json" machine-cmd*.txt | head -1)
  python benchmarks/level_point_table.py $out --note "held out in fact: both profiles were hashed on the GPU machine (run$n/$hashed) before any real run, by the code that ran them; fit/ keeps the live reports' held-out labels, median/ is labelled in-sample by validate, which cannot check the twin's recorded hash" > $out/README.md
}
rejudge_median 6 exp21-25:held link-100:held link-low:held timeslice-12:full agents-8:full

# Run 7's items re-judged on the `--level-point median` twin of its pooled profile, as run 6's
# above (held out in fact: run7/machine-cmd2.txt recorded both hashes before the runs). Into
# run7-rejudge/. As committed, made by the code that ran them (cae8b05; the model code is unchanged
# at the commit that added this section); re-made by later model code, every report is labelled in-sample.
rejudge_median 7 exp21-25:held link-100:held timeslice-12:full agents-8:full

# The loopback host path with serialization, per message size (network.loopback_path; IN-SAMPLE:
# written after seeing run 6): each run's Exp 2.1 and link items judged on the profile it was judged
# on (before/: runs 3 and 4 as link-serial/ re-judged them, runs 5 and 6 live) and on that profile
# with loopback_path from the run's own composition rows (after/: runs 3 and 4 from their
# calibrate.log, whose profiles keep no server times; runs 5 and 6 by `--refit --loopback-path`),
# into link-path/.
out=$here/link-path
cal=$out/calibration
mkdir -p $cal
python benchmarks/partially_aware_host.py --with-path \
  --calibration docs/calibration/h200-run3/calibrate.log docs/calibration/h200-run4/calibrate.log \
  --profile $here/run3/calibration/h200-llama-2-7b-heldout.json $here/run4/link-low/calibration/h200-llama-2-7b-heldout.json \
  --out $cal/run3 $cal/run4 > /dev/null
for n in 5 6; do
  djinnsim calibrate --refit $here/run$n/pooled-profile/h200-llama-2-7b.json --out $cal/run$n/h200-llama-2-7b-heldout.json \
    --leave-out exp21_step --loopback-path --quiet
done
for entry in 3:exp21-25 4:exp21-25 4:link-low 5:exp21-25 5:link-low 6:exp21-25 6:link-100 6:link-low; do
  IFS=: read -r n item <<< "$entry"
  real=$here/run$n/$item
  if [ $n -le 4 ]; then before=$here/link-serial/calibration/run$n/h200-llama-2-7b-heldout.json
  else before=$real/calibration/h200-llama-2-7b-heldout.json; fi
  djinnsim validate --from-real $real --calibration $before --out $out/before/run$n-$item --quiet --force
  djinnsim validate --from-real $real --calibration $cal/run$n/h200-llama-2-7b-heldout.json --out $out/after/run$n-$item --quiet --force
done
python benchmarks/level_point_table.py $out --sides before after --title "The loopback host path with serialization, per message size" \
  --note "every figure **in-sample** (loopback_path was written after seeing run 6; the reports say why)" > $out/README.md

# The loopback link's band spread pooled over calibrations (spread.loopback_path with the
# --level-from calibrations' composition rows over this one's; IN-SAMPLE: written after seeing run
# 7): run 7's Exp 2.1 and 100 Gbps items judged on the profile they were judged on live (before/) and
# on the same pooled profile refitted by this code (after/), into path-pool/.
out=$here/path-pool
cal=$out/calibration
mkdir -p $cal
djinnsim calibrate --refit $here/run7/pooled-profile/h200-llama-2-7b.json --out $cal/run7-heldout.json --leave-out exp21_step --quiet
for item in exp21-25 link-100; do
  djinnsim validate --from-real $here/run7/$item --calibration $here/run7/$item/calibration/h200-llama-2-7b-heldout.json \
    --out $out/before/run7-$item --quiet --force
  djinnsim validate --from-real $here/run7/$item --calibration $cal/run7-heldout.json --out $out/after/run7-$item --quiet --force
done
python benchmarks/level_point_table.py $out --sides before after --title "The loopback link's band spread pooled over calibrations" \
  --note "every figure **in-sample** (the pooled path spread was written after seeing run 7; the reports say why)" > $out/README.md

# Runs 9 and 10 re-judged the same way (both hashes in run9/ and run10/machine-cmd1.txt, taken
# before any real run), into run9-rejudge/ and run10-rejudge/.
rejudge_median 9 exp21-25:held
rejudge_median 10 link-low:held djinn-fcfs-16:full

# Run 11's keepalive-max (k = 10) re-judged on its pooled profile carrying run 7's k-process stages
# (`--loads-from`, plan.yaml's loads_from, named before the run; the live pool did not apply it
# because the calibration had measured its whole-model loads): IN-SAMPLE, made after seeing the run.
out=$here/run11-rejudge
mkdir -p $out/calibration
cp $here/run11/pooled-profile/h200-llama-2-7b.json $here/run11/pooled-profile/h200-llama-2-7b.csv.gz $out/calibration/
djinnsim calibrate --refit $out/calibration/h200-llama-2-7b.json --loads-from docs/calibration/h200-run7/h200-llama-2-7b.json --quiet
djinnsim validate --from-real $here/run11/keepalive-max --calibration $out/calibration/h200-llama-2-7b.json \
  --out $out/loads-run7/run11-keepalive-max --quiet --force

# Run 12 re-judged the same way (both hashes in run12/machine-cmd1.txt, taken before any real run;
# made by the code that ran them, 9401062, merged with perf15's output-only changes), into run12-rejudge/.
rejudge_median 12 exp21-25:held exp21-10:held link-low:held djinn-fcfs-16:full keepalive-max:full

# Run 13 re-judged the same way (both hashes in run13/machine-cmd2.txt, taken before any real run;
# made by the code that ran them, f48e099), into run13-rejudge/.
rejudge_median 13 exp21-25:held link-100:held keepalive-max:full timeslice-48:full

# Run 14 re-judged the same way (both hashes in run14/machine-cmd2.txt, taken before any real run;
# made by the code that ran them, b9968e5), into run14-rejudge/.
rejudge_median 14 exp21-25:held link-low:held link-100:held timeslice-48:full

# Committed reports keep their records and the calibrations' samples files gzipped (the tree that
# travels to the GPU machine is capped at 64 MiB; validate's --from-real and every samples reader take
# either form, and a samples file is hashed by its content): the CSVs re-made above that git would
# track (records in run1-decodefit/, run3/exp21-25-resim/, run5/djinn-fcfs-32/; the refitted profiles'
# samples) go back to that form; the ignored ones stay plain. `gzip -n` stores no name or time stamp:
# the same rows give the same bytes.
git ls-files -z --others --exclude-standard -- $here | { grep -z '\.csv$' || true; } | xargs -0 -r gzip -n -f
