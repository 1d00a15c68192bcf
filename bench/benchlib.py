#!/usr/bin/python3
"""Helpers for bench/run: payload files, h2load output parsing, the table.

  benchlib.py payloads DIR BULK_BYTES
      writes DIR/config.req, DIR/execute.req (gRPC-framed Spark Connect
      requests) and DIR/docroot/spark.connect.SparkConnectService/{Config,
      ExecutePlan} (the upstream's gRPC-framed replies); prints the reply
      sizes as JSON
  benchlib.py result --peer P --scenario S --out H2LOAD_OUT [--log LOG]
                     [--rss-kib N] [--expect-body-bytes N]
      one JSON line describing an h2load run (ok or failed, and why)
  benchlib.py failed --peer P --scenario S --note TEXT
      one JSON line for a run that could not happen
  benchlib.py table RESULTS.jsonl --md OUT.md [--meta TEXT]...
      prints the comparison table and writes it, with the details, as Markdown
"""

import argparse
import json
import os
import re
import struct
import sys
import uuid

SERVICE = "spark.connect.SparkConnectService"


# ---- payloads -------------------------------------------------------------

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def ld(num, payload):
    """A length-delimited protobuf field."""
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def grpc_frame(msg):
    return b"\0" + struct.pack(">I", len(msg)) + msg


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def cmd_payloads(args):
    d = args.dir
    session = str(uuid.uuid4()).encode()
    # UserContext{user_id, user_name} as sparkgate forwards it from a listener
    # with "auth": "none": its rewrite then keeps the message length, and with
    # it the content-length h2load sends (gRPC clients send none).
    user = ld(1, b"anonymous") + ld(2, b"anonymous")
    # ConfigRequest{session_id, user_context, operation{get_all{}}, client_type}
    config_req = ld(1, session) + ld(2, user) + ld(3, ld(5, b"")) + ld(4, b"sparkgate-bench")
    # ExecutePlanRequest{session_id, user_context, client_type}: the upstream
    # is a static file server, so the plan itself does not matter.
    execute_req = ld(1, session) + ld(2, user) + ld(4, b"sparkgate-bench")
    # JWT auth is on for sparkgate, as a deployment runs it: an HS256
    # provider and one token for every call (the verified-token cache is
    # part of what is measured; bench/jwt_cost measures a miss).
    import base64, hashlib, hmac, json, time
    secret = os.urandom(32).hex().encode()
    write(os.path.join(d, "jwt.secret"), secret)
    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=")
    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"iss": "bench", "aud": "spark-connect", "sub": "anonymous",
                           "iat": now, "exp": now + 6 * 3600}).encode())
    sig = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    write(os.path.join(d, "jwt.token"), head + b"." + body + b"." + sig)
    write(os.path.join(d, "config.req"), grpc_frame(config_req))
    write(os.path.join(d, "execute.req"), grpc_frame(execute_req))

    svc = os.path.join(d, "docroot", SERVICE)
    os.makedirs(svc, exist_ok=True)
    # ConfigResponse{session_id, pairs{key, value}}
    config_reply = grpc_frame(ld(1, session) + ld(2, ld(1, b"spark.sql.shuffle.partitions") + ld(2, b"200")))
    write(os.path.join(svc, "Config"), config_reply)

    # ExecutePlanResponse{session_id, arrow_batch{row_count, data}} messages
    # of about 64 KiB each, as a result stream is made of.
    body = b"\0" * (64 * 1024 - 64)
    msg = ld(1, session) + ld(2, varint(1 << 3 | 0) + varint(1024) + ld(2, body))
    frame = grpc_frame(msg)
    count = max(1, args.bulk_bytes // len(frame))
    with open(os.path.join(svc, "ExecutePlan"), "wb") as f:
        chunk = frame * 256
        left = count
        while left >= 256:
            f.write(chunk)
            left -= 256
        f.write(frame * left)
    print(json.dumps({"config_reply_bytes": len(config_reply),
                      "execute_reply_bytes": len(frame) * count}))


# ---- h2load output ----------------------------------------------------------

UNIT_US = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def to_us(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    return float(m.group(1)) * UNIT_US[m.group(2)] if m else None


def parse_h2load(text):
    r = {}
    m = re.search(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", text)
    if m:
        r["elapsed_s"] = float(m.group(1)) * UNIT_US[m.group(2)] / 1e6
        r["rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    if m:
        for k, v in zip(("total", "started", "done", "succeeded", "failed", "errored",
                         "timeout"), m.groups()):
            r[k] = int(v)
    m = re.search(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers.*?, .*?\((\d+)\) data", text)
    if m:
        r["data_bytes"] = int(m.group(3))
    for name, key in (("time for connect", "connect"), ("time to 1st byte", "ttfb"),
                      ("time for request", "request")):
        m = re.search(re.escape(name) + r":\s+(\S+)\s+(\S+)\s+(\S+)", text)
        if m:
            r[key + "_min_us"] = to_us(m.group(1))
            r[key + "_max_us"] = to_us(m.group(2))
            r[key + "_mean_us"] = to_us(m.group(3))
    return r


def percentiles(log_path):
    """p50/p99 in ms of the per-request times of `h2load --log-file`
    (tab-separated: start time in us, status, duration in us)."""
    durations = []
    try:
        with open(log_path, encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1].strip().isdigit():
                    durations.append(int(parts[2]))
    except OSError:
        return {}
    if not durations:
        return {}
    durations.sort()

    def pct(p):
        return durations[min(len(durations) - 1, int(p / 100.0 * len(durations)))] / 1000.0

    return {"p50_ms": pct(50), "p99_ms": pct(99), "samples": len(durations)}


def cmd_result(args):
    try:
        with open(args.out, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        text = ""
        args.note = (args.note or "") + " no h2load output: %s" % e
    r = {"peer": args.peer, "scenario": args.scenario}
    r.update(parse_h2load(text))
    if args.log:
        r.update(percentiles(args.log))
    if args.rss_kib:
        r["rss_kib"] = args.rss_kib
    fatal, warnings = [], []
    if "succeeded" not in r:
        fatal.append("h2load printed no result (timed out or could not connect)")
    elif r["succeeded"] == 0:
        fatal.append("0 of %d requests succeeded" % r.get("total", 0))
    else:
        bad = r["failed"] + r["errored"] + r["timeout"]
        if bad:
            # A handful of failures in a timed run (streams cut at the end)
            # is noted; more than 1% makes the figures meaningless.
            (fatal if bad * 100 > r["done"] else warnings).append(
                "%d of %d requests failed" % (bad, r["done"]))
        # h2load counts any HTTP 200 as success; a gRPC error made by the
        # proxy is a 200 without the upstream's body.
        if args.expect_body_bytes:
            want = r["succeeded"] * args.expect_body_bytes
            if r.get("data_bytes", 0) < want:
                fatal.append("got %d response bytes, expected %d (a proxy-made gRPC error?)"
                             % (r.get("data_bytes", 0), want))
    if args.note:
        fatal.append(args.note.strip())
    r["ok"] = not fatal
    if fatal or warnings:
        r["note"] = "; ".join(fatal + warnings)
    if r.get("scenario") == "bulk" and r.get("elapsed_s"):
        r["mbps"] = r.get("data_bytes", 0) / r["elapsed_s"] / 1e6
    if r.get("scenario") == "conns" and r.get("elapsed_s"):
        r["conn_per_s"] = r.get("done", 0) / r["elapsed_s"]
    print(json.dumps(r))


def cmd_failed(args):
    print(json.dumps({"peer": args.peer, "scenario": args.scenario, "ok": False,
                      "note": args.note}))


# ---- table --------------------------------------------------------------------

COLUMNS = [
    # (title, scenario, key, higher_is_better, format)
    ("unary req/s", "unary", "rps", True, "{:.0f}"),
    ("unary p50 ms", "unary", "p50_ms", False, "{:.2f}"),
    ("unary p99 ms", "unary", "p99_ms", False, "{:.2f}"),
    ("stream MB/s", "bulk", "mbps", True, "{:.0f}"),
    ("TLS conns/s", "conns", "conn_per_s", True, "{:.0f}"),
    ("connect mean ms", "conns", "connect_mean_us", False, "{:.1f}"),
]


def cmd_table(args):
    rows = {}
    order = []
    with open(args.results, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if r["peer"] not in rows:
                rows[r["peer"]] = {}
                order.append(r["peer"])
            rows[r["peer"]][r["scenario"]] = r
    direct = rows.get("direct", {})

    def value(r, key):
        v = r.get(key)
        if v is not None and key == "connect_mean_us":
            v = v / 1000.0
        return v

    header = ["peer"] + [c[0] for c in COLUMNS] + ["peak RSS MiB"]
    table = []
    for peer in order:
        cells = [peer]
        for title, scen, key, _, fmt in COLUMNS:
            r = rows[peer].get(scen)
            if r is None:
                cells.append("-")
                continue
            if not r.get("ok"):
                cells.append("failed")
                continue
            v = value(r, key)
            if v is None:
                cells.append("?")
                continue
            text = fmt.format(v)
            d = direct.get(scen)
            dv = value(d, key) if d and d.get("ok") else None
            if peer != "direct" and dv:
                text += " (%.2f×)" % (v / dv)
            cells.append(text)
        rss = [r["rss_kib"] for r in rows[peer].values() if r.get("rss_kib")]
        cells.append("%.1f" % (max(rss) / 1024.0) if rss else "-")
        table.append(cells)

    widths = [max(len(str(row[i])) for row in [header] + table) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    md = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    md += [line(row) for row in table]
    print("\n".join(md))

    notes = []
    for peer in order:
        for scen in ("unary", "bulk", "conns"):
            r = rows[peer].get(scen)
            if r and r.get("note"):
                notes.append("- %s / %s: %s" % (peer, scen, r["note"]))
    if notes:
        print("\nnotes:\n" + "\n".join(notes))

    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write("# sparkgate benchmark\n\n")
            for m in args.meta or []:
                f.write("- %s\n" % m)
            f.write("\nRatios in parentheses are to `direct` (h2load to the upstream, h2c, no proxy); "
                    "for req/s, MB/s and conns/s higher is better, for latencies lower is better. "
                    "Peak RSS is VmHWM of the proxy's processes, the highest of the three runs.\n\n")
            f.write("\n".join(md) + "\n")
            if notes:
                f.write("\n## Notes\n\n" + "\n".join(notes) + "\n")
            f.write("\n## Raw results\n\n```\n")
            for peer in order:
                for scen, r in rows[peer].items():
                    f.write(json.dumps(r, sort_keys=True) + "\n")
            f.write("```\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("payloads")
    p.add_argument("dir")
    p.add_argument("bulk_bytes", type=int)
    p.set_defaults(fn=cmd_payloads)
    p = sub.add_parser("result")
    p.add_argument("--peer", required=True)
    p.add_argument("--scenario", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--log")
    p.add_argument("--rss-kib", type=int, default=0)
    p.add_argument("--expect-body-bytes", type=int, default=0)
    p.add_argument("--note")
    p.set_defaults(fn=cmd_result)
    p = sub.add_parser("failed")
    p.add_argument("--peer", required=True)
    p.add_argument("--scenario", required=True)
    p.add_argument("--note", required=True)
    p.set_defaults(fn=cmd_failed)
    p = sub.add_parser("table")
    p.add_argument("results")
    p.add_argument("--md")
    p.add_argument("--meta", action="append")
    p.set_defaults(fn=cmd_table)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
