#!/usr/bin/env bash
# Install polyv-sms into .venv and run the embedded demo: an in-process Redis stand-in, the
# Polyv simulator and a real worker, sending real tasks end to end. No Redis, no credentials.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[demo]'
exec .venv/bin/polyv-sms demo "$@"
