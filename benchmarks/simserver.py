"""Serve :class:`polyv_sms.polyv.simulator.PolyvSimulator` in its own process for a benchmark run.

Reads ``BENCH_SIM_APP_ID``, ``BENCH_SIM_SECRET`` and ``BENCH_SIM_PORT``. The daily limits are
set far above anything a run sends, so that every answer is status 12 unless faults are set.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType

from polyv_sms.polyv.simulator import PolyvSimulator

UNLIMITED = 10**12


def main() -> None:
    """Serve until SIGTERM."""
    simulator = PolyvSimulator(
        os.environ["BENCH_SIM_APP_ID"],
        os.environ["BENCH_SIM_SECRET"],
        port=int(os.environ["BENCH_SIM_PORT"]),
        phone_daily_limit=UNLIMITED,
        account_daily_limit=UNLIMITED,
    )

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        simulator.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
