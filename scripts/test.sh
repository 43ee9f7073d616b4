#!/usr/bin/env bash
# Set up with the test extras, then run the whole test suite (offline, CPU), one worker per core. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The report's browser test drives Debian's chromium through Playwright. Install it when it is missing and
# apt-get is usable as root; otherwise (or if that fails) carry on: that one test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the report's browser test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "could not install chromium; the browser test will be skipped" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
set +e
# one single-threaded pytest-xdist worker per core, at most 4 (each builds the shared fixtures once); whole files
# go to one worker, so module fixtures are built once. QSCHED_TEST_WORKERS=0 runs in this process.
workers="${QSCHED_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
.venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$code"
