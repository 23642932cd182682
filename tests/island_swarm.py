"""N raw Islands in one process (the fault matrix's "100 Islands killed at once"): each
connects over the real WebSocket channel, accepts every offer, and either streams output
forever (even-numbered Islands: mid-stream when killed) or streams nothing (odd: re-queued).

    python -m tests.island_swarm URL TOKENS_FILE        # prints "ready N" once all are welcomed
"""

from __future__ import annotations

import sys
import threading
import time

from tests.island_harness import RawIsland

CAPS = {"cargos": ["llm-chat-lite"], "models": ["tinyllama-1.1b-chat", "qwen2.5-0.5b-instruct"], "ram_mb": 16_000,
        "slots": 4}


def serve_one(isl: RawIsland, streams: bool) -> None:
    p = isl.p
    seqs: dict[str, int] = {}
    while True:
        msg = isl.inbox.get()
        if msg is None:
            return
        if isinstance(msg, p.Offer):
            isl.send(p.Accept(job_id=msg.job_id))
            if streams:
                seqs[msg.job_id] = 0

                def pump(job_id: str) -> None:
                    while True:
                        seqs[job_id] += 1
                        try:
                            isl.send(p.Output(job_id=job_id, seq=seqs[job_id], tokens=["tok"]))
                        except Exception:  # noqa: BLE001
                            return
                        time.sleep(0.2)

                threading.Thread(target=pump, args=(msg.job_id,), daemon=True).start()


def main() -> int:
    url, path = sys.argv[1], sys.argv[2]
    tokens = [t.strip() for t in open(path) if t.strip()]
    islands = []
    for i, token in enumerate(tokens):
        isl = RawIsland(url, token, caps=CAPS, heartbeat_s=0.5)
        islands.append(isl)
        threading.Thread(target=serve_one, args=(isl, i % 2 == 0), daemon=True).start()
    print(f"ready {len(islands)}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
