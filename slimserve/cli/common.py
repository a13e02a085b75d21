"""What several command groups share."""

from slimserve.config import DEFAULT_CONFIG


def add_config(command, text: str = "config file") -> None:
    command.add_argument("--config", default=DEFAULT_CONFIG, help=f"{text} (default: %(default)s)")


def size_text(size: int) -> str:
    """A size as people read it: KiB below a MiB, MiB below a GiB, GiB above."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 2**10:.1f} KiB"


def counted(count: int, noun: str) -> str:
    """`1 model`, `3 models`."""
    return f"{count} {noun}{'s' * (count != 1)}"


def files_text(count: int, size: int) -> str:
    """`3 files, 2.4 GiB`: what a model version holds."""
    return f"{counted(count, 'file')}, {size_text(size)}"
