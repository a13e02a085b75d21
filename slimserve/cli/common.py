"""What several command groups share."""

from slimserve.config import DEFAULT_CONFIG


def add_config(command, text: str = "config file") -> None:
    command.add_argument("--config", default=DEFAULT_CONFIG, help=f"{text} (default: %(default)s)")
