"""Declarative key tables: rename state-dict keys between openmae and another library.

A table is a list of :class:`Rule`. A rule pairs a template of openmae's names with one template of
the other library's names, or with several when openmae fuses tensors that the other library keeps
apart (HuggingFace splits `attn.qkv` into query, key and value): the fused tensor is cut into equal
chunks along dim 0 on the way out and concatenated on the way in. In a template, `{i}` stands for a
layer index; a template ending in "." names a module, and the rest of the key (`weight`, `bias`) is
carried over; any other template is a whole key. The first matching rule wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class Rule:
    """openmae's name template and the matching template(s) of the other library."""

    ours: str
    theirs: tuple[str, ...]


def rule(ours: str, *theirs: str) -> Rule:
    return Rule(ours, tuple(theirs))


@cache
def _pattern(template: str) -> re.Pattern:
    head, _, tail = template.partition("{i}")
    body = re.escape(head) + (r"(?P<i>\d+)" + re.escape(tail) if "{i}" in template else "")
    return re.compile("^" + body + ("(?P<rest>.*)$" if template.endswith(".") else "$"))


def _fill(template: str, match: re.Match) -> str:
    groups = match.groupdict()
    name = template.replace("{i}", groups["i"]) if "{i}" in template else template
    return name + (groups.get("rest") or "")


def to_theirs(state: dict[str, torch.Tensor], table: list[Rule], library: str) -> dict[str, torch.Tensor]:
    """openmae names -> the other library's names (splitting fused tensors)."""
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, tensor in state.items():
        found = next(((r, m) for r in table if (m := _pattern(r.ours).match(key))), None)
        if found is None:
            unmatched.append(key)
            continue
        r, match = found
        names = [_fill(t, match) for t in r.theirs]
        if len(names) > 1 and tensor.shape[0] % len(names):
            raise ValueError(f"cannot split {key} {list(tensor.shape)} into {len(names)} equal parts")
        out.update(zip(names, tensor.chunk(len(names), dim=0), strict=True))
    if unmatched:
        raise ValueError(f"no {library} name for these openmae weights: {unmatched[:8]}")
    return out


def to_ours(state: dict[str, torch.Tensor], table: list[Rule], library: str) -> dict[str, torch.Tensor]:
    """The other library's names -> openmae names (concatenating the parts of fused tensors)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    unmatched = []
    for key, tensor in state.items():
        found = next(
            ((r, j, m) for r in table for j, t in enumerate(r.theirs) if (m := _pattern(t).match(key))),
            None,
        )
        if found is None:
            unmatched.append(key)
            continue
        r, j, match = found
        name = _fill(r.ours, match)
        if len(r.theirs) == 1:
            out[name] = tensor
        else:
            fused.setdefault(name, [None] * len(r.theirs))[j] = tensor
    if unmatched:
        raise ValueError(f"unknown {library} weights (not in openmae's key table): {unmatched[:8]}")
    for name, parts in fused.items():
        if any(p is None for p in parts):
            raise ValueError(f"{library} checkpoint has only some of the parts that make up {name}")
        out[name] = torch.cat(parts, dim=0)
    return out
