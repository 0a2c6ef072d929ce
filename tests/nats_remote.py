"""A remote bus in a process of its own, for the scale-out tests.

``python nats_remote.py NATS_URL TYPE CODE...`` registers one component for
``TYPE`` of ``CODE...`` on a remote bus (``upstream = "gateway"``) and prints one
JSON line per item it receives: ``{"type", "code", "id"}`` for a message,
``{"event", "channel"}`` for a connection event. It runs until killed, or SIGTERM stops it cleanly.
"""

from __future__ import annotations

import signal
import sys

import anyio
import orjson

import upbus


class Printer:
    def __init__(self) -> None:
        self.out = sys.stdout.buffer

    def write(self, record: dict[str, object]) -> None:
        self.out.write(orjson.dumps(record) + b"\n")
        self.out.flush()


async def main(nats_url: str, kind: str, codes: list[str]) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_sigterm, tg.cancel_scope)
        await serve(nats_url, kind, codes)


async def stop_on_sigterm(scope: anyio.CancelScope) -> None:
    # SIGTERM is a clean exit: the bus closes, and its lease is deleted at once.
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _signum in signals:
            scope.cancel()


async def serve(nats_url: str, kind: str, codes: list[str]) -> None:
    printer = Printer()
    async with upbus.Bus(upstream="gateway", nats_url=nats_url) as bus:
        subscriber = await bus.register_component(printer, [{"type": kind, "codes": codes}])
        printer.write({"event": "registered", "channel": "public"})
        async for item in subscriber:
            if isinstance(item, upbus.ConnectionEvent):
                printer.write({"event": item.state, "channel": item.channel})
            elif isinstance(item, upbus.BusEvent):
                printer.write({"event": type(item).__name__, "channel": ""})
            else:
                ident = getattr(item, "sequential_id", None) or getattr(item, "timestamp", None)
                printer.write({"type": item.type, "code": item.code, "id": ident})


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:])
