"""Where a worker's time goes: pyinstrument's frame tree as collapsed stacks, and
a summary of collapsed stacks (from pyinstrument or py-spy) by layer and function.
"""

from __future__ import annotations

from typing import Any, Final


def collapse(root: Any) -> str:
    """A pyinstrument frame tree as collapsed stacks (py-spy's raw format), in µs."""
    lines: list[str] = []

    def name(frame: Any) -> str:
        qualified = f"{frame.class_name}.{frame.function}" if frame.class_name else frame.function
        path = str(frame.file_path_short)
        cut = path.rfind("/clstr/")  # an editable install shows absolute paths
        return f"{qualified} ({path[cut + 1 :] if cut >= 0 else path})"

    def walk(frame: Any, path: str) -> None:
        here = f"{path};{name(frame)}" if path else name(frame)
        own = frame.time - sum(c.time for c in frame.children if not c.is_synthetic)
        if own > 0:
            lines.append(f"{here} {round(own * 1e6)}")
        for child in frame.children:
            if not child.is_synthetic:
                walk(child, here)

    if root is not None:
        walk(root, "")
    return "\n".join(lines) + "\n"


# What an event loop calls while it waits for I/O: idle, not work.
_IDLE_LEAVES: Final = ("epoll.poll", "select", "kqueue.control", "EpollSelector.select (")


def _area(frame: str) -> str:
    """Which layer a py-spy frame (``function (path)``) belongs to."""
    path = frame[frame.rfind("(") + 1 : -1]
    for prefix, area in (
        ("clstr/bench", "benchmark driver"),
        ("clstr/", "clstr"),
        ("nats/", "nats-py"),
        ("asyncio/", "asyncio"),
        ("msgpack", "msgpack"),
        ("<built-in>", "C built-ins (socket, clock, loop lookups)"),
    ):
        if path.startswith(prefix):
            return area
    return "other"


def summarise_profile(collapsed: str, top: int = 25) -> str:
    """Where the time goes, from py-spy's raw (collapsed) stacks.

    Reports the share of busy samples by layer (self time), and the top
    functions by self and by total (inclusive) time, in percent. Samples
    taken while importing (start-up, not the request path) are left out.
    """
    self_time: dict[str, int] = {}
    total_time: dict[str, int] = {}
    areas: dict[str, int] = {}
    samples = imports = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if "(<frozen importlib._bootstrap>)" in stack:
            imports += count
            continue
        frames = stack.split(";")
        if frames[-1].startswith(_IDLE_LEAVES):
            continue
        samples += count
        leaf = frames[-1]
        self_time[leaf] = self_time.get(leaf, 0) + count
        areas[_area(leaf)] = areas.get(_area(leaf), 0) + count
        for frame in set(frames):
            total_time[frame] = total_time.get(frame, 0) + count
    if not samples:
        return "no samples\n"

    def table(counts: dict[str, int], limit: int) -> list[str]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:limit]
        return [f"  {100 * n / samples:5.1f}%  {name}" for name, n in ranked]

    return "\n".join(
        [
            f"busy: {samples} (py-spy: samples; pyinstrument: microseconds); "
            f"waiting for I/O and {imports} of imports left out",
            "",
            "self time by layer:",
            *table(areas, 10),
            "",
            "top functions by self time:",
            *table(self_time, top),
            "",
            "top functions by total time (inclusive):",
            *table(total_time, top),
            "",
        ]
    )
