"""YAML configs shipped with openmae: `mae pretrain --config NAME` finds them by name."""

from __future__ import annotations

from pathlib import Path

from openmae.errors import UsageError

CONFIG_DIR = Path(__file__).parent


def list_shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def shipped_config(name_or_path: str | Path) -> Path:
    """A path as given if it exists, else the shipped config of that name (with or without .yaml);
    `UsageError` when neither exists."""
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = CONFIG_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if candidate.exists():
        return candidate
    raise UsageError(
        f"config file {str(name_or_path)!r} not found, nor a shipped config of that name "
        f"({', '.join(list_shipped_configs())})"
    )
