#!/usr/bin/env python3
"""Userspace delay line for the NAT lab.

The lab kernel has no netem qdisc, so the rtr<->wan link can instead be two
TUN devices, one in each namespace, with this process copying packets
between them after a fixed delay.

Usage: natlab-delay.py DEV_A DEV_B NETNS_B_PATH DELAY_MS [MAX_SECONDS]
Start it inside the namespace of DEV_A (ip netns exec ...). It prints
"ready" once both devices exist, then runs until SIGTERM/SIGINT, until its
parent dies, or for MAX_SECONDS at most.
"""
import collections
import ctypes
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
# Bounded queue: beyond this the line drops packets like a full router buffer
# would, rather than growing without limit.
MAX_QUEUED = 4096


def open_tun(name):
    # The device is created in the network namespace that is current when
    # /dev/net/tun is opened, so the caller must setns() first.
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main():
    if len(sys.argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    dev_a, dev_b, netns_b, delay_ms = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    max_seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 6 * 3600.0
    libc = ctypes.CDLL(None, use_errno=True)
    # A crashed test runner must not leave this process behind.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))

    fd_a = open_tun(dev_a)
    ns_fd = os.open(netns_b, os.O_RDONLY)
    if libc.setns(ns_fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: " + os.strerror(err))
    os.close(ns_fd)
    fd_b = open_tun(dev_b)
    print("ready", flush=True)

    delay = delay_ms / 1000.0
    peer = {fd_a: fd_b, fd_b: fd_a}
    # One FIFO per direction: a constant delay keeps packets in order.
    queues = {fd_a: collections.deque(), fd_b: collections.deque()}
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - now) if due else 1.0
        readable, _, _ = select.select([fd_a, fd_b], [], [], min(timeout, 1.0))
        now = time.monotonic()
        for fd in readable:
            for _ in range(256):
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if len(queues[fd]) < MAX_QUEUED:
                    queues[fd].append((now + delay, pkt))
        now = time.monotonic()
        for src, q in queues.items():
            while q and q[0][0] <= now:
                _, pkt = q.popleft()
                try:
                    os.write(peer[src], pkt)
                except OSError:
                    # The far device is down or its queue is full: a lost
                    # packet, which TCP will retransmit.
                    pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
