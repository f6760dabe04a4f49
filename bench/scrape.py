#!/usr/bin/env python3
"""The cost of a Prometheus scrape with many queues (standard library only).

  scrape.py --api URL --metrics URL [--queues N] [--scrapes K] [--vhost NAME] [--label NAME]

Through the management API at --api (guest/guest) it creates --vhost, gives guest every
permission there and declares --queues durable classic queues in it (one message published
to every tenth, so the ready figures are not all zero). It waits until the Prometheus endpoint
at --metrics (a base URL such as http://127.0.0.1:15692) reports them, then times --scrapes
GETs of /metrics and of /metrics/per-object, one after another, and prints one JSON object:
for each endpoint the median, p90 and max time in milliseconds and the body size in bytes.
The vhost (and with it the queues) is deleted at the end, also on failure. Loopback only.
"""

import argparse
import base64
import http.client
import json
import statistics
import sys
import time
import urllib.parse


class Api:
    def __init__(self, base):
        u = urllib.parse.urlsplit(base)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            sys.exit(f"scrape.py: {base} is not a loopback address")
        self.host, self.port = u.hostname, u.port or 80
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        token = base64.b64encode(b"guest:guest").decode()
        self.headers = {"authorization": f"Basic {token}", "content-type": "application/json"}

    def call(self, method, path, body=None, ok=(200, 201, 204)):
        data = None if body is None else json.dumps(body)
        for attempt in range(2):
            try:
                self.conn.request(method, path, data, self.headers)
                r = self.conn.getresponse()
                text = r.read()
                break
            except (http.client.HTTPException, OSError):
                if attempt:
                    raise
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        if r.status not in ok:
            raise RuntimeError(f"{method} {path}: {r.status} {text[:200]!r}")
        return json.loads(text) if text else None


def get(base, path):
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=120)
    start = time.perf_counter()
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    took = (time.perf_counter() - start) * 1000
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"GET {path}: {r.status}")
    return took, body


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--queues", type=int, default=10000)
    p.add_argument("--scrapes", type=int, default=10)
    p.add_argument("--vhost", default="scrape-bench")
    p.add_argument("--label", default="")
    a = p.parse_args()
    if not (1 <= a.queues <= 100000 and 1 <= a.scrapes <= 1000):
        sys.exit("scrape.py: --queues must be 1..100000 and --scrapes 1..1000")
    api = Api(a.api)
    vh = urllib.parse.quote(a.vhost, safe="")
    api.call("PUT", f"/api/vhosts/{vh}", {})
    try:
        api.call("PUT", f"/api/permissions/{vh}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
        start = time.perf_counter()
        for i in range(a.queues):
            name = f"scrape.queue.{i:05d}"
            api.call("PUT", f"/api/queues/{vh}/{name}", {"durable": True})
            if i % 10 == 0:
                api.call(
                    "POST",
                    f"/api/exchanges/{vh}/amq.default/publish",
                    {"properties": {}, "routing_key": name, "payload": "x", "payload_encoding": "string"},
                )
        declared_s = time.perf_counter() - start
        # Both brokers may publish their figures with a delay: wait until the count shows.
        deadline = time.time() + 120
        while True:
            _, body = get(a.metrics, "/metrics")
            seen = [l for l in body.decode().splitlines() if l.startswith("rabbitmq_queues ")]
            if seen and float(seen[0].split()[1]) >= a.queues:
                break
            if time.time() > deadline:
                raise RuntimeError(f"/metrics never showed {a.queues} queues: {seen}")
            time.sleep(0.5)
        out = {"label": a.label, "queues": a.queues, "declare_seconds": round(declared_s, 2)}
        for path in ("/metrics", "/metrics/per-object"):
            times, size = [], 0
            for _ in range(a.scrapes):
                took, body = get(a.metrics, path)
                times.append(took)
                size = len(body)
            times.sort()
            out[path] = {
                "median_ms": round(statistics.median(times), 2),
                "p90_ms": round(times[min(len(times) - 1, int(len(times) * 0.9))], 2),
                "max_ms": round(times[-1], 2),
                "bytes": size,
            }
        print(json.dumps(out))
    finally:
        api.call("DELETE", f"/api/vhosts/{vh}", ok=(200, 204, 404))


if __name__ == "__main__":
    main()
