"""CPU per request of the Polyv client, next to the bare task's ``Session.post``, in process.

``python -m benchmarks.client_cpu [--sends 2000] [--rounds 3] [--threads 1]``: the simulator
runs in a process of its own (``benchmarks.simserver``), so the numbers are this process's CPU
per 1-number send (``time.process_time``, every thread; the deadline's watchdog included),
alternating the two sides round by round. ``--tree PATH`` measures the client of another
source tree (e.g. ``git archive``d from an earlier commit) for before/after numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

from .harness import free_port

APP_ID, SECRET, NUMBER = "benchcpu", "benchcpu-secret", "13800138000"


def _cpu_per_call(call: Callable[[], object], sends: int, threads: int) -> float:
    def work() -> None:
        for _ in range(sends // threads):
            call()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    started = time.process_time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return (time.process_time() - started) / (sends // threads * threads)


def main() -> None:
    """Print the CPU per send of each side, per round, in microseconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=2000, help="sends per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="sending threads")
    parser.add_argument("--tree", type=Path, help="measure the client of this source tree")
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, str(args.tree.resolve()))
    from polyv_sms.polyv import client as client_module
    from polyv_sms.polyv.signing import sign

    print(f"client: {client_module.__file__}")
    port = free_port()
    env = dict(
        os.environ, BENCH_SIM_APP_ID=APP_ID, BENCH_SIM_SECRET=SECRET, BENCH_SIM_PORT=str(port)
    )
    simulator = subprocess.Popen([sys.executable, "-m", "benchmarks.simserver"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        client = client_module.PolyvClient(APP_ID, SECRET, base, 10.0)
        session = requests.Session()  # the bare task's call (benchmarks/baseline.py)
        body = {"phoneNumbers": [NUMBER], "templateParamNames": ["c"], "templateParamValues": ["1"]}

        def ours() -> object:
            return client.send([NUMBER], ["c"], ["1"])

        def bare() -> object:
            params = {"appId": APP_ID, "timestamp": str(int(time.time() * 1000))}
            params["sign"] = sign(params, SECRET)
            url = base + "/live/v4/user/sms/send"
            return session.post(url, params=params, json=body, timeout=(10, 10)).json()

        deadline = time.monotonic() + 10
        while True:  # wait for the simulator
            try:
                ours()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        results: dict[str, list[float]] = {"client": [], "bare Session.post": []}
        for _ in range(args.rounds):
            for name, call in (("client", ours), ("bare Session.post", bare)):
                _cpu_per_call(call, 200, args.threads)  # warm
                results[name].append(_cpu_per_call(call, args.sends, args.threads))
        print(json.dumps({k: [round(v * 1e6) for v in vs] for k, vs in results.items()}))
        for name, values in results.items():
            print(f"{name}: {min(values) * 1e6:.0f} us CPU per send (best of {args.rounds})")
    finally:
        simulator.terminate()
        simulator.wait()


if __name__ == "__main__":
    main()
