"""Steady test traffic for the sandbox's capture interface (gims-sb0).

`server ADDR...` runs on the capture side (the host network namespace, where gims-sb0 is):
UDP and TCP echo on every ADDR. `client ADDR...` runs in the peer network namespace and
talks to those servers a few times a second over IPv4 and IPv6, so a capture on gims-sb0
sees TCP (handshakes, data, FINs) and UDP both ways. ICMP comes from ping, started beside it.
Stops on SIGTERM/SIGINT.
"""

import argparse
import selectors
import signal
import socket
import sys
import threading
import time

UDP_PORT = 47001
TCP_PORT = 47002


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def serve(addrs: list[str], stop: threading.Event) -> None:
    sel = selectors.DefaultSelector()
    for addr in addrs:
        fam = _family(addr)
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        u.bind((addr, UDP_PORT))
        sel.register(u, selectors.EVENT_READ, "udp")
        t = socket.socket(fam, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((addr, TCP_PORT))
        t.listen(16)
        sel.register(t, selectors.EVENT_READ, "listen")
    while not stop.is_set():
        for key, _ in sel.select(timeout=0.5):
            sock = key.fileobj
            try:
                if key.data == "udp":
                    data, peer = sock.recvfrom(2048)
                    sock.sendto(data, peer)
                elif key.data == "listen":
                    conn, _ = sock.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
                else:
                    data = sock.recv(4096)
                    if data:
                        sock.send(data)
                    else:
                        sel.unregister(sock)
                        sock.close()
            except OSError:
                if key.data == "conn":
                    sel.unregister(sock)
                    sock.close()


def client(addrs: list[str], rate: float, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        for addr in addrs:
            fam = _family(addr)
            payload = b"gims-sandbox %d %s" % (n, addr.encode())
            try:
                with socket.socket(fam, socket.SOCK_DGRAM) as u:
                    u.settimeout(1.0)
                    u.sendto(payload, (addr, UDP_PORT))
                    u.recvfrom(2048)
                if n % 4 == 0:  # a short TCP conversation every few rounds
                    with socket.create_connection((addr, TCP_PORT), timeout=1.0) as t:
                        t.sendall(payload)
                        t.recv(4096)
            except OSError as exc:
                print(f"traffic client: {addr}: {exc}", file=sys.stderr, flush=True)
        n += 1
        stop.wait(1.0 / rate)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["server", "client"])
    ap.add_argument("addrs", nargs="+")
    ap.add_argument("--rate", type=float, default=4.0, help="client rounds per second")
    args = ap.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.mode == "server":
        serve(args.addrs, stop)
    else:
        client(args.addrs, args.rate, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
