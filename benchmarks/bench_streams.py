"""Streamed replies and interrupts over NATS, against raw nats-py and bare asyncio.

    python benchmarks/bench_streams.py [--runs 3] [other clstr bench options]

The figures are ``clstr bench``'s groups ``stream_chunks`` (clstr/bench/_streams.py)
and ``interrupt_latency`` (clstr/bench/_interrupts.py); this script runs those two
alone (the same as ``clstr bench --only stream_chunks,interrupt_latency``):

* **Streams:** chunks/s of 100-byte chunks, a node process streaming to a client
  process through clstr (``clstr.current_stream()`` on the node,
  ``client.stream_key`` on the client: frames, credit acknowledgements every half
  window of 64), against raw nats-py doing the same work in the same layout: a
  responder publishes the chunks to the caller's inbox and waits for an
  acknowledgement per half window, the caller acknowledges as it consumes
  (floor 0.7).
* **Interrupts:** time from ``client.interrupt(id)`` to the handler seeing
  ``CancelledError`` (median and p99), handler and client in one process on one
  clock, against a bare ``task.cancel()`` (report only).
"""

from __future__ import annotations

import sys

from clstr.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["--only", "stream_chunks,interrupt_latency", *sys.argv[1:]]))
