"""The pinned versions (`config/constraints.txt`), and how the installed packages differ from them.

The Makefile installs with these constraints and the Modal image installs these pins, so the
suite and the containers run the same versions; `podembed doctor` shows any drift.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from config.errors import ConfigError

CONSTRAINTS = Path(__file__).with_name("constraints.txt")


def pinned(path: Path = CONSTRAINTS) -> dict[str, str]:
    """Package name -> pinned version, in the file's order."""
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, pin = line.partition("==")
        if not sep or not name.strip() or not pin.strip():
            raise ConfigError(f"{path}:{number}: {line!r} is not NAME==VERSION")
        pins[name.strip()] = pin.strip()
    return pins


def requirements(pins: dict[str, str]) -> list[str]:
    """The pins as pip requirements (`name==version`)."""
    return [f"{name}=={pin}" for name, pin in pins.items()]


def drift(pins: dict[str, str]) -> list[str]:
    """One line per package whose installed version is not its pin (a local label such as "+cpu" aside)."""
    lines = []
    for name, pin in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            lines.append(f"{name} not installed (pinned {pin})")
            continue
        if installed.split("+", 1)[0] != pin:
            lines.append(f"{name} {installed} installed, {pin} pinned")
    return lines
