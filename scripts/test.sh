#!/usr/bin/env bash
# Install the test dependencies into .venv and run the whole test suite.
# The tests start their own redis-server, simulator, workers and supervisord.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[test]'
if ! command -v redis-server >/dev/null; then
  echo "redis-server is missing: sudo apt-get install redis-server" >&2
  exit 1
fi
exec .venv/bin/python -m pytest "$@"
