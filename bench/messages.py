"""The messages the load generator sends (a module of its own: bench.load patches the process for gevent)."""

FILLER = " lorem ipsum dolor sit amet"


def padded(message: str, size: int) -> str:
    """`message` with words added up to `size` bytes (unchanged when it is already that long)."""
    missing = max(size - len(message), 0)
    return message + (FILLER * (missing // len(FILLER) + 1))[:missing]
