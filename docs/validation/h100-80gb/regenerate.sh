#!/usr/bin/env bash
# Re-compare the H100 reference runs in this folder with the simulator as it is now (no GPU):
# writes exp21-resim/ and agents-resim/ beside the originals. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../../.."
# The profile the real runs used, re-fitted from its own samples by the current calibrate code
# (which also keeps the measured order of decode steps, for the simulator's step-time spells).
djinnsim calibrate --refit docs/validation/h100-80gb/gpu-llama-2-7b.json --out docs/validation/h100-80gb/gpu-llama-2-7b-refit.json --quiet
djinnsim validate --from-real docs/validation/h100-80gb/exp21 --calibration docs/validation/h100-80gb/gpu-llama-2-7b-refit.json --out docs/validation/h100-80gb/exp21-resim
djinnsim validate --from-real docs/validation/h100-80gb/agents --calibration docs/validation/h100-80gb/gpu-llama-2-7b-refit.json --out docs/validation/h100-80gb/agents-resim
