"""What psycopg spends in Python turning one insert batch of the event store into
parameters: the text parameter format (`%s`, the baseline), psycopg's binary one (`%b`
with lists, dumped element by element), and the arrays `store/pg_arrays.py` packs whole
per batch (`%b`, what `store/pg_recorder.py` sends). The statement is the recorder's own shape, four
arrays of plain types unnested into rows; the batch is events of the sizes the scheduler
writes. Both statements are first run once against PostgreSQL and their rows compared
with what was sent, so the two formats are shown to carry the same values.

    python -m bench pg_params [--events N] [--state-bytes B] [--rounds R]

Reports microseconds per event (median of R rounds of conversion, packing included for the
packed arrays) and the ratio of the text format to what the recorder sends.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid

from bench.common import median, ratio
from bench.lifecycle import DEFAULT_URL

QUERY = "SELECT * FROM unnest({f}::uuid[], {f}::bigint[], {f}::text[], {f}::bytea[])"


def _packed(params: tuple) -> tuple:
    from store import pg_arrays

    ids, versions, topics, states = params
    return (pg_arrays.uuid_array(ids), pg_arrays.int8_array(versions), pg_arrays.text_array(topics),
            pg_arrays.bytea_array(states))


def _convert_us_per_event(conn, fmt: str, params: tuple, events: int, rounds: int, packed: bool = False) -> float:
    from psycopg._queries import PostgresQuery

    from store import pg_arrays

    query = QUERY.format(f=fmt)
    cur = conn.cursor()
    if packed:
        pg_arrays.register(cur.adapters)
    rows = cur.execute(query, _packed(params) if packed else params).fetchall()
    assert [tuple(r) for r in rows] == list(zip(*params, strict=True)), f"{fmt}: rows differ from what was sent"
    pq = PostgresQuery(cur._tx)  # the transformer psycopg's execute uses
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(100):
            pq.convert(query, _packed(params) if packed else params)
        samples.append((time.perf_counter() - t) / 100 / events * 1e6)
    return median(samples)


def main(argv: list[str]) -> dict:
    import psycopg

    ap = argparse.ArgumentParser(prog="python -m bench pg_params")
    ap.add_argument("--events", type=int, default=60, help="events per insert batch")
    ap.add_argument("--state-bytes", type=int, default=300, help="bytes of encoded state per event")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    n = args.events
    params = ([uuid.uuid4() for _ in range(n)], list(range(1, n + 1)),
              ["scheduler.jobs:Job.Assigned"] * n, [os.urandom(args.state_bytes) for _ in range(n)])
    url = os.environ.get("COORDINATOR_DATABASE_URL") or DEFAULT_URL
    with psycopg.connect(url, autocommit=True) as conn:
        text_us = _convert_us_per_event(conn, "%s", params, n, args.rounds)
        binary_us = _convert_us_per_event(conn, "%b", params, n, args.rounds)
        packed_us = _convert_us_per_event(conn, "%b", params, n, args.rounds, packed=True)
    print(f"insert parameters, {n} events of {args.state_bytes} bytes: text format {text_us:.2f} us per event, "
          f"binary lists {binary_us:.2f} us ({ratio(text_us, binary_us)}x less), "
          f"packed arrays {packed_us:.2f} us ({ratio(text_us, packed_us)}x less; {ratio(binary_us, packed_us)}x "
          f"less than binary lists)")
    return {"bench": "pg_params", "packed_us_per_event": round(packed_us, 3),
            "binary_lists_us_per_event": round(binary_us, 3), "baseline_text_us_per_event": round(text_us, 3),
            "ratio": ratio(text_us, packed_us), "packed_vs_binary_lists": ratio(binary_us, packed_us), "events": n}
