#!/usr/bin/env bash
# Install the test dependencies into .venv and run the whole test suite.
# The tests start their own redis-server, simulator, workers and supervisord.
#
# Without arguments the suite runs as two pytest processes side by side, each with a
# redis-server of its own (tests/conftest.py): the files in `waiting`, which mostly sleep
# through outages, leases, restarts and failovers and check outcomes (sent once, nothing lost),
# beside everything else; then, alone, the files in `alone`, which measure retry delays to
# a tenth of a second (another pytest's load stretches them). About 8 minutes on a 2-core
# machine instead of 13. With arguments, one pytest gets them as they are:
# ./scripts/test.sh tests/test_cli.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[test]'
if ! command -v redis-server >/dev/null; then
  echo "redis-server is missing: sudo apt-get install redis-server" >&2
  exit 1
fi
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi

waiting=(
  tests/reliability/test_answers_kept.py
  tests/reliability/test_redis_restart.py
  tests/reliability/test_worker_crash.py
  tests/reliability/test_secrets.py
  tests/reliability/test_journal.py
  tests/reliability/test_unpublished_retry.py
  tests/ha/test_ha.py
  tests/test_deploy.py
)
alone=(tests/reliability/test_polyv_faults.py)
waiting_log="$(mktemp)"
trap 'rm -f "$waiting_log"' EXIT
.venv/bin/python -m pytest "${waiting[@]}" >"$waiting_log" 2>&1 &
waiting_pid=$!
status=0
.venv/bin/python -m pytest $(printf -- '--ignore=%s ' "${waiting[@]}" "${alone[@]}") || status=$?
waiting_status=0
wait "$waiting_pid" || waiting_status=$?
echo
echo "=== run beside the above: ${waiting[*]} ==="
cat "$waiting_log"
echo
echo "=== then alone: ${alone[*]} ==="
alone_status=0
.venv/bin/python -m pytest "${alone[@]}" || alone_status=$?
for code in "$status" "$waiting_status" "$alone_status"; do
  if [ "$code" -ne 0 ]; then exit "$code"; fi
done
