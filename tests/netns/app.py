#!/usr/bin/env python3
"""The application of one test host: it talks to its own sidecar on
loopback, as DHIS 2 or any other application would.

Runs inside the host's network namespace (started by `run.py`). Three
threads share one log of JSON lines that `run.py` reads afterwards:
- a sender POSTs a steady mix of invalidations (keys and whole caches),
  each named so that every receiver can tell exactly which one it got;
- an SSE reader keeps `GET /v1/events` open, reconnecting with
  `Last-Event-ID` whenever the stream breaks (a sidecar stopped, killed
  or restarted);
- a status poller records each change of each peer's link flags, which
  is how detection and reconnect times are measured.

Times are `time.monotonic()`, the clock every process on the machine shares.
"""

import argparse
import http.client
import json
import os
import signal
import threading
import time

STOP = threading.Event()


class Log:
    """JSON lines, written at once so that a reader never waits for a
    buffer and nothing is lost when the process is stopped."""

    def __init__(self, path):
        self._f = open(path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, **rec):
        rec.setdefault("at", time.monotonic())
        line = json.dumps(rec, separators=(",", ":"))
        with self._lock:
            self._f.write(line + "\n")


def sender(args, log):
    """One invalidation per request, paced at `--rate` per second; every
    `--whole-every`th is a whole-cache invalidation."""
    conn = None
    period = 1.0 / args.rate
    n = 0
    # Like an application that subscribes before it serves: nothing is sent
    # until every host's application has its event stream open.
    while not os.path.exists(args.go_file) and not STOP.is_set():
        time.sleep(0.02)
    due = time.monotonic()
    while not STOP.is_set():
        if os.path.exists(args.stop_file):
            break
        now = time.monotonic()
        if now < due:
            time.sleep(min(due - now, 0.05))
            continue
        # Paced, not bursty: time lost in a stall is not made up.
        due = max(due + period, now)
        n += 1
        if n % args.whole_every == 0:
            body = {"cache": f"soak.whole.{args.name}.{n}"}
        else:
            body = {"cache": "soak.key", "key": f"{args.name}:{n}"}
        payload = json.dumps(body)
        sent_at = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(args.api_host, args.api_port, timeout=1.0)
            conn.request("POST", "/v1/invalidate", payload, {"content-type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status == 202:
                log.write(t="acc", n=n, sent=sent_at, seqs=json.loads(data).get("seqs"))
            else:
                log.write(t="rej", n=n, sent=sent_at, status=resp.status, body=data.decode("utf-8", "replace"))
        except Exception as e:  # noqa: BLE001 - any failure: the outcome is unknown
            # A request whose answer never came may still have been applied;
            # it is not counted as accepted, but a delivery of it is fine.
            log.write(t="unk", n=n, sent=sent_at, error=type(e).__name__)
            if conn is not None:
                conn.close()
            conn = None
    log.write(t="sender-done", n=n)


def sse_reader(args, log):
    last_id = None
    while not STOP.is_set():
        conn = None
        try:
            conn = http.client.HTTPConnection(args.api_host, args.api_port, timeout=20.0)
            headers = {"accept": "text/event-stream"}
            if last_id is not None:
                headers["last-event-id"] = last_id
            conn.request("GET", "/v1/events", headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                log.write(t="sse-status", status=resp.status)
                time.sleep(0.2)
                continue
            log.write(t="sse-open", last_id=last_id)
            ev_id, data = None, []
            while not STOP.is_set():
                raw = resp.fp.readline()
                if not raw:
                    break
                line = raw.decode("utf-8").rstrip("\r\n")
                if line == "":
                    if data:
                        rec = json.loads("\n".join(data))
                        log.write(t="ev", id=ev_id, ev=rec)
                        if ev_id is not None:
                            last_id = ev_id
                    ev_id, data = None, []
                elif line.startswith(":"):
                    continue
                elif line.startswith("id:"):
                    ev_id = line[3:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
            log.write(t="sse-closed")
        except Exception as e:  # noqa: BLE001 - reconnect whatever broke
            log.write(t="sse-error", error=type(e).__name__)
            time.sleep(0.1)
        finally:
            if conn is not None:
                conn.close()


def status_poller(args, log):
    seen = {}
    while not STOP.is_set():
        try:
            conn = http.client.HTTPConnection(args.api_host, args.api_port, timeout=0.5)
            conn.request("GET", "/v1/status")
            resp = conn.getresponse()
            st = json.loads(resp.read())
            conn.close()
            for p in st.get("peers", []):
                flags = (bool(p.get("outbound")), bool(p.get("inbound")))
                if seen.get(p["id"]) != flags:
                    seen[p["id"]] = flags
                    log.write(t="link", peer=p["id"], out=flags[0], inb=flags[1])
        except Exception:  # noqa: BLE001 - the sidecar may be stopped
            pass
        time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--api-host", default="127.0.0.1")
    ap.add_argument("--api-port", type=int, default=4002)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--whole-every", type=int, default=10)
    ap.add_argument("--log", required=True)
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--go-file", required=True)
    args = ap.parse_args()
    log = Log(args.log)
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    threads = [
        threading.Thread(target=sse_reader, args=(args, log), daemon=True),
        threading.Thread(target=status_poller, args=(args, log), daemon=True),
        threading.Thread(target=sender, args=(args, log), daemon=True),
    ]
    for t in threads:
        t.start()
    log.write(t="start")
    while not STOP.is_set():
        STOP.wait(0.2)
    log.write(t="exit")


if __name__ == "__main__":
    main()
