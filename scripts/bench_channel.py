#!/usr/bin/env python3
"""Channel throughput next to the raw AEAD it is built on, measured in one run.

For each cipher: single-core AEAD seal throughput on 1 MiB messages (the
baseline), the same on 65519-byte messages (what a record carries), and the
secure channel's bulk path (Outbox and Inbox: sealed into buffers, opened in
place, as a migration's data records are) over loopback TCP carrying 1 MiB
payloads, sender and receiver in separate processes.  Prints medians of
--repeat runs and the channel/AEAD ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time

import trio

from palm_net.channel.handshake import ChannelConfig
from palm_net.channel.records import MAX_PLAINTEXT
from palm_net.channel.transport import Inbox, Outbox, accept, connect
from palm_net.crypto.identity import AgentIdentity, Authority, compute_measurement
from palm_net.crypto.noise import CIPHERS, CipherName, CipherState
from palm_net.wire.messages import DATA_RECORD

MIB = 1 << 20


def aead_gibs(cipher: CipherName, size: int, total: int) -> float:
    cs = CipherState(CIPHERS[cipher.value], os.urandom(32))
    msg = os.urandom(size)
    n = max(8, total // size)
    t = time.perf_counter()
    for _ in range(n):
        cs.encrypt_with_ad(b"", msg)
    return n * size / (time.perf_counter() - t) / 2**30


def configs() -> tuple[ChannelConfig, ChannelConfig]:
    ca = Authority.generate()
    m = compute_measurement()
    out = []
    for name in ("bench-src", "bench-dst"):
        ident = AgentIdentity.generate(name)
        cert = ca.issue(name, ident.static.public, ident.sign_pub, m)
        out.append(ChannelConfig(ident, cert, ca.public, m, frozenset({m}), allow_plain=True))
    return out[0], out[1]


def _receiver(cfg: ChannelConfig, sock: socket.socket, total: int) -> None:
    async def main() -> None:
        conn, _ = sock.accept()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        ch = await accept(stream, cfg)
        got = 0
        inbox = Inbox(ch)  # the destination's path: read into buffers, open in place in a worker thread
        async with trio.open_nursery() as nursery:
            send, recv = trio.open_memory_channel[tuple[bytearray, int]](1)
            nursery.start_soon(inbox.run, send)
            async for buf, end in recv:
                recs = await inbox.open(buf, end)
                got += sum(len(r.data) for r in recs)
                recs.clear()
                inbox.release(buf)
                if got >= total:
                    nursery.cancel_scope.cancel()
        await ch.send(b"done")
    trio.run(main)


def channel_gibs(cipher: CipherName, total: int) -> float:
    src, dst = configs()
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    proc = mp.get_context("fork").Process(target=_receiver, args=(dst, lsock, total))
    proc.start()
    payload = os.urandom(MIB)

    async def main() -> float:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ch = await connect(stream, src, cipher=cipher)
        t = time.perf_counter()
        sent = 0
        # the source's path: 1 MiB payloads as data records, sealed into buffers in a
        # worker thread (two payloads a hop) while the previous buffer is sent
        outbox = Outbox(ch, 2 * (MIB + 32 * 1024))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            view = memoryview(payload)
            while sent < total:
                await outbox.put([(view[i : i + DATA_RECORD], False) for i in range(0, MIB, DATA_RECORD)] * 2)
                sent += 2 * MIB
            outbox.close()
        await ch.receive()
        return total / (time.perf_counter() - t) / 2**30

    try:
        return trio.run(main)
    finally:
        proc.join(30)
        lsock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mib", type=int, default=512, help="MiB through the channel per run")
    args = ap.parse_args()
    total = args.mib * MIB
    print(f"{'cipher':<11} {'AEAD 1MiB':>10} {'AEAD 64K':>10} {'channel':>10} {'ratio':>7}"
          f"   (GiB/s, median of {args.repeat})")
    for cipher in CipherName:
        a1 = statistics.median(aead_gibs(cipher, MIB, 256 * MIB) for _ in range(args.repeat))
        a64 = statistics.median(aead_gibs(cipher, MAX_PLAINTEXT, 256 * MIB) for _ in range(args.repeat))
        runs = [channel_gibs(cipher, total) for _ in range(args.repeat)]
        ch = statistics.median(runs)
        print(f"{cipher.value:<11} {a1:10.3f} {a64:10.3f} {ch:10.3f} {ch / a1:7.2f}   "
              f"channel spread {min(runs):.3f}-{max(runs):.3f}")


if __name__ == "__main__":
    main()
