"""YAML configs shipped with openmae: `mae pretrain --config NAME` finds them by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from openmae.errors import UsageError

CONFIG_DIR = Path(__file__).parent


def list_shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def shipped_config(name_or_path: str | Path) -> Path:
    """A path as given if it exists, else the shipped config of that name (with or without .yaml);
    `UsageError` when neither exists."""
    return find_yaml(name_or_path, CONFIG_DIR, "config", list_shipped_configs)


def find_yaml(name_or_path: str | Path, folder: Path, what: str, shipped: Callable[[], list[str]]) -> Path:
    """A YAML file as given if it is one, else the one of that name (with or without .yaml) in
    `folder`; `UsageError` naming the `shipped()` choices when neither exists."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = folder / f"{path.name.removesuffix('.yaml')}.yaml"
    if candidate.is_file():
        return candidate
    names = ", ".join(shipped())
    raise UsageError(f"{what} {str(name_or_path)!r} not found (a YAML file, or a shipped {what}: {names})")
