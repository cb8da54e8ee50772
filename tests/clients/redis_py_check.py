"""redis-py against two cachecast sidecars: subscribe on one, publish on
the other, in RESP2 or RESP3. Prints `ok ...` lines and `done`; exits 1 on
the first failure. Usage: redis_py_check.py SUB_PORT PUB_PORT PASSWORD|- 2|3
"""
import sys
import time

import redis


def main():
    sub_port, pub_port, password, protocol = sys.argv[1:5]
    password = None if password == "-" else password
    kwargs = {"host": "127.0.0.1", "password": password, "socket_timeout": 10}
    if protocol == "3":
        kwargs["protocol"] = 3
    sub = redis.Redis(port=int(sub_port), **kwargs)
    pub = redis.Redis(port=int(pub_port), **kwargs)
    assert sub.ping() is True, "ping"
    print("ok ping", flush=True)
    ps = sub.pubsub()
    ps.subscribe("py-news")
    ps.psubscribe("py-*")
    confirmations = []
    deadline = time.time() + 10
    while len(confirmations) < 2 and time.time() < deadline:
        m = ps.get_message(timeout=1)
        if m:
            confirmations.append(m["type"])
    assert confirmations == ["subscribe", "psubscribe"], confirmations
    print("ok subscribed", flush=True)
    received = []
    pub.publish("py-news", "hello from redis-py")
    deadline = time.time() + 10
    while len(received) < 2 and time.time() < deadline:
        m = ps.get_message(timeout=1)
        if m:
            received.append((m["type"], m["channel"], m["data"]))
    want = [
        ("message", b"py-news", b"hello from redis-py"),
        ("pmessage", b"py-news", b"hello from redis-py"),
    ]
    assert received == want, received
    print("ok received", flush=True)
    numsub = sub.pubsub_numsub("py-news")
    assert numsub == [(b"py-news", 1)], numsub
    print("ok numsub", flush=True)
    try:
        pub.publish("", "x")
        raise AssertionError("an empty channel was accepted")
    except redis.ResponseError as e:
        print("ok empty-channel-refused", e, flush=True)
    ps.close()
    print("done", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one line, for the test's assertion message
        print("FAIL", type(e).__name__, e, flush=True)
        sys.exit(1)
