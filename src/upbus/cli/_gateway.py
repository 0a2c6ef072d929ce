"""``upbus gateway``: hold the exchange connections for every remote bus on NATS."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio
import click

from upbus.cli._app import embedded_simulator, main, run_until_signal, settings_from
from upbus.cli._live import status_line as channels_line
from upbus.cli._otel import otel_option

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from upbus.plugins.nats._gateway import Gateway


@main.command()
@click.option("--nats", "nats_url", help="NATS server URL(s) (default: the setting nats_url).")
@click.option("--sim", "use_sim", is_flag=True, help="Serve an embedded local simulator.")
@click.option("--url", help="Public WebSocket URL (default: the setting public_url).")
@click.option(
    "--status-every",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds between status lines on stderr.",
)
@otel_option
def gateway(
    nats_url: str | None,
    use_sim: bool,
    url: str | None,
    status_every: float,
    tracer_provider: TracerProvider | None,
) -> None:
    """Serve remote buses (upstream = gateway) over NATS.

    Several gateways on one NATS elect one leader; the others stand by and take
    over within nats.leader_ttl when it stops. The first line on stdout says the
    gateway is ready and on which NATS server; later lines say when it leads or
    stands by. SIGINT or SIGTERM stops it and hands the lead over at once.
    """
    from upbus.plugins.nats._gateway import Gateway

    settings = settings_from(nats_url=nats_url, public_url=url)
    if settings.nats_url is None:
        raise click.UsageError("no NATS server: pass --nats nats://host:4222 or set UPBUS_NATS_URL")

    async def body() -> None:
        async with AsyncExitStack() as stack:
            used = await embedded_simulator(stack, settings) if use_sim else settings
            server = Gateway(used, on_status=click.echo, tracer_provider=tracer_provider)
            async with anyio.create_task_group() as tg:
                tg.start_soon(report, server)
                await server.run()
                tg.cancel_scope.cancel()

    async def report(server: Gateway) -> None:
        while True:
            await anyio.sleep(status_every)
            click.echo(status_line(server), err=True)

    run_until_signal(body)


def status_line(server: Gateway) -> str:
    """The gateway's role, leases and what it published, then its channels' states."""
    status = server.status()
    role = f"leading (epoch {status['epoch']})" if status["leading"] else "standing by"
    line = (
        f"{role}: {status['leases']} leases, {status['published']} published, "
        f"{status['dropped']} dropped"
    )
    if server.bus is not None:
        line += f"; {channels_line(server.bus)}"
    return line
