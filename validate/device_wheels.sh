#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the wheels a GPU machine without simpy and pydantic needs
# to install djinnsim with --no-deps: CPython 3.12, x86-64 manylinux. Put them in .whl/ (ignored by
# git) and carry that folder to the GPU machine, where:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 -m pip install -q --no-deps --no-build-isolation --no-index .
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl simpy==4.1.2 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types typing-inspection typing_extensions
ls .whl
