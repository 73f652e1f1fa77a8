"""YAML configs shipped with openmae: `mae pretrain --config NAME` finds them by name."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent


def list_shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def shipped_config(name_or_path: str | Path) -> Path:
    """A path as given if it exists, else the shipped config of that name (with or without .yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = CONFIG_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if candidate.exists():
        return candidate
    raise FileNotFoundError(
        f"config {name_or_path} not found; shipped configs: {', '.join(list_shipped_configs())}"
    )
