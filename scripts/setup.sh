#!/usr/bin/env bash
# Set up a development checkout: a virtualenv in .venv with the project and its test extras,
# and Debian's bubblewrap (the validator's sandbox) when running as root on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq bubblewrap >/dev/null; }
  else
    echo "warning: bwrap not found; install bubblewrap: workers refuse to run untrusted tests without it (RMO_SANDBOX=subprocess opts into reduced isolation)" >&2
  fi
fi

# Debian's prometheus: promtool (`promtool check metrics` of the worker's exposition) and the
# server the integration tests start on ports of their own. Only the binaries are wanted: no
# recommended node exporter, and the package's service, which apt starts on a systemd host,
# is stopped and disabled again.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
    if [ -d /run/systemd/system ]; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  else
    echo "warning: prometheus/promtool not found; install Debian's prometheus package: the Prometheus exposition tests are skipped without it" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# The Open Bandit Pipeline checks agents/ope.py's estimators (tests/unit/test_ope.py). 0.4.1 is
# its last release that installs on Python >= 3.11 (0.5.x declares <3.11); --no-deps because
# it requires torch (gigabytes), which obp.ope's numpy estimators never call: the test extra
# holds obp.ope's other imports, and the test stands in for the torch names it binds.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps 'obp==0.4.1'
