#!/usr/bin/env python3
"""Opens N idle keep-alive connections to a fresh `weir increments serve` (each after one
answered request, so every connection really reached the server), closes them, and prints
the server's VmRSS before, while held, and 3 s and 15 s after they closed.

usage: scripts/idle-connections-rss.py [WEIR_BIN] [N]   (default target/release/weir, 5000)
"""
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(sock, path):
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("closed")
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head.split(b" ")[1]


def main():
    weir = sys.argv[1] if len(sys.argv) > 1 else "target/release/weir"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 1000)), hard))
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen(
            [weir, "increments", "serve", "--bind-address", "127.0.0.1",
             "--port", str(port), "--data-dir", data],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.time() + 30
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port)) as probe:
                        get(probe, "/healthz")
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.1)
            time.sleep(1)
            before = rss_kib(server.pid)
            held = []
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port))
                get(sock, "/healthz")
                held.append(sock)
            time.sleep(1)
            holding = rss_kib(server.pid)
            for sock in held:
                sock.close()
            time.sleep(3)
            after = rss_kib(server.pid)
            # The allocator hands freed memory back on its own schedule (jemalloc: a 10 s
            # decay), so look again once that has passed.
            time.sleep(12)
            later = rss_kib(server.pid)
            print(f"{count} idle keep-alives: VmRSS before {before / 1024:.1f} MiB, "
                  f"holding {holding / 1024:.1f} MiB, 3 s after closing {after / 1024:.1f} MiB, "
                  f"15 s after {later / 1024:.1f} MiB (+{(later - before) / 1024:.1f} MiB left behind)")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
