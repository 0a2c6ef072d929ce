"""Every fenced code block of the README files and docs/ is run, so the examples cannot rot.

One test per block, named by its file and the line of its opening fence. How a block is
checked follows from its language; ``SPECIAL`` below lists the few blocks that need
something else, each with its reason. A block nothing handles fails ("add handling").
The checks run a few at a time (``WORKERS`` threads, each waiting on a subprocess); each
test waits for its own.

python
    Written to a file in a fresh directory and run in a subprocess (bounded in time)
    against a simulator of its own on 127.0.0.1: ``UPBUS_PUBLIC_URL`` and
    ``UPBUS_PRIVATE_URL`` point at it (a block that starts its own simulator uses that).
    It must exit 0 with no traceback on stderr (a component's logged traceback counts)
    and break no rule of the simulator. The output block shown right after it is
    compared loosely: numbers, object ids and ``…`` are wildcards.

    A *fragment* (a block with a top-level ``await``) runs as if typed at an asyncio
    prompt, with ``bus`` a running ``upbus.Bus()`` and the imports, classes and
    functions of the same file's earlier python blocks defined.

sh, bash, console
    ``console`` blocks are ``$ command`` lines with their output; ``sh`` blocks are
    scripts. They run in bash in a fresh directory, with ``upbus`` on ``PATH``, and:

    - a line that installs something (``pip install``, ``python3 -m venv``) or would
      reach the real exchange (``upbus watch`` without ``--url`` or an exported
      ``UPBUS_PUBLIC_URL``, ``upbus run`` without ``--sim`` or ``--url``) is not run: it
      must pass ``bash -n``, name a project that exists here with extras it defines, and
      every ``upbus`` subcommand and option in it must exist;
    - every other line is run, and may use only the programs in ``PROGRAMS`` (another
      fails the test); a URL of the local simulator is replaced by a live simulator's;
      ``upbus run`` and ``upbus demo`` in the foreground without ``--seconds`` get
      ``--seconds 3`` (the same clean stop as Ctrl-C); ``upbus sim`` in the foreground is
      stopped after 2 s; what a block leaves in the background is stopped after it;
    - ``$ cat FILE`` shows a file the example needs: it is created with what is shown;
    - each command's shown output is compared loosely with what it printed (stdout and
      stderr together, as a terminal shows them); an ``sh`` block must exit 0, and one
      that exports ``UPBUS_*`` variables is followed by ``upbus config``, which must show
      each of them as a source.

toml
    Parsed with tomllib; settings (``[tool.upbus]`` in a pyproject.toml, else an
    upbus.toml named by ``UPBUS_CONFIG``) must load with ``upbus.load_settings`` and
    every section of a plugin upbus knows must validate with that plugin's model.

json
    Parsed (a block may hold several JSON documents, as printed one after another).

untagged or text
    The output of the python block right before it (checked there), or listed in
    ``SPECIAL``.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from clirun import UPBUS, clean_environment
from docs_blocks import (
    ROOT,
    Block,
    all_blocks,
    extract,
    is_output,
    line_pattern,
    match_ordered,
    match_shape,
    output_after,
)

from upbus.sim import SimConfig, Simulator

pytestmark = pytest.mark.slow

BLOCKS = all_blocks()
EXAMPLE = ROOT / "examples" / "upbus-spread-monitor"
TIMEOUT = 30.0  # seconds, for any one run
WORKERS = 4  # runs at once: most of their time is spent waiting on a socket or a sleep
RECORDING = "<recording>"  # a file source: a short recording made with `upbus run --sim`
PROGRAMS = {
    "upbus", "cat", "echo", "export", "grep", "head", "kill", "mkdir", "nats-server",
    "python3", "sed", "sleep", "test", "[", "timeout", "true", "wait",
}  # fmt: skip
NATS_PORT = "4333"  # the port docs/scale-out.md starts its NATS server on
SHELL_WORDS = {"do", "done", "else", "fi", "if", "then", "until", "while", "!"}


@dataclass(frozen=True)
class Special:
    """How one block is checked, where its language's default does not do."""

    path: str
    marker: str  # text found in exactly one block of the file (of language `lang`, if given)
    how: str
    reason: str
    lang: str | None = None
    compare: str = "ordered"  # shown output: "ordered", "shape" (order and length vary), "json"
    stream: str | None = None  # where the shown output goes: python's stdout unless
    # "stderr"; a shell's stdout and stderr together unless "stdout"
    expect: str | None = None  # a regular expression the output must contain
    files: tuple[tuple[str, str], ...] = ()  # (name, marker of a block of the file | RECORDING)
    then: str | None = None  # sh: a command run afterwards in the same shell
    installed: tuple[str, ...] = ()  # distributions made visible: "example", "broken"
    replace: tuple[tuple[str, str], ...] = ()  # in the shown output; {cwd}: the directory
    source: str | None = None  # "excerpt" and "tree": what the block shows, under ROOT


SPECIAL = (
    # -- python
    Special(
        "docs/architecture.md", "gone at once", "fragment",
        "a fragment: after it, only the ticker of the component still referenced is wanted",
        expect=re.escape("public: [{'type': 'ticker', 'codes': ['KRW-BTC']}]"),
    ),
    Special(
        "docs/operations.md", "open_signal_receiver", "signal",
        "runs until SIGINT/SIGTERM: sent SIGTERM once its bus has subscribed; it must stop "
        "cleanly and print the store's counters with everything written",
        expect=r"\{'accepted': ([1-9]\d*), 'written': \1, 'batches': [1-9]\d*, 'lost': 0, "
        r"'refused': 0, 'pending': 0\}",
    ),
    Special(
        "docs/operations.md", "pytestmark = pytest.mark.anyio", "pytest",
        "a test module: run with pytest (anyio's plugin), its test must pass",
    ),
    Special(
        "docs/operations.md", "logging.basicConfig", "run",
        "its output is the DEBUG log, on stderr; the two channels' lines interleave in "
        "either order",
        stream="stderr", compare="shape",
    ),
    Special(
        "docs/operations.md", "json.dumps(bus.get_subscription_stats()", "run",
        "its output is shown as JSON, reflowed and shortened: compared key by key",
        compare="json",
    ),
    Special(
        "docs/plugins.md", "_recorders = weakref.WeakKeyDictionary()", "plugin",
        "a plugin module: registered on a bus against the simulator, its shutdown hook "
        "must report the messages its component received",
        expect=r"closing after [1-9]\d* messages",
    ),
    Special(
        "docs/plugins.md", "def upbus_make_rate_limiter", "plugin",
        "a plugin module: registered on a bus, the connection's message limiter must be "
        "its own, named as the text says",
        expect=re.escape('"name": "steady public#1"'),
    ),
    Special(
        "docs/scale-out.md", 'get("upstream")', "remote",
        "run as a remote bus (UPBUS_UPSTREAM=gateway) of a gateway on the simulator, with a "
        "NATS server of its own",
    ),
    # -- sh, console
    Special(
        "docs/scale-out.md", "python3 chart.py", "shell",
        "the walk of the page: chart.py is the page's python block of that name",
        files=(("chart.py", 'print("chart"'),),
    ),
    Special(
        "docs/configuration.md", "UPBUS_HEARTBEAT_INTERVAL=15 upbus config", "shell",
        "run where the page's pyproject.toml and upbus.toml examples are, as the note "
        "below it says",
        files=(
            ("pyproject.toml", "[tool.upbus.rate_limit]"),
            ("upbus.toml", "heartbeat_interval = 20"),
        ),
        replace=(("/home/me/app/", "{cwd}/"),),
    ),
    Special(
        "docs/configuration.md", "UPBUS_PLUGINS__CONSOLE__SPECS", "shell",
        "the console plugin's section from the environment: the plugin must run with it",
        then="upbus run --sim --no-store --seconds 1", expect=r"trade +KRW-ETH",
    ),
    Special(
        "docs/operations.md", "--status-every 1", "shell",
        "stdout and stderr interleave, and the number of status lines varies",
        compare="shape",
    ),
    Special(
        "docs/operations.md", "upbus replay data/upbus.db", "shell",
        "needs a recording: a short one of the types and codes shown is made beforehand",
        files=(("data/upbus.db", RECORDING),),
    ),
    Special(
        "docs/operations.md", "upbus db data/upbus.db", "shell",
        "needs a recording: a short one of the types and codes shown is made beforehand",
        files=(("data/upbus.db", RECORDING),),
    ),
    Special(
        "docs/operations.md", "> sim.urls &", "shell",
        "leaves a simulator running and exports its URLs: a watch without --url must "
        "reach it (the simulator is stopped afterwards)",
        then="upbus watch ticker KRW-BTC --count 2", expect=r"ticker +KRW-BTC",
    ),
    Special(
        "docs/operations.md", "upbus watch ticker KRW-BTC KRW-ETH", "shell",
        "live prices: the two codes come in either order", compare="shape",
    ),
    Special(
        "docs/plugins.md", "$ upbus run --sim --seconds 3", "shell",
        "run with the page's upbus.toml example; the console lines interleave with the "
        "others and their number varies",
        files=(("upbus.toml", "[plugins.console]"),), compare="shape",
    ),
    Special(
        "docs/plugins.md", "No module named 'no_such_module'", "shell",
        "shows the example plugin and a broken one installed: both are made visible "
        "(entry-point metadata on PYTHONPATH); stdout only: the broken plugin's warning "
        "and its traceback go to stderr, and the table shows the same error",
        installed=("example", "broken"), stream="stdout",
    ),
    Special(
        "docs/plugins.md", "upbus plugins | grep spread", "shell",
        "installs the example: it is put on PYTHONPATH with its entry point instead; the "
        "spreads it warns about vary",
        installed=("example",), compare="shape",
    ),
    Special(
        "examples/upbus-spread-monitor/README.md", "upbus plugins", "shell",
        "installs the example: it is put on PYTHONPATH with its entry point instead",
        installed=("example",), expect=r"spread_monitor +loaded +upbus-spread-monitor",
    ),
    # -- toml
    Special(
        "docs/plugins.md", 'name = "upbus-spread-monitor"', "excerpt",
        "not settings: an excerpt of the example's pyproject.toml, which must hold every "
        "key shown with the value shown",
        source="examples/upbus-spread-monitor/pyproject.toml",
    ),
    # -- conf
    Special(
        "docs/scale-out.md", "authorization {", "nats-config",
        "a nats-server configuration: `nats-server -t` must accept it (and "
        "test_nats_scaleout.py runs a server with it)",
    ),
    # -- untagged
    Special(
        "docs/scale-out.md", "KV upbus_leases", "doc-only", "a diagram",
    ),
    Special(
        "docs/architecture.md", "SubscriptionManager   one merged state", "doc-only",
        "a diagram",
    ),
    Special(
        "docs/plugins.md", '{"received_at":', "jsonl-line",
        "one line of a JSON Lines recording, shortened: it must match a line of a real one",
    ),
    Special(
        "docs/plugins.md", "-- public connected: ws", "doc-only",
        "two lines of the console view: the same lines are checked in this page's "
        "`upbus run --sim --seconds 3` block",
        lang="",
    ),
    Special(
        "docs/plugins.md", "ma_cross KRW-BTC BUY", "doc-only",
        "a signal of the example strategy: a short run does not certainly cross",
    ),
    Special(
        "docs/plugins.md", "upbus-spread-monitor/\n", "tree",
        "the example distribution's layout: every file named must exist",
        source="examples",
    ),
)  # fmt: skip


def special_for(block: Block) -> Special | None:
    found = [
        s
        for s in SPECIAL
        if s.path == block.path and s.marker in block.text and s.lang in (None, block.lang)
    ]
    assert len(found) <= 1, f"{block.id}: several SPECIAL entries match it"
    return found[0] if found else None


def is_fragment(block: Block) -> bool:
    code = compile(block.text, block.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    return bool(code.co_flags & inspect.CO_COROUTINE)


def how(block: Block) -> str:
    """The handling of a block, or a failure naming what is missing."""
    special = special_for(block)
    if special is not None:
        return special.how
    if block.lang == "python":
        return "fragment" if is_fragment(block) else "run"
    if block.lang in ("sh", "bash", "console", "shell"):
        return "shell"
    if block.lang == "toml":
        return "settings"
    if block.lang == "json":
        return "json"
    blocks = extract(block.path)
    index = blocks.index(block)
    if is_output(block) and index and blocks[index - 1].lang == "python":
        return "output"
    pytest.fail(
        f"{block.id}: add handling for this new {block.lang or 'untagged'} block "
        "(a language the test knows, or an entry in SPECIAL with a reason)"
    )


# -- running things ------------------------------------------------------------------


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def clean_env(**extra: str) -> dict[str, str]:
    """:func:`clean_environment` minus ``PYTEST_*`` and ``PYTHONPATH``, plus ``extra``.

    This interpreter's directory comes first on ``PATH``, so a block's ``upbus`` is ours.
    """
    env = {
        k: v for k, v in clean_environment().items() if not k.startswith(("PYTEST_", "PYTHONPATH"))
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, **extra}


def run_bounded(args: list[str], cwd: Path, env: dict[str, str]) -> Ran:
    """Run ``args`` in a session of its own; on timeout the whole session is killed."""
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_session(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"{shlex.join(args)}: still running after {TIMEOUT:.0f}s\n{stdout}{stderr}")
    finally:
        _kill_session(process)  # whatever it left running in the background
    return Ran(process.returncode, stdout, stderr)


def _kill_session(process: subprocess.Popen[str]) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


class Context:
    """What runs share: the event loop of the simulators, a recording, fake installs."""

    def __init__(self, portal: BlockingPortal, base: Path) -> None:
        self.portal = portal
        self.base = base
        self._lock = threading.Lock()
        self._recording_lock = threading.Lock()  # held while the recording is made
        self._recording: Path | None = None
        self._count = 0

    def workdir(self, block: Block) -> Path:
        with self._lock:
            self._count += 1
            name = f"{self._count:02d}-{re.sub(r'[^A-Za-z0-9]+', '-', block.id)}"
        path = self.base / name
        path.mkdir()
        return path

    @contextmanager
    def simulator(self) -> Iterator[Simulator]:
        """A simulator of one's own; on leaving, it must have seen no broken rule."""
        with self.portal.wrap_async_context_manager(Simulator(SimConfig())) as sim:
            yield sim
            violations = self.portal.call(lambda: list(sim.violations))
        assert not violations, f"the simulator saw broken rules: {violations}"

    def recording(self) -> Path:
        """The folder of a short recording: upbus.db (SQLite) and upbus.jsonl."""
        with self._recording_lock:
            if self._recording is None:
                where = self.base / "recording"
                where.mkdir()
                specs = [
                    {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
                    {"type": "trade", "codes": ["KRW-BTC"]},
                    {"type": "orderbook", "codes": ["KRW-BTC.5"]},
                ]
                plugins = {
                    "sqlite": {"specs": specs},
                    "jsonl": {"enabled": True, "path": "data/upbus.jsonl", "specs": specs},
                }
                command = [*UPBUS, "run", "--sim", "--seconds", "2"]
                ran = run_bounded(
                    [*command, "--db", "data/upbus.db"],
                    where,
                    clean_env(UPBUS_PLUGINS=json.dumps(plugins)),
                )
                assert ran.returncode == 0, f"making a recording failed:\n{ran.stderr}"
                self._recording = where / "data"
        return self._recording

    def pythonpath(self, names: tuple[str, ...]) -> str:
        """Distributions made visible to ``importlib.metadata`` (pip's metadata, no copy)."""
        paths = []
        with self._lock:
            for name in names:
                site = self.base / f"site-{name}"
                if not site.exists():
                    if name == "example":
                        project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
                        project = project["project"]
                        dist, version = project["name"], project["version"]
                        points = project["entry-points"]["upbus"]
                    else:
                        dist, version, points = "broken", "0.1", {"broken": "no_such_module"}
                    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
                    info.mkdir(parents=True)
                    metadata = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
                    (info / "METADATA").write_text(metadata)
                    lines = "".join(f"{key} = {value}\n" for key, value in points.items())
                    (info / "entry_points.txt").write_text(f"[upbus]\n{lines}")
                paths.append(str(site))
                if name == "example":
                    paths.append(str(EXAMPLE / "src"))
        return os.pathsep.join(paths)


def check_shown(block: Block, shown: Block, printed: str, special: Special | None) -> None:
    """The output ``shown`` after ``block`` matches what it ``printed``, loosely."""
    mode = special.compare if special else "ordered"
    if mode == "json":
        problem = compare_json(shown.text, printed)
    else:
        matcher = match_shape if mode == "shape" else match_ordered
        problem = matcher(shown.text.splitlines(), printed.splitlines())
    assert problem is None, (
        f"{shown.id} no longer shows what {block.id} prints: {problem}\n--- printed:\n{printed}"
    )


def json_documents(text: str) -> list[Any]:
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return docs
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)


def compare_json(shown: str, printed: str) -> str | None:
    """The same documents with the same keys at every level (values vary)."""

    def differences(a: Any, b: Any, where: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            found = [f"{where}: {k!r} is shown but not printed" for k in a.keys() - b.keys()]
            found += [f"{where}: {k!r} is printed but not shown" for k in b.keys() - a.keys()]
            for key in a.keys() & b.keys():
                found += differences(a[key], b[key], f"{where}.{key}")
            return found
        if isinstance(a, list) and isinstance(b, list):
            return differences(a[0], b[0], f"{where}[0]") if a and b else []
        if isinstance(a, dict | list) or isinstance(b, dict | list):
            return [f"{where}: shown {type(a).__name__}, printed {type(b).__name__}"]
        return []

    a, b = json_documents(shown), json_documents(printed)
    if len(a) != len(b):
        return f"{len(a)} JSON document(s) shown, {len(b)} printed"
    found = []
    for index, (x, y) in enumerate(zip(a, b, strict=True)):
        found += differences(x, y, f"#{index}")
    return "; ".join(found) or None


# -- python --------------------------------------------------------------------------

FRAGMENT_HARNESS = '''\
"""A documentation fragment, run as if typed at an asyncio prompt on a running bus."""

import ast

import anyio

import upbus

{definitions}


async def _harness():
    async with upbus.Bus() as bus:
        namespace = dict(globals(), bus=bus)
        code = compile({fragment!r}, "fragment", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, namespace)
        if result is not None:
            await result
        await anyio.sleep(0.5)
        print("public:", bus.subscriptions.get_public_subscriptions().request_objects())


anyio.run(_harness)
'''

PLUGIN_HARNESS = '''\
"""A documentation plugin module, registered on a bus against the simulator."""

import importlib.util
import json

import anyio

import upbus

spec = importlib.util.spec_from_file_location("doc_plugin", "doc_plugin.py")
plugin = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plugin)


class Watcher:
    async def on_message(self, message):
        pass


async def main():
    settings = upbus.load_settings()
    plugins = upbus.PluginManager.load(settings)
    plugins.register(plugin, "doc_plugin")
    watcher = Watcher()
    async with upbus.Bus(settings, plugin_manager=plugins) as bus:
        await bus.register_component(watcher, [upbus.trade("KRW-BTC")])
        await anyio.sleep(1)
        print("limiters:", json.dumps(bus.get_rate_limiter_status()))
    print("plugin failures:", dict(plugins.failures))


anyio.run(main)
'''


DEFINITIONS = (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def definitions_before(block: Block) -> str:
    """The imports, classes and functions of the python blocks before ``block`` in its file."""
    parts = []
    for earlier in extract(block.path):
        if earlier == block:
            break
        if earlier.lang != "python" or is_fragment(earlier):
            continue
        lines = earlier.text.splitlines()
        for node in ast.parse(earlier.text).body:
            if isinstance(node, DEFINITIONS):
                first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
                parts.append("\n".join(lines[first - 1 : node.end_lineno]))
    return "\n\n".join(parts)


def check_python(block: Block, special: Special | None, ctx: Context, kind: str) -> None:
    cwd = ctx.workdir(block)
    with ctx.simulator() as sim:
        env = clean_env(UPBUS_PUBLIC_URL=sim.public_url, UPBUS_PRIVATE_URL=sim.private_url)
        if kind == "fragment":
            script = FRAGMENT_HARNESS.format(
                definitions=definitions_before(block), fragment=block.text
            )
            (cwd / "block.py").write_text(script)
        elif kind == "plugin":
            (cwd / "doc_plugin.py").write_text(block.text)
            (cwd / "block.py").write_text(PLUGIN_HARNESS)
        elif kind == "pytest":
            (cwd / "test_doc_block.py").write_text(block.text)
        else:
            (cwd / "block.py").write_text(block.text)

        if kind == "signal":
            ran = run_until_signalled(ctx, sim, cwd, env)
        elif kind == "remote":
            with gateway_for(sim, cwd) as nats_url:
                remote = {**env, "UPBUS_UPSTREAM": "gateway", "UPBUS_NATS_URL": nats_url}
                ran = run_bounded([sys.executable, "block.py"], cwd, remote)
        elif kind == "pytest":
            args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            ran = run_bounded([*args, "test_doc_block.py"], cwd, env)
        else:
            ran = run_bounded([sys.executable, "block.py"], cwd, env)

    assert ran.returncode == 0, f"{block.id} exited {ran.returncode}\n{ran.stdout}\n{ran.stderr}"
    assert "Traceback" not in ran.stderr, f"{block.id} logged a traceback:\n{ran.stderr}"
    if kind == "pytest":
        assert re.search(r"\b\d+ passed\b", ran.stdout), ran.stdout  # once per anyio backend
    if kind == "plugin":
        assert "plugin failures: {}" in ran.stdout, ran.stdout + ran.stderr
    printed = ran.stderr if special and special.stream == "stderr" else ran.stdout
    if special and special.expect:
        assert re.search(special.expect, printed), f"{special.reason}; printed:\n{printed}"
    shown = output_after(extract(block.path), block)
    if shown is not None:
        check_shown(block, shown, printed, special)


@contextmanager
def gateway_for(sim: Simulator, cwd: Path) -> Iterator[str]:
    """A NATS server of its own and a leading ``upbus gateway`` on ``sim``; yields the URL."""
    from natsserver import NatsServer, require_nats_server

    require_nats_server()
    server = NatsServer(cwd / "nats")
    server.start()
    env = clean_env(
        UPBUS_NATS_URL=server.url, UPBUS_PUBLIC_URL=sim.public_url, PYTHONUNBUFFERED="1"
    )
    gateway = subprocess.Popen(
        [*UPBUS, "gateway"], cwd=cwd, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert gateway.stdout is not None
        deadline = time.monotonic() + TIMEOUT / 2
        while time.monotonic() < deadline:
            line = gateway.stdout.readline()
            if not line or line.startswith("leading"):
                break
        assert line.startswith("leading"), f"the gateway did not lead: {line!r}"
        yield server.url
    finally:
        gateway.kill()
        gateway.communicate(timeout=10)
        server.stop(signal.SIGKILL)


def check_nats_config(block: Block, ctx: Context) -> None:
    from natsserver import BINARY, require_nats_server

    require_nats_server()
    cwd = ctx.workdir(block)
    (cwd / "nats.conf").write_text(block.text)
    ran = run_bounded([BINARY, "-t", "-c", "nats.conf"], cwd, clean_env())
    assert ran.returncode == 0, f"{block.id}: nats-server refuses it:\n{ran.stdout}{ran.stderr}"


def run_until_signalled(ctx: Context, sim: Simulator, cwd: Path, env: dict[str, str]) -> Ran:
    process = subprocess.Popen(
        [sys.executable, "block.py"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # Subscribed means the bus is up and the program waits for its signal.
        ctx.portal.call(partial(sim.wait_for_requests, 1, timeout=TIMEOUT / 2))
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except (TimeoutError, subprocess.TimeoutExpired):
        _kill_session(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"it did not subscribe, or did not stop on SIGTERM:\n{stdout}{stderr}")
    finally:
        _kill_session(process)
    return Ran(process.returncode, stdout, stderr)


# -- sh, console ---------------------------------------------------------------------

_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;", "|&"}
_SIM_URL = re.compile(r"ws://127\.0\.0\.1:\d+/websocket/v1(?P<private>/private)?")


def shell_tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line: words after assignments and keywords."""
    commands: list[list[str]] = [[]]
    redirect = False
    for token in shell_tokens(line):
        if token in _SEPARATORS:
            commands.append([])
        elif redirect:
            redirect = False
        elif set(token) <= set("<>"):
            redirect = True
        elif commands[-1] or not (token in SHELL_WORDS or re.match(r"[A-Za-z_]\w*=", token)):
            commands[-1].append(token)
    return [c for c in commands if c]


def is_install(line: str) -> bool:
    return any(
        Path(c[0]).name in ("pip", "pip3") or c[1:3] == ["-m", "venv"]
        for c in simple_commands(line)
    )


def upbus_invocations(line: str) -> list[tuple[str, list[str]]]:
    """(subcommand, its --options) of each ``upbus`` command on the line."""
    found = []
    for words in simple_commands(line):
        if Path(words[0]).name != "upbus":
            continue
        rest = words[1:]
        while rest and rest[0].startswith("-"):  # global options, such as -v
            rest = rest[1:]
        if rest:
            found.append((rest[0], [w.split("=")[0] for w in rest[1:] if w.startswith("--")]))
    return found


def upbus_options(subcommand: str) -> set[str] | None:
    """The options ``upbus SUBCOMMAND --help`` lists, or None for no such subcommand."""
    from upbus.cli import main
    from upbus.sim.cli import build_parser

    if subcommand == "sim":
        return set(build_parser()._option_string_actions)
    command = main.commands.get(subcommand)  # type: ignore[attr-defined]
    if command is None:
        return None
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}


def check_upbus_line(block: Block, line: str) -> None:
    for subcommand, options in upbus_invocations(line):
        known = upbus_options(subcommand)
        assert known is not None, f"{block.id}: no subcommand `upbus {subcommand}`: {line}"
        unknown = [o for o in options if o not in known]
        assert not unknown, f"{block.id}: `upbus {subcommand}` has no option {unknown}: {line}"


def reaches_exchange(line: str, exported: set[str]) -> bool:
    """Whether a line would connect to the real exchange (``watch``, ``run``, ``gateway``).

    A remote bus (``UPBUS_UPSTREAM=gateway``) talks to a gateway instead.
    """
    if "UPBUS_UPSTREAM=gateway" in line or "UPBUS_UPSTREAM" in exported:
        return False
    for subcommand, options in upbus_invocations(line):
        if subcommand == "gateway" and not {"--sim", "--url"} & set(options):
            return True
        if subcommand == "watch" and "--url" not in options and "UPBUS_PUBLIC_URL" not in exported:
            return True
        if subcommand == "run" and not {"--sim", "--url"} & set(options):
            return True
    return False


def check_unrun_line(block: Block, line: str) -> None:
    """Not run: valid shell, a project here with the extras named, options that exist."""
    ran = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True, check=False)
    assert ran.returncode == 0, f"{block.id}: not valid shell: {line}\n{ran.stderr}"
    check_upbus_line(block, line)
    for words in simple_commands(line):
        if Path(words[0]).name not in ("pip", "pip3") or "install" not in words:
            continue
        for target in words[words.index("install") + 1 :]:
            if target.startswith("-"):
                continue
            where, _, extras = target.partition("[")
            project = ROOT / where / "pyproject.toml"
            assert project.is_file(), f"{block.id}: no project at {where}: {line}"
            defined = tomllib.loads(project.read_text())["project"].get("optional-dependencies", {})
            for extra in filter(None, extras.rstrip("]").split(",")):
                assert extra in defined, f"{block.id}: {where} has no extra [{extra}]: {line}"


def check_run_line(block: Block, line: str) -> None:
    """Only known programs, and upbus subcommands and options that exist."""
    for words in simple_commands(line):
        program = Path(words[0]).name
        assert program in PROGRAMS, (
            f"{block.id}: add handling for `{program}` (PROGRAMS, or SPECIAL): {line}"
        )
    check_upbus_line(block, line)


def rewrite(line: str, sim: Simulator | None) -> str:
    """A line as it is run: the live simulator's URLs, bounded runs."""
    if sim is not None:
        line = _SIM_URL.sub(lambda m: sim.private_url if m["private"] else sim.public_url, line)
    if shell_tokens(line)[-1:] == ["&"]:
        return line  # in the background: the block stops it itself
    for subcommand, options in upbus_invocations(line):
        if subcommand in ("run", "demo") and "--seconds" not in options:
            line = re.sub(r"\bupbus((?:\s+-v+)?\s+(?:run|demo))\b", r"upbus\1 --seconds 3", line)
        if subcommand == "sim":
            stop = r"timeout -s TERM 2 upbus\1"
            line = re.sub(r"(?<![\w/.-])upbus((?:\s+-v+)?\s+sim)\b", stop, line)
        if subcommand == "gateway":
            # --foreground: the signal reaches the gateway once, not again through its group.
            stop = r"timeout --foreground -s TERM 6 upbus\1"
            line = re.sub(r"(?<![\w/.-])upbus((?:\s+-v+)?\s+gateway)\b", stop, line)
    return line


def parse_console(block: Block) -> list[tuple[str, list[str]]]:
    """(command, shown output lines) of each ``$`` line of a console block."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"{block.id}: output before the first `$ ` command"
            steps[-1][1].append(line)
    return steps


def check_shell(block: Block, special: Special | None, ctx: Context) -> None:
    console = block.lang == "console"
    if console:
        steps = parse_console(block)
    else:
        lines = block.text.splitlines()
        steps = [(ln, []) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    cwd = ctx.workdir(block)
    for name, source in special.files if special else ():
        target = cwd / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source == RECORDING:
            target.write_bytes((ctx.recording() / target.name).read_bytes())
        else:
            (found,) = [b for b in extract(block.path) if source in b.text and b is not block]
            target.write_text(found.text)

    exported: set[str] = set()
    runnable: list[tuple[str, list[str]]] = []
    for command, shown in steps:
        if is_install(command) or reaches_exchange(command, exported):
            check_unrun_line(block, command)
            continue
        if command.lstrip().startswith("export"):
            exported |= set(re.findall(r"\b(UPBUS_[A-Z0-9_]+)=", command))
        check_run_line(block, command)
        if re.fullmatch(r"cat \S+", command.strip()):  # the example shows the file it needs
            (cwd / command.split()[1]).write_text("\n".join(shown) + "\n")
        runnable.append((command, shown))
    then = special.then if special else None
    if then:
        assert not reaches_exchange(then, exported), then
        check_run_line(block, then)
    if not runnable:
        return

    uses_sim = any(_SIM_URL.search(command) for command, _ in runnable)
    env = clean_env(PYTHONUNBUFFERED="1")
    if "nats-server" in block.text:
        from natsserver import free_port, require_nats_server

        require_nats_server()
        # The page's port may be taken (by another block's server, still stopping): a free one.
        port = str(free_port())
        runnable = [(command.replace(NATS_PORT, port), shown) for command, shown in runnable]
    ran = _run_shell(block, special, ctx, cwd, runnable, exported, env, uses_sim, then)
    check_shell_output(block, special, cwd, runnable, exported, console, ran)


def _run_shell(
    block: Block,
    special: Special | None,
    ctx: Context,
    cwd: Path,
    runnable: list[tuple[str, list[str]]],
    exported: set[str],
    env: dict[str, str],
    uses_sim: bool,
    then: str | None,
) -> Ran:
    console = block.lang == "console"
    if special and special.installed:
        env["PYTHONPATH"] = ctx.pythonpath(special.installed)
    with ctx.simulator() if uses_sim else _nothing() as sim:
        apart = special is not None and special.stream == "stdout"
        script = ["trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
        script.append("exec 2>stderr.log" if apart else "exec 2>&1")
        if not console:
            script.append("set -e")
        for index, (command, _) in enumerate(runnable):
            script += [f"printf '\\n@@@ {index}\\n'", rewrite(command, sim)]
        script.append(f"printf '\\n@@@ {len(runnable)}\\n'")
        if not console and exported:
            script.append("upbus config")
        if then:
            script.append(then)
        (cwd / "block.sh").write_text("\n".join(script) + "\n")
        return run_bounded(["bash", "block.sh"], cwd, env)


def check_shell_output(
    block: Block,
    special: Special | None,
    cwd: Path,
    runnable: list[tuple[str, list[str]]],
    exported: set[str],
    console: bool,
    ran: Ran,
) -> None:
    output = ran.stdout
    assert "Traceback" not in output, f"{block.id}: a traceback:\n{output}"
    if not console:
        assert ran.returncode == 0, f"{block.id} exited {ran.returncode}:\n{output}"
    sections = re.split(r"^@@@ \d+\n", output, flags=re.MULTILINE)
    assert len(sections) == len(runnable) + 2, f"{block.id}: not every command ran:\n{output}"
    for (command, shown), printed in zip(runnable, sections[1:], strict=False):
        if not console:
            continue
        printed_lines = printed.strip("\n").splitlines()
        expected = "\n".join(shown)
        for old, new in special.replace if special else ():
            expected = expected.replace(old, new.format(cwd=cwd))
        mode = special.compare if special else "ordered"
        matcher = match_shape if mode == "shape" else match_ordered
        problem = matcher(expected.splitlines(), printed_lines) if shown or printed_lines else None
        assert problem is None, (
            f"{block.id}: `{command}` no longer prints what is shown: {problem}\n"
            f"--- printed:\n{printed}"
        )
    after = sections[-1]
    if not console and exported:
        for name in sorted(exported):
            assert f"environment variable {name}" in after, (
                f"{block.id}: `upbus config` does not show {name} as a source:\n{after}"
            )
    if special and special.expect:
        assert re.search(special.expect, output), f"{special.reason}; printed:\n{output}"


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


# -- toml, json, the rest ------------------------------------------------------------

SETTINGS_CHECK = """\
import sys

import upbus
from upbus.plugins.console import ConsoleSettings
from upbus.plugins.jsonl_recorder import JsonlSettings
from upbus.plugins.ma_cross import MaCrossSettings
from upbus.plugins.replay import ReplaySettings
from upbus.plugins.sqlite_store import SqliteSettings

sys.path.insert(0, sys.argv[1])  # the example plugin distribution
from upbus_spread_monitor import SpreadSettings

MODELS = {
    "console": ConsoleSettings,
    "jsonl": JsonlSettings,
    "ma_cross": MaCrossSettings,
    "replay": ReplaySettings,
    "sqlite": SqliteSettings,
    "spread_monitor": SpreadSettings,
}
settings = upbus.load_settings()
for name in sorted(settings.plugins):
    if name in MODELS:
        settings.plugin_section(name, MODELS[name])
        print("validated plugins." + name)
    else:
        print("free-form plugins." + name)
"""


def check_settings(block: Block, ctx: Context) -> None:
    data = tomllib.loads(block.text)
    cwd = ctx.workdir(block)
    env = clean_env()
    if "tool" in data:
        assert "upbus" in data["tool"], f"{block.id}: a pyproject.toml without [tool.upbus]"
        (cwd / "pyproject.toml").write_text(block.text)
    else:
        assert "project" not in data, f"{block.id}: not settings: add handling in SPECIAL"
        (cwd / "settings.toml").write_text(block.text)
        env["UPBUS_CONFIG"] = str(cwd / "settings.toml")
    (cwd / "check.py").write_text(SETTINGS_CHECK)
    ran = run_bounded([sys.executable, "check.py", str(EXAMPLE / "src")], cwd, env)
    assert ran.returncode == 0, f"{block.id}: the settings do not load:\n{ran.stderr}"
    assert not ran.stderr, ran.stderr


def check_excerpt(block: Block, special: Special) -> None:
    assert special.source is not None
    real = tomllib.loads((ROOT / special.source).read_text())

    def within(shown: Any, actual: Any, where: str) -> None:
        if isinstance(shown, dict):
            assert isinstance(actual, dict), f"{block.id}: {special.source} has no table {where}"
            for key, value in shown.items():
                assert key in actual, f"{block.id}: {special.source} has no {where}{key}"
                within(value, actual[key], f"{where}{key}.")
        else:
            assert shown == actual, f"{block.id}: {where} is {actual!r} in {special.source}"

    within(tomllib.loads(block.text), real, "")


def check_tree(block: Block, special: Special) -> None:
    root, *files = block.text.splitlines()
    assert special.source is not None
    for name in files:
        path = ROOT / special.source / root.strip() / name.strip()
        assert path.is_file(), f"{block.id}: {path.relative_to(ROOT)} does not exist"


def check_jsonl_line(block: Block, ctx: Context) -> None:
    lines = (ctx.recording() / "upbus.jsonl").read_text().splitlines()
    pattern = line_pattern(block.text.strip())
    assert any(pattern.fullmatch(line) for line in lines), (
        f"{block.id} matches no line of a recording, such as:\n{lines[:3]}"
    )


def check(block: Block, ctx: Context) -> None:
    kind = how(block)
    special = special_for(block)
    if kind in ("run", "fragment", "plugin", "pytest", "signal", "remote"):
        check_python(block, special, ctx, kind)
    elif kind == "nats-config":
        check_nats_config(block, ctx)
    elif kind == "shell":
        check_shell(block, special, ctx)
    elif kind == "settings":
        check_settings(block, ctx)
    elif kind == "json":
        json_documents(block.text)  # what it is the output of, if anything, compares it
    elif kind == "excerpt":
        assert special is not None
        check_excerpt(block, special)
    elif kind == "tree":
        assert special is not None
        check_tree(block, special)
    elif kind == "jsonl-line":
        check_jsonl_line(block, ctx)
    elif kind == "output":
        pass  # compared in the test of the python block before it
    elif kind == "doc-only":
        assert special is not None
        assert special.reason
    else:
        pytest.fail(f"{block.id}: unknown handling {kind!r}")


# -- the tests -----------------------------------------------------------------------


class Runs:
    """Every selected block's check, run a few at a time; each test waits for its own."""

    def __init__(self, ctx: Context, pool: ThreadPoolExecutor, blocks: list[Block]) -> None:
        self._futures: dict[str, Future[None]] = {
            block.id: pool.submit(check, block, ctx) for block in blocks
        }

    def wait(self, block: Block) -> None:
        self._futures[block.id].result()


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runs]:
    selected = [
        item.callspec.params["block"]
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.path == request.path
        and hasattr(item, "callspec")
        and "block" in item.callspec.params
    ]
    with start_blocking_portal() as portal:
        pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="docs")
        try:
            yield Runs(Context(portal, tmp_path_factory.mktemp("docs")), pool, selected)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_block(block: Block, runs: Runs) -> None:
    runs.wait(block)


def test_every_special_entry_names_one_block() -> None:
    for special in SPECIAL:
        matches = [
            b
            for b in BLOCKS
            if b.path == special.path
            and special.marker in b.text
            and special.lang in (None, b.lang)
        ]
        assert len(matches) == 1, f"SPECIAL {special.marker!r} in {special.path}: {matches}"
        assert special.reason


def test_loose_comparison_still_tells_a_difference() -> None:
    shown = ["ticker    KRW-BTC      146,889,000.00   -3.15%", "…", "stored 3 of 3 in x.db"]
    printed = ["ticker KRW-BTC 1.0 -0.01%", "a", "b", "stored 5 of 5 in x.db"]
    assert match_ordered(shown, printed) is None
    printed = ["ticker KRW-ETH 1.0 -0.01%", "stored 5 of 5 in x.db"]
    assert match_ordered(shown, printed) is not None
    assert match_ordered(["caught KeyError('mine')"], ["caught KeyError('yours')"]) is not None
    assert match_shape(["a 1", "b 2"], ["b 3", "a 4", "a 5"]) is None
    assert match_shape(["a 1", "b 2"], ["a 4", "a 5"]) is not None
    assert match_shape(["a 1"], ["a 4", "c 5"]) is not None
    assert compare_json('{"a": 1, "b": {"c": 2}}', '{"a": 3, "b": {"c": 4}}') is None
    assert compare_json('{"a": 1}', '{"a": 3, "new": 4}') is not None
