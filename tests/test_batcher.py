"""The batcher: no lost update, no useless send, one pending task per connection.

These are invariants 2, 3 and 4 of docs/architecture.md's table.

Everything runs on trio's MockClock, so debounce and limiter waits take virtual
time: the tests are exact and fast, with no real sleeps.
"""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from trio.testing import MockClock

from upbus.core.connection._metrics import ConnectionMetrics
from upbus.core.connection._sink import ConnectionSink
from upbus.core.sending._batcher import PendingTaskBatcher, RequestLimiter, RequestSink
from upbus.core.sending._ratelimit import ConnectionBudget, RollingWindowLimiter
from upbus.core.subscriptions._manager import SubscriptionManager
from upbus.core.subscriptions._specs import Channel, Spec, orderbook, ticker, trade
from upbus.core.subscriptions._state import MergedState


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Component:
    pass


class RecordingSink:
    """The connection's side of the batcher: records each request it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, MergedState]] = []
        self.gate: anyio.Event | None = None  # when set, a send blocks until it fires
        self.in_send = anyio.Event()
        self.fail_next = False

    async def send_state(self, state: MergedState) -> int:
        self.in_send.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("connection lost")
        self.sent.append((anyio.current_time(), state))
        return len(orjson.dumps(state.request_objects()))

    def requests(self) -> list[list[dict[str, Any]]]:
        return [state.request_objects() for _time, state in self.sent]


def make(
    manager: SubscriptionManager,
    sink: RequestSink,
    limiter: RequestLimiter | None = None,
    **options: Any,
) -> PendingTaskBatcher:
    limiter = limiter or RollingWindowLimiter("test", [(5, 1.0), (100, 60.0)], margin=0.1)
    batcher = PendingTaskBatcher(
        Channel.PUBLIC,
        source=lambda: manager.state(Channel.PUBLIC),
        current_version=lambda: manager.version(Channel.PUBLIC),
        sink=sink,
        limiter=limiter,
        **options,
    )
    manager.add_listener(
        lambda change: batcher.notify(change) if change.channel == "public" else None
    )
    return batcher


@pytest.mark.anyio
async def test_ten_concurrent_registrations_make_exactly_one_request_with_the_union() -> None:
    manager, sink = SubscriptionManager(), RecordingSink()
    batcher = make(manager, sink)
    codes = [f"KRW-C{i}" for i in range(10)]
    components = [Component() for _ in codes]

    async def register(component: Component, code: str) -> None:
        await anyio.sleep(0.001 * len(code))
        manager.register_component(component, [ticker(code), orderbook(code, depth=5)])

    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        for component, code in zip(components, codes, strict=True):
            tg.start_soon(register, component, code)
        await anyio.sleep(10)
    assert sink.requests() == [
        [
            {"type": "orderbook", "codes": sorted(f"{c}.5" for c in codes)},
            {"type": "ticker", "codes": sorted(codes)},
        ]
    ]
    status = batcher.status()
    assert (status["tasks_created"], status["changes_merged"], status["requests_sent"]) == (
        1,
        9,
        1,
    )
    assert status["done"]


@pytest.mark.anyio
async def test_the_request_goes_out_one_debounce_after_the_first_change() -> None:
    manager, sink = SubscriptionManager(), RecordingSink()
    batcher = make(manager, sink, debounce=0.25)
    a = Component()
    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        start = anyio.current_time()
        manager.register_component(a, ticker("KRW-BTC"))
        await anyio.sleep(5)
    assert [t - start for t, _ in sink.sent] == [pytest.approx(0.25)]


@pytest.mark.anyio
async def test_a_change_during_the_limiter_wait_goes_out_in_the_request_after_it() -> None:
    manager, sink = SubscriptionManager(), RecordingSink()
    limiter = RollingWindowLimiter("test", [(5, 1.0)], margin=0.1)
    for _ in range(5):  # this second's budget is spent
        limiter.take()
    batcher = make(manager, sink, limiter)
    a, b = Component(), Component()
    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        start = anyio.current_time()
        manager.register_component(a, ticker("KRW-BTC"))
        await anyio.sleep(0.5)
        assert batcher.status()["phase"] == "limiter"
        manager.register_component(b, trade("KRW-ETH"))
        await anyio.sleep(5)
    assert sink.requests() == [
        [{"type": "ticker", "codes": ["KRW-BTC"]}, {"type": "trade", "codes": ["KRW-ETH"]}]
    ]
    assert sink.sent[0][0] - start == pytest.approx(1.1, abs=1e-3)


@pytest.mark.anyio
async def test_a_change_during_the_send_is_sent_afterwards() -> None:
    manager, sink = SubscriptionManager(), RecordingSink()
    batcher = make(manager, sink)
    sink.gate = anyio.Event()
    a, b = Component(), Component()
    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        manager.register_component(a, ticker("KRW-BTC"))
        await sink.in_send.wait()
        manager.register_component(b, ticker("KRW-ETH"))  # while the first send is in flight
        sink.gate.set()
        await anyio.sleep(5)
    assert sink.requests() == [
        [{"type": "ticker", "codes": ["KRW-BTC"]}],
        [{"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]}],
    ]
    assert batcher.status()["tasks_created"] == 1


@pytest.mark.anyio
async def test_changes_that_leave_the_state_as_sent_send_nothing() -> None:
    manager, sink = SubscriptionManager(), RecordingSink()
    batcher = make(manager, sink)
    a, b, c = Component(), Component(), Component()
    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        manager.register_component(a, ticker("KRW-BTC"))
        await anyio.sleep(5)
        manager.register_component(b, ticker("KRW-BTC"))  # already wanted: not even a change
        manager.register_component(c, ticker("KRW-ETH"))  # a change ...
        manager.unregister_component(c)  # ... undone within the debounce window
        await anyio.sleep(5)
    assert len(sink.sent) == 1
    status = batcher.status()
    assert (status["tasks_created"], status["nothing_to_send"]) == (2, 1)


@pytest.mark.anyio
async def test_ending_the_stream_is_not_a_request() -> None:
    manager, sink = SubscriptionManager(), RecordingSink()
    limiter = RollingWindowLimiter("test", [(5, 1.0)])
    batcher = make(manager, sink, limiter)
    a = Component()
    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        manager.register_component(a, ticker("KRW-BTC"))
        await anyio.sleep(5)
        manager.unregister_component(a)
        await anyio.sleep(5)
    assert sink.requests() == [[{"type": "ticker", "codes": ["KRW-BTC"]}], []]
    assert batcher.status()["requests_sent"] == 1
    assert limiter.status()["granted"] == 1


@pytest.mark.anyio
async def test_a_limiter_expiry_keeps_the_state_pending_until_it_is_sent() -> None:
    manager, sink = SubscriptionManager(), RecordingSink()
    limiter = RollingWindowLimiter("test", [(5, 1.0)], backoff_initial=4.0, backoff_max=8.0)
    limiter.back_off()  # the exchange said "Too Many Requests": blocked for 4 s
    batcher = make(manager, sink, limiter, max_wait=1.5)
    a = Component()
    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        start = anyio.current_time()
        manager.register_component(a, ticker("KRW-BTC"))
        await anyio.sleep(10)
    assert sink.requests() == [[{"type": "ticker", "codes": ["KRW-BTC"]}]]
    assert sink.sent[0][0] - start == pytest.approx(4.0, abs=1e-3)
    assert batcher.status()["limiter_expiries"] == 2


@pytest.mark.anyio
async def test_after_a_failed_send_resend_restores_the_whole_state_at_once() -> None:
    manager, sink = SubscriptionManager(), RecordingSink()
    batcher = make(manager, sink)
    a = Component()
    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        manager.register_component(a, [ticker("KRW-BTC"), trade("KRW-BTC")])
        await anyio.sleep(5)
        assert len(sink.sent) == 1
        # The connection dropped and came back: the new connection has nothing.
        batcher.resend()
        reconnected = anyio.current_time()
        await anyio.sleep(5)
        sink.fail_next = True
        manager.register_component(a, ticker("KRW-BTC"))
        await anyio.sleep(5)
        assert batcher.status()["send_failures"] == 1
        batcher.resend()
        await anyio.sleep(5)
    assert sink.requests() == [
        [{"type": "ticker", "codes": ["KRW-BTC"]}, {"type": "trade", "codes": ["KRW-BTC"]}],
        [{"type": "ticker", "codes": ["KRW-BTC"]}, {"type": "trade", "codes": ["KRW-BTC"]}],
        [{"type": "ticker", "codes": ["KRW-BTC"]}],
    ]
    assert sink.sent[1][0] == pytest.approx(reconnected)  # no debounce after a connect


@pytest.mark.anyio
async def test_a_connect_during_the_debounce_does_not_let_later_changes_skip_it() -> None:
    manager, sink = SubscriptionManager(), RecordingSink()
    batcher = make(manager, sink)
    a, b = Component(), Component()
    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        start = anyio.current_time()
        manager.register_component(a, ticker("KRW-BTC"))
        await anyio.sleep(0.01)
        batcher.resend()  # the connection came up during the debounce
        await anyio.sleep(5)
        later = anyio.current_time()
        manager.register_component(b, ticker("KRW-ETH"))
        await anyio.sleep(5)
    assert sink.sent[0][0] - start == pytest.approx(0.1)  # the debounce under way ran out
    assert sink.sent[1][0] - later == pytest.approx(0.1)  # debounced like any change


class TextConnection:
    """The side of a connection the sink writes to: keeps each text frame."""

    def __init__(self) -> None:
        self.frames: list[str] = []

    async def send_text(self, text: str) -> None:
        self.frames.append(text)

    async def receive_batch(self) -> list[bytes | str]:
        await anyio.sleep_forever()
        return []

    async def ping(self, timeout: float) -> float:
        return 0.0

    async def aclose(self, code: int = 1000) -> None:
        pass

    def requests(self) -> list[list[dict[str, Any]]]:
        return [
            [item for item in orjson.loads(frame) if "type" in item]
            for frame in self.frames
            if frame.startswith("[")
        ]


@pytest.mark.anyio
async def test_the_connection_sink_and_budget_carry_every_frame_and_ask_for_resends() -> None:
    manager, budget = SubscriptionManager(), ConnectionBudget()
    sink = ConnectionSink(
        Channel.PUBLIC, budget=budget, metrics=ConnectionMetrics(), on_sent=lambda *_: None
    )
    batcher = make(manager, sink, budget)
    sink.add_resync_listener(batcher.resend)
    a = Component()
    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        manager.register_component(a, ticker("KRW-BTC"))
        await anyio.sleep(5)
        # No connection yet: the state stays wanted, and that is no failure.
        assert batcher.status()["requests_sent"] == batcher.status()["send_failures"] == 0
        assert await sink.send_extra("PING") is False

        conn, limiter = TextConnection(), RollingWindowLimiter("c#1", [(5, 1.0)], margin=0.1)
        sink.open(conn, limiter)
        sink.resync()
        await anyio.sleep(5)
        assert conn.requests() == [[{"type": "ticker", "codes": ["KRW-BTC"]}]]
        # A text PING takes its slot from the budget the batcher's requests use.
        assert await sink.send_extra("PING") is True
        assert conn.frames[-1] == "PING"
        assert limiter.status()["granted"] == 2

        # After an error frame nothing is sent until the connection proves open.
        sink.pause("INVALID_PARAM: test")
        manager.register_component(a, [ticker("KRW-BTC"), trade("KRW-BTC")])
        await anyio.sleep(5)
        assert len(conn.requests()) == 1
        sink.resume()
        await anyio.sleep(5)
        sink.close()
    assert conn.requests()[1:] == [
        [{"type": "ticker", "codes": ["KRW-BTC"]}, {"type": "trade", "codes": ["KRW-BTC"]}]
    ]
    assert budget.status() is None


@pytest.mark.anyio
async def test_changes_before_start_are_sent_once_started() -> None:
    manager, sink = SubscriptionManager(), RecordingSink()
    batcher = make(manager, sink)
    a = Component()
    manager.register_component(a, ticker("KRW-BTC"))
    assert batcher.status()["pending"]
    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        await anyio.sleep(5)
    assert sink.requests() == [[{"type": "ticker", "codes": ["KRW-BTC"]}]]


@pytest.mark.anyio
async def test_the_send_span_links_every_change_it_carried() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    manager, sink = SubscriptionManager(tracer=tracer), RecordingSink()
    batcher = make(manager, sink, tracer=tracer)
    components = [Component() for _ in range(3)]
    async with anyio.create_task_group() as tg:
        batcher.start(tg)
        with tracer.start_as_current_span("user code") as user_span:
            for i, component in enumerate(components):
                manager.register_component(component, ticker(f"KRW-C{i}"))
        await anyio.sleep(5)
    spans = exporter.get_finished_spans()
    creates = [s for s in spans if s.name == "create upbit.public"]
    (send,) = [s for s in spans if s.name == "send upbit.public"]
    assert len(creates) == 3
    assert send.parent is None  # a root span: it carries many callers' changes
    assert all(
        s.parent is not None and s.parent.span_id == user_span.get_span_context().span_id
        for s in creates
    )
    assert {link.context.span_id for link in send.links} == {s.context.span_id for s in creates}
    assert send.kind is SpanKind.CLIENT
    attributes = dict(send.attributes or {})
    assert attributes["messaging.batch.message_count"] == 3
    assert attributes["messaging.system"] == "upbit"
    assert attributes["upbus.request.codes"] == 3
    assert attributes["upbus.request.entries"] == 1
    assert attributes["upbus.debounce.wait_s"] == pytest.approx(0.1)
    assert attributes["messaging.message.body.size"] == len(
        orjson.dumps(sink.sent[0][1].request_objects())
    )


# -- a property over any schedule of changes ----------------------------------------------

SPECS = [ticker("KRW-BTC"), ticker("KRW-ETH"), trade("KRW-BTC"), orderbook("KRW-BTC", depth=5)]
steps = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=0.4),  # virtual seconds before the step
        st.integers(min_value=0, max_value=4),  # which component
        st.lists(st.sampled_from(SPECS), max_size=3, unique=True),  # its new specs ([] = leave)
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(steps=steps)
def test_any_schedule_ends_with_the_latest_state_sent_and_no_useless_sends(
    steps: list[tuple[float, int, list[Spec]]],
) -> None:
    manager, components = SubscriptionManager(), [Component() for _ in range(5)]

    async def scenario() -> RecordingSink:
        sink = RecordingSink()
        batcher = make(manager, sink)
        async with anyio.create_task_group() as tg:
            batcher.start(tg)
            for delay, which, specs in steps:
                await anyio.sleep(delay)
                if specs:
                    manager.register_component(components[which], specs)
                else:
                    manager.unregister_component(components[which])
            await anyio.sleep(120)
            assert not batcher.status()["pending"]
        return sink

    sink = anyio.run(
        scenario, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)}
    )
    final = manager.state(Channel.PUBLIC).entries
    sent = [state.entries for _time, state in sink.sent]
    # No lost update: what the connection has at the end is the latest state.
    assert (sent[-1] if sent else ()) == final
    # No useless send: the first request carries something, and no request repeats the last.
    assert not sent or sent[0] != ()
    assert all(before != after for before, after in itertools.pairwise(sent))
    # Within the exchange's limits over rolling windows, with the margin respected.
    # (Ending the stream closes the connection: not a request, not rate limited.)
    times = [t for t, state in sink.sent if state.entries]
    assert all(later - earlier > 1.1 for earlier, later in zip(times, times[5:], strict=False))
