"""In-process measurements: ledger latency next to PING, Redis memory per entry, enqueue cost.

All of them run in the driver against the benchmark's own redis-servers while no worker runs.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from polyv_sms.ledger import Ledger, Settlement, connect_redis

APP_ID_LEDGER = "benchledger"
TEMPLATE_NAMES = ["code"]
TEMPLATE_VALUES = ["123456"]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def make_ledger(url: str) -> Ledger:
    """A ledger with the worker's defaults, limits high enough never to refuse."""
    return Ledger(
        connect_redis(url),
        APP_ID_LEDGER,
        phone_daily_limit=10**6,
        account_daily_limit=10**9,
        max_attempts=5,
        receipt_ttl_days=30,
        timezone="Asia/Shanghai",
        lease_s=27.0,
        reconcile_grace_s=120.0,
    )


class _Numbers:
    def __init__(self) -> None:
        self.next = 15_000_000_000

    def take(self, count: int) -> list[str]:
        start = self.next
        self.next += count
        return [str(n) for n in range(start, start + count)]


def _one_message(ledger: Ledger, numbers: list[str], serial: int) -> tuple[float, float, str]:
    """reserve + settle (all accepted) of one message, as the dispatcher calls them."""
    message_id = uuid.uuid4().hex
    token = uuid.uuid4().hex
    meta = {
        "task_id": message_id,
        "phone_numbers": numbers,
        "template_param_names": TEMPLATE_NAMES,
        "template_param_values": TEMPLATE_VALUES,
        "created_at": round(time.time(), 3),
    }
    started = time.perf_counter()
    reservation = ledger.reserve(message_id, numbers, (), token=token, meta=meta)
    reserved = time.perf_counter()
    items = [Settlement(n, "accepted", 12, f"{serial + i:018d}^0") for i, n in enumerate(numbers)]
    days = {s.number: s.day for s in reservation.states}
    before_settle = time.perf_counter()
    ledger.settle(message_id, items, days=days, token=token, retry_at=time.time())
    settled = time.perf_counter()
    return reserved - started, settled - before_settle, message_id


def ledger_latency(
    url: str, sizes: tuple[int, ...], iterations: int, *, verbose: bool = True
) -> dict[str, Any]:
    """Median ``reserve`` + ``settle`` latency per message size, next to PING and to an
    EVALSHA that only receives the same arguments (the transport floor), alternated."""
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    ledger = make_ledger(url)
    numbers = _Numbers()
    noop = ledger.redis.register_script("return 1")
    serial = 0
    out: dict[str, Any] = {"iterations": iterations, "sizes": {}}
    for size in sizes:
        pings: list[float] = []
        noops: list[float] = []
        reserves: list[float] = []
        settles: list[float] = []
        totals: list[float] = []
        for i in range(iterations + 20):
            batch = numbers.take(size)
            ping_times = []
            for _ in range(3):
                started = time.perf_counter()
                ledger.redis.ping()
                ping_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            noop(keys=["a", "b", "c"], args=[*range(14), *batch])
            nooped = time.perf_counter()
            reserve_s, settle_s, _ = _one_message(ledger, batch, serial)
            serial += size
            if i >= 20:  # warm-up: connection, script cache, allocator
                pings += ping_times
                noops.append(nooped - started)
                reserves.append(reserve_s)
                settles.append(settle_s)
                totals.append(reserve_s + settle_s)
        client.config_resetstat()
        for _ in range(iterations):
            _one_message(ledger, numbers.take(size), serial)
            serial += size
        stats = client.info("commandstats")
        server_us = stats.get("cmdstat_evalsha", {}).get("usec", 0)
        inside = {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if name not in ("cmdstat_evalsha", "cmdstat_info")
            and not name.startswith("cmdstat_config")
        }
        ping_us = statistics.median(pings) * 1e6
        row = {
            "ping_us": ping_us,
            "noop_evalsha_same_args_us": statistics.median(noops) * 1e6,
            "reserve_us": statistics.median(reserves) * 1e6,
            "settle_us": statistics.median(settles) * 1e6,
            "reserve_settle_us": statistics.median(totals) * 1e6,
            "reserve_settle_p90_us": _quantile(totals, 0.9) * 1e6,
            "server_us_per_message": server_us / iterations,
            "commands_in_scripts_per_message": sum(inside.values()) / iterations,
            "commands_in_scripts_by_name": {k: v / iterations for k, v in sorted(inside.items())},
            "ratio_to_ping": statistics.median(totals) * 1e6 / ping_us,
        }
        out["sizes"][str(size)] = row
        if verbose:
            print(
                f"  ledger {size:>3} numbers: reserve+settle {row['reserve_settle_us']:7.0f} us "
                f"(server {row['server_us_per_message']:.0f} us, "
                f"{row['commands_in_scripts_per_message']:.0f} commands), PING {ping_us:.0f} us, "
                f"x{row['ratio_to_ping']:.1f}",
                flush=True,
            )
    ledger.redis.close()
    client.flushdb()
    client.close()
    return out


def memory(url: str, sizes: tuple[int, ...], messages: int = 50) -> dict[str, Any]:
    """``MEMORY USAGE`` of the keys one accepted message leaves, per number and per receipt."""
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    ledger = make_ledger(url)
    numbers = _Numbers()
    keys = ledger.keys
    out: dict[str, Any] = {}
    serial = 0
    for size in sizes:
        client.flushdb()
        last: tuple[str, list[str]] = ("", [])
        for _ in range(messages):
            batch = numbers.take(size)
            _, _, message_id = _one_message(ledger, batch, serial)
            serial += size
            last = (message_id, batch)
        message_id, batch = last
        msg_key = keys.message(message_id)
        receipts_key = next(client.scan_iter(keys.base + "receipts:*"))
        phones_key = next(client.scan_iter(keys.base + "phones:*"))
        quota_key = next(client.scan_iter(keys.base + "quota:*"))

        def usage(key: str) -> int:
            return int(client.memory_usage(key, samples=0) or 0)

        quota_fields = int(client.hlen(quota_key))
        msg_bytes = usage(msg_key)
        receipt = usage(receipts_key) / int(client.hlen(receipts_key))
        phone = usage(phones_key) / int(client.hlen(phones_key))
        quota_per_number = usage(quota_key) / quota_fields
        per_number_msg = msg_bytes / size
        out[str(size)] = {
            "message_hash_bytes": msg_bytes,
            "message_hash_encoding": client.object("encoding", msg_key),
            "message_hash_per_number": per_number_msg,
            "receipt_bytes": receipt,
            "receipts_hash_fields": int(client.hlen(receipts_key)),
            "phone_index_bytes": phone,
            "quota_hash_per_number": quota_per_number,
            "quota_hash_fields": quota_fields,
            "per_accepted_number": per_number_msg + receipt + phone + quota_per_number,
            "used_memory_per_number": client.info("memory")["used_memory"] / (messages * size),
        }
    ledger.redis.close()
    client.flushdb()
    client.close()
    return out


def enqueue(
    producers: dict[str, Callable[[list[str]], Any]],
    sizes: tuple[int, ...],
    batch: int,
    pairs: int,
    *,
    verbose: bool = True,
) -> dict[str, Any]:
    """``delay`` calls per second of each producer, alternating batches (AB, BA, ...)."""
    numbers = _Numbers()
    out: dict[str, Any] = {}
    names = list(producers)
    for size in sizes:
        rates: dict[str, list[float]] = {name: [] for name in names}
        for name in names:  # warm-up: connections, declarations, result subscriptions
            for _ in range(50):
                producers[name](numbers.take(size))
        for pair in range(pairs):
            order = names if pair % 2 == 0 else names[::-1]
            for name in order:
                messages = [numbers.take(size) for _ in range(batch)]
                started = time.perf_counter()
                for phone_numbers in messages:
                    producers[name](phone_numbers)
                rates[name].append(batch / (time.perf_counter() - started))
        project, baseline = rates["project"], rates["baseline"]
        ratios = [p / b for p, b in zip(project, baseline, strict=True)]
        out[str(size)] = {
            "project_calls_s": statistics.median(project),
            "baseline_calls_s": statistics.median(baseline),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
        }
        if verbose:
            row = out[str(size)]
            print(
                f"  enqueue {size:>3} numbers: send_sms.delay {row['project_calls_s']:7.0f}/s, "
                f"bare delay {row['baseline_calls_s']:7.0f}/s, ratio {row['ratio']:.2f}",
                flush=True,
            )
    return out
