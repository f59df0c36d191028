"""Bytes and seconds as people read them: every memory message and the plan's table."""

GB = 1e9


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(t: float) -> str:
    if t >= 3600:
        return f"{t / 3600:.1f} h"
    return f"{t / 60:.1f} min" if t >= 60 else f"{t:.1f} s"
