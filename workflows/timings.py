"""Where a command's wall time goes: its phases from the process start to the last line printed.

The merge records its own phases (MergeReport.timings, also in the manifest); this adds what lies
outside them: start-up (the interpreter up to the command), the imports of torch and the engine,
reading the config, tracking and the printed summary, and names the remainder, so the line sums
to the wall time a scheduler sees.
"""

from __future__ import annotations

import os
import time

# Merge phases as printed, in order; lora_out runs inside commit and is shown apart.
PHASES = (
    ("imports", "imports"),
    ("config", "config"),
    ("plan", "plan"),
    ("ray_start", "ray start"),
    ("method_passes", "method passes"),
    ("merge", "merge"),
    ("select_scale", "selection"),
    ("commit", "commit"),
    ("lora_out", "lora out"),
    ("tracking", "tracking"),
    ("summary", "summary"),
)


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc), None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time after boot, in ticks
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def breakdown(timings: dict[str, float], startup: float, wall: float) -> list[tuple[str, float]]:
    """(label, seconds) of every phase that took time, then `other`: together exactly `wall`."""
    own = dict(timings)
    if "lora_out" in own and "commit" in own:
        own["commit"] = max(0.0, own["commit"] - own["lora_out"])
    parts = [("start-up", startup)] + [(label, own[key]) for key, label in PHASES if own.get(key)]
    parts.append(("other", max(0.0, wall - sum(s for _, s in parts))))
    return parts


def wall_line(timings: dict[str, float], startup: float, wall: float) -> str:
    parts = ", ".join(f"{label} {seconds:.1f}" for label, seconds in breakdown(timings, startup, wall))
    return f"wall        {wall:.1f}s = {parts}"
