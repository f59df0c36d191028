"""Bytes and seconds as people read them: every message, the plan's table and the card."""

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


def fmt_duration(seconds: float) -> str:
    """A run's length to the second: "12 min 05 s", "1 h 02 min"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
