"""Sample clients for shadowgate's example: ask the router for fraud scores, then report what happened.

Each transaction is scored through the router (which answers from production and mirrors the
candidate's share); OUTCOME_DELAY seconds later its outcome (fraud: 1, or not: 0) is posted to the
router's /outcomes by the X-Request-Id the router returned, as a bank's case system would once the
transaction settles. Stdlib only.

    python traffic.py --router http://fraud-detector-router --token "$OUTCOME_TOKEN" --rate 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from typing import Any

from model_server import fraud_probability


def call(url: str, document: Any, headers: dict[str, str], timeout: float = 10.0) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(
        url, data=json.dumps(document).encode(), headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default=os.environ.get("ROUTER_URL", "http://fraud-detector-router"))
    parser.add_argument("--token", default=os.environ.get("OUTCOME_TOKEN", ""), help="the outcome token")
    parser.add_argument("--model", default=os.environ.get("MODEL_NAME", "fraud"))
    parser.add_argument("--rate", type=float, default=float(os.environ.get("RATE", "20")), help="requests/s")
    parser.add_argument("--outcome-delay", type=float, default=float(os.environ.get("OUTCOME_DELAY", "2")))
    parser.add_argument("--duration", type=float, default=0.0, help="seconds to run (0: until stopped)")
    # The analysis judges accounts, not requests, when stickyHeader groups them: enough distinct accounts
    # must reach the candidate's share (some hundreds for log loss's skew) for a step to be judged.
    parser.add_argument("--accounts", type=int, default=50_000, help="distinct X-Account-Id values")
    args = parser.parse_args(argv)

    infer = f"{args.router.rstrip('/')}/v2/models/{args.model}/infer"
    outcomes_url = f"{args.router.rstrip('/')}/outcomes"
    auth = {"Authorization": f"Bearer {args.token}"}
    waiting: deque[tuple[float, str, float]] = deque()  # (due, request id, outcome)
    sent = failed = reported = 0
    started = last_report = time.monotonic()
    while not args.duration or time.monotonic() - started < args.duration:
        tick = time.monotonic()
        features = [random.gauss(0.0, 1.0) for _ in range(3)]
        account = f"acct-{random.randrange(args.accounts)}"
        document = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP64", "data": features}]}
        try:
            status, headers = call(infer, document, {"X-Account-Id": account})
        except OSError as exc:  # the router is not up yet, or restarting
            status, headers = 0, {}
            print(f"router unreachable: {exc}", file=sys.stderr, flush=True)
            time.sleep(1.0)
        request_id = headers.get("X-Request-Id") or headers.get("x-request-id")
        if status == 200 and request_id:
            sent += 1
            fraud = 1.0 if random.random() < fraud_probability(features) else 0.0
            waiting.append((tick + args.outcome_delay, request_id, fraud))
        else:
            failed += 1
        due = []
        while waiting and waiting[0][0] <= tick:
            _, request_id, fraud = waiting.popleft()
            due.append({"request_id": request_id, "outcome": fraud})
        if due:
            try:
                status, _ = call(outcomes_url, due, auth)
                reported += len(due) if status < 300 else 0
                if status >= 300:
                    print(f"outcomes refused: HTTP {status}", file=sys.stderr, flush=True)
            except OSError as exc:
                print(f"outcomes not delivered: {exc}", file=sys.stderr, flush=True)
        if tick - last_report >= 10:
            print(f"scored {sent}, failed {failed}, outcomes reported {reported}", flush=True)
            last_report = tick
        time.sleep(max(0.0, 1.0 / args.rate - (time.monotonic() - tick)))
    print(f"scored {sent}, failed {failed}, outcomes reported {reported}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
