#!/usr/bin/env python3
"""Helper for bench/compare.sh (standard library only).

  compare.py cleanup --port P [--host H] [--queue NAME]... [--exchange NAME]...
      Connects over AMQP 0-9-1 (guest/guest, vhost /), checks each named queue and exchange
      with a passive declare and deletes any that exists. Prints one line per leftover and
      exits 0 when nothing was left, 3 when something was left (and deleted), 1 on error.

  compare.py report --runs DIR --command 'S1 CMDLINE'... [--note TEXT]... [--out FILE] ...
      Reads DIR/<scenario>.<broker>.<round>.json (warren-perf --json output) and .rc (its exit
      status) and writes the markdown report: medians per scenario and broker, the ratio
      Warren/RabbitMQ, every run, the command lines. A run that exited non-zero counts as n/a.
"""

import argparse
import json
import os
import socket
import statistics
import struct
import sys

# ---------------------------------------------------------------------------------------------
# A minimal AMQP 0-9-1 client: enough to declare passively and delete.


class ChannelClosed(Exception):
    def __init__(self, code, text):
        super().__init__(f"{code} {text}")
        self.code = code


def shortstr(s):
    b = s.encode()
    return bytes([len(b)]) + b


def longstr(b):
    return struct.pack(">I", len(b)) + b


EMPTY_TABLE = struct.pack(">I", 0)


class Amqp:
    def __init__(self, host, port, user, password, vhost, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.sock.sendall(b"AMQP\x00\x00\x09\x01")
        self.expect(0, 10, 10)  # connection.start
        response = b"\x00" + user.encode() + b"\x00" + password.encode()
        self.method(0, 10, 11, EMPTY_TABLE + shortstr("PLAIN") + longstr(response) + shortstr("en_US"))
        tune = self.expect(0, 10, 30)
        channel_max, frame_max, _ = struct.unpack(">HIH", tune[:8])
        self.method(0, 10, 31, struct.pack(">HIH", channel_max, frame_max, 0))
        self.method(0, 10, 40, shortstr(vhost) + shortstr("") + b"\x00")
        self.expect(0, 10, 41)
        self.next_channel = 1

    def method(self, channel, class_id, method_id, args):
        payload = struct.pack(">HH", class_id, method_id) + args
        self.sock.sendall(struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce")

    def frame(self):
        while True:
            if len(self.buf) >= 7:
                kind, channel, size = struct.unpack(">BHI", self.buf[:7])
                if len(self.buf) >= 8 + size:
                    payload = self.buf[7 : 7 + size]
                    if self.buf[7 + size] != 0xCE:
                        raise RuntimeError("bad frame end")
                    self.buf = self.buf[8 + size :]
                    return kind, channel, payload
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("connection closed by the broker")
            self.buf += data

    def expect(self, channel, class_id, method_id):
        while True:
            kind, ch, payload = self.frame()
            if kind != 1:
                continue  # heartbeats, stray content
            cid, mid = struct.unpack(">HH", payload[:4])
            if (cid, mid) == (class_id, method_id) and ch == channel:
                return payload[4:]
            if (cid, mid) in ((20, 40), (10, 50)):
                code = struct.unpack(">H", payload[4:6])[0]
                text = payload[7 : 7 + payload[6]].decode(errors="replace")
                if cid == 20:
                    self.method(ch, 20, 41, b"")
                    if ch == channel:
                        raise ChannelClosed(code, text)
                    continue
                raise RuntimeError(f"connection closed: {code} {text}")

    def channel(self):
        ch = self.next_channel
        self.next_channel += 1
        self.method(ch, 20, 10, shortstr(""))
        self.expect(ch, 20, 11)
        return ch

    def close_channel(self, ch):
        self.method(ch, 20, 40, struct.pack(">H", 200) + shortstr("") + struct.pack(">HH", 0, 0))
        self.expect(ch, 20, 41)

    def queue_leftover(self, name):
        """None if the queue does not exist, else (messages, consumers) and it is deleted."""
        ch = self.channel()
        # queue.declare: ticket, queue, bits (passive), arguments
        self.method(ch, 50, 10, struct.pack(">H", 0) + shortstr(name) + b"\x01" + EMPTY_TABLE)
        try:
            ok = self.expect(ch, 50, 11)
        except ChannelClosed as e:
            if e.code == 404:
                return None
            raise
        at = 1 + ok[0]
        messages, consumers = struct.unpack(">II", ok[at : at + 8])
        self.method(ch, 50, 40, struct.pack(">H", 0) + shortstr(name) + b"\x00")  # queue.delete
        self.expect(ch, 50, 41)
        self.close_channel(ch)
        return messages, consumers

    def exchange_leftover(self, name):
        """False if the exchange does not exist, else True and it is deleted."""
        ch = self.channel()
        # exchange.declare: ticket, exchange, type, bits (passive), arguments
        self.method(ch, 40, 10, struct.pack(">H", 0) + shortstr(name) + shortstr("") + b"\x01" + EMPTY_TABLE)
        try:
            self.expect(ch, 40, 11)
        except ChannelClosed as e:
            if e.code == 404:
                return False
            raise
        self.method(ch, 40, 20, struct.pack(">H", 0) + shortstr(name) + b"\x00")  # exchange.delete
        self.expect(ch, 40, 21)
        self.close_channel(ch)
        return True

    def close(self):
        self.method(0, 10, 50, struct.pack(">H", 200) + shortstr("bye") + struct.pack(">HH", 0, 0))
        try:
            self.expect(0, 10, 51)
        finally:
            self.sock.close()


def cleanup(args):
    try:
        conn = Amqp(args.host, args.port, args.user, args.password, args.vhost, args.timeout)
        left = 0
        for q in args.queue:
            found = conn.queue_leftover(q)
            if found is not None:
                left += 1
                print(f"leftover queue {q!r} ({found[0]} messages, {found[1]} consumers): deleted")
        for x in args.exchange:
            if conn.exchange_leftover(x):
                left += 1
                print(f"leftover exchange {x!r}: deleted")
        conn.close()
    except (OSError, RuntimeError, ChannelClosed, struct.error) as e:
        print(f"cleanup on port {args.port} failed: {e}", file=sys.stderr)
        return 1
    return 3 if left else 0


# ---------------------------------------------------------------------------------------------
# The report.

BROKERS = [("rabbitmq", "RabbitMQ"), ("warren", "Warren")]

# scenario -> [(label, extractor, higher_is_better)]
FIGURES = {
    "S1": [("received msg/s", lambda s: s["received_rate"], True)],
    "S2": [
        ("confirmed msg/s", lambda s: s["confirmed_rate"], True),
        ("received msg/s", lambda s: s["received_rate"], True),
    ],
    "S3": [
        ("latency p50 µs", lambda s: s["latency_us"]["median"], False),
        ("latency p99 µs", lambda s: s["latency_us"]["p99"], False),
        ("received msg/s", lambda s: s["received_rate"], True),
    ],
    "S4": [("received msg/s", lambda s: s["received_rate"], True)],
    "S5": [("received msg/s (all 20 queues)", lambda s: s["received_rate"], True)],
    "S6": [
        ("publish msg/s", lambda s: s["publish_phase"]["rate"], True),
        ("drain msg/s", lambda s: s["drain_phase"]["rate"], True),
    ],
    "P10": [
        ("confirmed msg/s", lambda s: s["confirmed_rate"], True),
        ("received msg/s", lambda s: s["received_rate"], True),
    ],
}

# Scenarios whose runs also counted the broker's fsync/fdatasync calls (`<run>.syncs`).
SYNCED = {"S2", "P10"}


def load_syncs(runs, sc, key, r):
    """fsync + fdatasync calls per second of a run, from `perf stat -x,` output."""
    base = os.path.join(runs, f"{sc}.{key}.{r}")
    summary = load_run(runs, sc, key, r)
    try:
        with open(base + ".syncs", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        cells = line.split(",")
        if len(cells) > 2 and cells[0].strip().isdigit():
            total += int(cells[0])
    if not summary or not summary.get("duration_s"):
        return None
    return total / float(summary["duration_s"])


def load_summary(path):
    """The summary object of a warren-perf --json run, or None."""
    summary = None
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if obj.get("type") == "summary":
                    summary = obj
    except OSError:
        return None
    return summary


def fmt(v):
    return "n/a" if v is None else f"{v:,.0f}"


def load_run(runs, sc, key, r):
    """The summary of a run that exited 0, or None."""
    base = os.path.join(runs, f"{sc}.{key}.{r}")
    try:
        with open(base + ".rc", encoding="utf-8") as f:
            if f.read().strip() != "0":
                return None
    except OSError:
        return None
    return load_summary(base + ".json")


def figure(summary, extract):
    if summary is None:
        return None
    try:
        v = extract(summary)
    except (KeyError, TypeError):
        return None
    return float(v) if v is not None else None


def report(args):
    commands = dict(c.split(" ", 1) for c in args.command)
    scenarios = list(commands)
    rounds = args.rounds
    meta = vars(args)
    out = []
    w = out.append
    w(f"Date: {meta['date']}  ")
    w(f"Machine: {meta['machine']}  ")
    w(f"RabbitMQ: {meta['rabbitmq']}  ")
    w(f"Warren: {meta['warren']}  ")
    w(
        f"Runs: {rounds} round(s) per scenario, alternating RabbitMQ and Warren; "
        f"`--time {meta['time']}` for S1-S5, {int(meta['s6_messages']):,} messages for S6. "
        "Figures are medians over the rounds."
    )
    w("")
    w("| scenario | figure | RabbitMQ | Warren | Warren / RabbitMQ |")
    w("| --- | --- | ---: | ---: | ---: |")
    details = []
    for sc in scenarios:
        per_broker = {}
        for key, _ in BROKERS:
            per_broker[key] = [load_run(args.runs, sc, key, r) for r in range(1, rounds + 1)]
        for label, extract, higher in FIGURES[sc]:
            med = {}
            for key, _ in BROKERS:
                vals = [figure(s, extract) for s in per_broker[key]]
                ok = [v for v in vals if v is not None]
                med[key] = statistics.median(ok) if ok else None
                details.append(
                    (sc, label, key, ", ".join(fmt(v) for v in vals), len(ok), len(vals))
                )
            ratio = "n/a"
            if med["rabbitmq"] and med["warren"] is not None:
                ratio = f"{med['warren'] / med['rabbitmq']:.2f}"
                if not higher:
                    ratio += " (lower is better)"
            w(f"| {sc} | {label} | {fmt(med['rabbitmq'])} | {fmt(med['warren'])} | {ratio} |")
        if sc in SYNCED:
            med = {}
            for key, _ in BROKERS:
                vals = [load_syncs(args.runs, sc, key, r) for r in range(1, rounds + 1)]
                ok = [v for v in vals if v is not None]
                med[key] = statistics.median(ok) if ok else None
            if med["rabbitmq"] is not None or med["warren"] is not None:
                w(f"| {sc} | fsync+fdatasync calls/s | {fmt(med['rabbitmq'])} | {fmt(med['warren'])} | |")
    w("")
    w("Every run (in round order):")
    w("")
    w("| scenario | figure | broker | runs | ok |")
    w("| --- | --- | --- | --- | ---: |")
    names = dict(BROKERS)
    for sc, label, key, vals, ok, total in details:
        w(f"| {sc} | {label} | {names[key]} | {vals} | {ok}/{total} |")
    w("")
    w("warren-perf's own CPU use (median % of one core), to spot a client-bound run:")
    w("")
    w("| scenario | RabbitMQ | Warren |")
    w("| --- | ---: | ---: |")
    for sc in scenarios:
        cells = []
        for key, _ in BROKERS:
            cpus = []
            for r in range(1, rounds + 1):
                s = load_run(args.runs, sc, key, r)
                if s and s.get("cpu_percent") is not None:
                    cpus.append(float(s["cpu_percent"]))
            cells.append(f"{statistics.median(cpus):.0f}%" if cpus else "n/a")
        w(f"| {sc} | {cells[0]} | {cells[1]} |")
    w("")
    w("Command lines (`$URI` is `amqp://guest:guest@127.0.0.1:<port>/%2f` of the broker under test):")
    w("")
    w("```sh")
    w(f"P={meta['perf']}")
    for sc in scenarios:
        w(commands[sc])
    w("```")
    notes = args.note
    if notes:
        w("")
        w("Notes from the run:")
        w("")
        for n in notes:
            w(f"- {n}")
    text = "\n".join(out) + "\n"
    if args.out and args.out != "-":
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cleanup")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--user", default="guest")
    c.add_argument("--password", default="guest")
    c.add_argument("--vhost", default="/")
    c.add_argument("--timeout", type=float, default=30.0)
    c.add_argument("--queue", action="append", default=[])
    c.add_argument("--exchange", action="append", default=[])
    r = sub.add_parser("report")
    r.add_argument("--runs", required=True)
    r.add_argument("--rounds", type=int, required=True)
    r.add_argument("--time", required=True)
    r.add_argument("--s6-messages", dest="s6_messages", required=True)
    r.add_argument("--date", required=True)
    r.add_argument("--machine", required=True)
    r.add_argument("--rabbitmq", required=True)
    r.add_argument("--warren", required=True)
    r.add_argument("--perf", required=True)
    r.add_argument("--command", action="append", required=True, help="'S1 the command line'")
    r.add_argument("--note", action="append", default=[])
    r.add_argument("--out", default="-")
    a = p.parse_args()
    return cleanup(a) if a.cmd == "cleanup" else report(a)


if __name__ == "__main__":
    sys.exit(main())
