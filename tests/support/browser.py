"""Headless Chromium for the dashboard's tests and its screenshot: load a page, let its
scripts run, then read the DOM they left or take a picture of it.

Debian's `chromium` package, run as a subprocess (`bash .ci/run` installs it when it is
missing). `--virtual-time-budget` lets the page's timers run that many milliseconds of
virtual time, which waits for the page's own requests, then the DOM is dumped: so the
script has polled `/status.json` a few times before anything is read, with no sleep in the
test. Each run has its own profile folder, so runs never share state or lock each other.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome")
MISSING = (
    "headless Chromium is missing: install Debian's `chromium` package "
    "(`apt-get install -y chromium`; `bash .ci/run` does it when it is missing)"
)
# A stuck browser fails the run rather than hanging it.
RUN_TIMEOUT_S = 60.0


class ChromiumMissing(RuntimeError):
    """No Chromium on PATH."""


def find_chromium() -> str:
    """The Chromium executable, or ChromiumMissing saying how to install it."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise ChromiumMissing(MISSING)


async def _run(*arguments: str) -> bytes:
    """Run headless Chromium with `arguments` and a fresh profile; its stdout."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            find_chromium(),
            "--headless",
            "--no-sandbox",  # tests and CI run as root, where the sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *arguments,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    if process.returncode != 0:
        tail = err.decode(errors="replace")[-2000:]
        raise RuntimeError(f"chromium exited with {process.returncode}: {tail}")
    return out


async def dump_dom(url: str, *, budget_ms: int = 5000, size: tuple[int, int] = (1280, 900)) -> str:
    """The DOM of `url` after `budget_ms` of the page's virtual time, as HTML."""
    out = await _run(
        f"--virtual-time-budget={budget_ms}",
        f"--window-size={size[0]},{size[1]}",
        "--dump-dom",
        url,
    )
    return out.decode()


async def screenshot(
    url: str, path: Path, *, budget_ms: int = 5000, size: tuple[int, int] = (1280, 900)
) -> None:
    """A PNG of `url` after `budget_ms` of the page's virtual time, written to `path`."""
    await _run(
        f"--virtual-time-budget={budget_ms}",
        f"--window-size={size[0]},{size[1]}",
        f"--screenshot={path}",
        url,
    )
    if not await asyncio.to_thread(path.is_file):
        raise RuntimeError(f"chromium wrote no screenshot to {path}")


class Node:
    """An element of a dumped DOM: its tag, attributes, text and children."""

    def __init__(self, tag: str, attributes: dict[str, str], parent: Node | None) -> None:
        self.tag = tag
        self.attributes = attributes
        self.parent = parent
        self.children: list[Node] = []
        # Text and child elements in document order.
        self.items: list[str | Node] = []

    @property
    def text(self) -> str:
        """All text inside, in document order, whitespace squeezed."""
        return " ".join("".join(self._texts()).split())

    def _texts(self) -> list[str]:
        texts: list[str] = []
        for item in self.items:
            texts += [item] if isinstance(item, str) else item._texts()
        return texts

    def classes(self) -> set[str]:
        return set(self.attributes.get("class", "").split())

    def find_all(self, tag: str, cls: str | None = None, **attributes: str) -> list[Node]:
        """Descendants with `tag` (any: "*"), class `cls` and the attributes given."""
        found = []
        for child in self.children:
            if (
                (tag in ("*", child.tag))
                and (cls is None or cls in child.classes())
                and all(child.attributes.get(name) == value for name, value in attributes.items())
            ):
                found.append(child)
            found += child.find_all(tag, cls, **attributes)
        return found

    def find(self, tag: str, cls: str | None = None, **attributes: str) -> Node:
        """The one descendant that matches (AssertionError naming it otherwise)."""
        found = self.find_all(tag, cls, **attributes)
        assert len(found) == 1, f"{len(found)} <{tag} class={cls} {attributes}> in the page"
        return found[0]


VOID = frozenset(
    ("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr")
)


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = self._add(tag, attrs)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._add(tag, attrs)

    def _add(self, tag: str, attrs: list[tuple[str, str | None]]) -> Node:
        node = Node(tag, {name: value or "" for name, value in attrs}, self.current)
        self.current.children.append(node)
        self.current.items.append(node)
        return node

    def handle_endtag(self, tag: str) -> None:
        node: Node | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.items.append(data)


def parse(html: str) -> Node:
    """A dumped DOM as a tree of Nodes."""
    parser = _Parser()
    parser.feed(html)
    parser.close()
    return parser.root
