"""Fenced code blocks of the documentation, and loose comparison of shown output.

``test_docs.py`` runs every block this module finds; keeping the parsing here keeps
that file about what is run and how.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every file whose code blocks are run.
DOC_FILES = (
    "README.md",
    "README.ko.md",
    "CONTRIBUTING.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
    "examples/upbus-spread-monitor/README.md",
)

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts (the opening fence's line, 1-based) and its text."""

    path: str
    line: int
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    def __str__(self) -> str:
        return self.id


def extract(path: str) -> list[Block]:
    """The fenced blocks of one file, in order."""
    blocks: list[Block] = []
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        info = match["info"].strip()
        lang = info.split()[0].lower() if info else ""
        start, body = i + 1, []
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if (
                close is not None
                and close["fence"][0] == fence[0]
                and len(close["fence"]) >= len(fence)
                and not close["info"].strip()
            ):
                break
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        else:
            raise ValueError(f"{path}:{start}: unclosed code block")
        i += 1
        blocks.append(Block(path, start, lang, "\n".join(body) + "\n"))
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in DOC_FILES for block in extract(path)]


def is_output(block: Block) -> bool:
    """A block that shows output or data rather than something to run."""
    return block.lang in ("", "text")


def output_after(blocks: list[Block], block: Block) -> Block | None:
    """The output shown right after ``block``: the next block, if untagged, text or JSON."""
    index = blocks.index(block)
    if index + 1 < len(blocks):
        after = blocks[index + 1]
        if is_output(after) or after.lang == "json":
            return after
    return None


# --- loose comparison -----------------------------------------------------------------

ELLIPSIS = "…"
# What varies from run to run: numbers (prices, counts, times, ports), object ids.
_NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
_HEX_ID = re.compile(r"@[0-9a-f]{6,}")


def line_pattern(expected: str) -> re.Pattern[str]:
    """A regular expression for one shown line: numbers, ids and ``…`` are wildcards.

    ``…`` stands for any text, with the hex digits right before it (a shortened uuid);
    runs of spaces match any run of spaces (columns shift with the numbers' widths).
    """
    pattern = []
    pos = 0
    tokens = re.compile(
        rf"(?P<ell>[0-9a-f-]*{ELLIPSIS})|(?P<hex>{_HEX_ID.pattern})|(?P<num>{_NUMBER.pattern})"
        r"|(?P<sp> +)"
    )
    for match in tokens.finditer(expected):
        pattern.append(re.escape(expected[pos : match.start()]))
        if match["hex"]:
            pattern.append(r"@[0-9a-f]+")
        elif match["num"]:
            pattern.append(r"[-+]?[\d,]+(?:\.\d+)?(?:e[-+]?\d+)?")
        elif match["ell"]:
            pattern.append(r".*?")
        else:
            pattern.append(r" +")
        pos = match.end()
    pattern.append(re.escape(expected[pos:]))
    return re.compile("".join(pattern))


def _is_ellipsis_line(line: str) -> bool:
    return line.strip() == ELLIPSIS


def match_ordered(expected: list[str], actual: list[str]) -> str | None:
    """Every shown line matches the actual one in its place; a line ``…`` stands for any.

    Returns None on a match, else what differs.
    """
    patterns = [None if _is_ellipsis_line(e) else line_pattern(e.rstrip()) for e in expected]
    actual = [a.rstrip() for a in actual]

    def fit(p: int, a: int) -> bool:
        if p == len(patterns):
            return a == len(actual)
        pattern = patterns[p]
        if pattern is None:
            return any(fit(p + 1, b) for b in range(a, len(actual) + 1))
        return a < len(actual) and pattern.fullmatch(actual[a]) is not None and fit(p + 1, a + 1)

    if fit(0, 0):
        return None
    for e, a in zip(expected, actual, strict=False):
        if _is_ellipsis_line(e):
            break
        if not line_pattern(e.rstrip()).fullmatch(a.rstrip()):
            return f"shown line {e!r} does not match {a!r}"
    return f"{len(expected)} line(s) shown, {len(actual)} printed"


def match_shape(expected: list[str], actual: list[str]) -> str | None:
    """Loosely, for output whose order and length vary (live prices, log interleaving).

    Every printed line matches some shown line, and every shown line (``…`` aside) is
    matched by some printed line. Returns None on a match, else what differs.
    """
    patterns = [line_pattern(e.rstrip()) for e in expected if not _is_ellipsis_line(e)]
    actual = [a.rstrip() for a in actual]
    if not actual:
        return "nothing printed"
    for line in actual:
        if not any(p.fullmatch(line) for p in patterns):
            return f"printed line {line!r} matches no shown line"
    for shown, pattern in zip(
        [e for e in expected if not _is_ellipsis_line(e)], patterns, strict=True
    ):
        if not any(pattern.fullmatch(line) for line in actual):
            return f"shown line {shown!r} was not printed"
    return None
