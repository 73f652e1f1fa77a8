"""Webdataset tar shards: `write_shards` (what `mae shards` runs) and `WebDatasetFeed`, which trains on them.

A shard is a tar file of samples, each a few files that share a key (the webdataset convention):
`<key>.jpg` (or .png, .webp... the image file's bytes, not re-encoded) and, for a folder with
class sub-folders, `<key>.cls` (the class index as text). Beside the shards, a manifest JSON holds
the sample count of every shard, the class names and the total: the feed plans each epoch from
the counts (see `openmae.data.stream`), so the shards are split exactly among ranks and workers.

Shards written by other tools work too: without a manifest, local tar files are counted by
reading their headers (the image bytes are skipped); remote ones (URLs) need a manifest.
"""

from __future__ import annotations

import json
import os
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from openmae import extras
from openmae.data.folder import find_images, has_class_folders, list_classes
from openmae.data.images import IMAGE_EXTENSIONS
from openmae.data.stream import Record, StreamFeed
from openmae.errors import UsageError

MANIFEST_FORMAT = "openmae-shards"
IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)  # jpg, jpeg, png, webp, bmp, gif, tif, tiff
_SIZE_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30}
_FIELD = re.compile(r"%0?\d*d")  # the shard number's place in an output pattern, printf style


def parse_size(text: str) -> int:
    """`"1GB"` -> 10**9, `"500MB"`, `"64MiB"`, `"2e9"`, `"1.5G"` (decimal units; `Ki`, `Mi`, `Gi` binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMGT]I?)?B?\s*", text, re.IGNORECASE)
    if match is None or (size := float(match[1]) * _SIZE_UNITS[(match[2] or "").upper()]) < 1:
        raise UsageError(f"bad size {text!r}: write a number with an optional unit, e.g. 1GB, 500MB, 64MiB")
    return int(size)


def manifest_path(pattern: str) -> Path:
    """The manifest beside shards named by `pattern` (`out/train-%06d.tar`, `out/train-{000..009}.tar`):
    the file name's part before the shard number, e.g. `out/train.json` (`shards.json` if none)."""
    path = Path(pattern)
    stem = re.split(r"[%{]", path.name, maxsplit=1)[0].rstrip("-_.") or "shards"
    return path.parent / f"{stem}.json"


@dataclass(frozen=True)
class ShardStats:
    """What `write_shards` wrote."""

    manifest: Path
    shards: int
    samples: int
    classes: list[str]


def write_shards(
    folder: str | Path,
    pattern: str,
    shard_size: int = 10**9,
    max_count: int = 100_000,
    shuffle: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardStats:
    """Write the images under `folder` (flat, or class sub-folders) into tar shards named by `pattern`
    (`out/train-%06d.tar`) and a manifest beside them (`manifest_path`).

    Each image file's bytes are stored as they are. A shard closes when it holds `max_count`
    samples or `shard_size` bytes of files. `shuffle` writes the samples in a seeded random
    order, so that each shard mixes classes (the reader's shuffle buffer only mixes nearby ones).

    Raises:
        UsageError: no such folder, no images in it, a pattern without a shard number, or shards
            already there (without `overwrite`): all checked before anything is written.
    """
    wds = extras.require("webdataset")
    files, labels, classes = _scan_folder(Path(folder))
    existing = _existing_shards(pattern)
    manifest = manifest_path(pattern)
    if (existing or manifest.exists()) and not overwrite:
        found = existing[0] if existing else manifest
        raise UsageError(f"{found} already exists; pass --overwrite to replace the shards")
    if max_count < 1:
        raise UsageError(f"--max-count must be at least 1, got {max_count}")
    order = list(range(len(files)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for path in existing:
        path.unlink()  # stale shards of an earlier, longer run would join the pattern
    manifest.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    keys = _keys(files, Path(folder))
    # PAX headers: long and non-ASCII names; mtime 0: the same folder gives the same bytes.
    writer = wds.ShardWriter(
        pattern, maxcount=max_count, maxsize=shard_size, verbose=0, mtime=0, format="PAX_FORMAT"
    )
    with writer as sink:
        for i in tqdm(order, desc="writing shards", unit="image", disable=not progress):
            sample = {"__key__": keys[i], files[i].suffix.lower().lstrip("."): files[i].read_bytes()}
            if labels[i] >= 0:
                sample["cls"] = str(labels[i]).encode()
            sink.write(sample)
            counts[sink.fname] = counts.get(sink.fname, 0) + 1
    names = [Path(name).name for name in counts]
    _write_manifest(manifest, pattern, names, list(counts.values()), classes, Path(folder))
    return ShardStats(manifest, len(names), len(files), classes)


def _scan_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files, their labels (class sub-folder index, or -1) and the class names."""
    if not folder.is_dir():
        raise UsageError(f"image folder not found: {folder}")
    if has_class_folders(folder):
        classes = list_classes(folder)
        files, labels = [], []
        for index, name in enumerate(classes):
            found = find_images(folder / name)
            files += found
            labels += [index] * len(found)
    else:
        classes, files = [], find_images(folder)
        labels = [-1] * len(files)
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    return files, labels, classes


def _keys(files: Sequence[Path], root: Path) -> list[str]:
    """Sample keys: the relative path without its extension, dots made `_` (webdataset splits a file
    name at its first dot into key and extension), made unique with a number where needed."""
    keys, used = [], set()
    for path in files:
        key = path.relative_to(root).with_suffix("").as_posix().replace(".", "_")
        unique, n = key, 1
        while unique in used:
            n += 1
            unique = f"{key}_{n}"
        used.add(unique)
        keys.append(unique)
    return keys


def _existing_shards(pattern: str) -> list[Path]:
    """Files that the output pattern names (any shard number)."""
    path = Path(pattern)
    if len(_FIELD.findall(path.name)) != 1 or _FIELD.search(str(path.parent)):
        raise UsageError(
            f"output pattern {pattern!r} needs one shard number in its file name, e.g. out/train-%06d.tar"
        )
    name = re.compile(re.escape(_FIELD.sub("\0", path.name)).replace("\0", r"\d+") + "$")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if name.match(p.name))


def _write_manifest(
    path: Path, pattern: str, names: list[str], counts: list[int], classes: list[str], source: Path
) -> None:
    number = _FIELD.search(Path(pattern).name)[0]
    first, last = number % 0, number % (len(names) - 1)
    brace = _FIELD.sub(f"{{{first}..{last}}}" if len(names) > 1 else first, Path(pattern).name)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "pattern": brace,  # relative to the manifest's folder
        "shards": [{"name": n, "count": c} for n, c in zip(names, counts, strict=True)],
        "total": sum(counts),
        "classes": classes,
        "source": str(source.resolve()),
    }
    path.write_text(json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class TarShards:
    """Tar shards (paths or URLs) with their sample counts: a `ShardSource` for `StreamFeed`."""

    names: list[str]
    counts: list[int]
    classes: list[str]

    @classmethod
    def open(cls, shards: str | Sequence[str], manifest: str | Path | None = None) -> TarShards:
        """The shards of a manifest (a .json file, or a folder holding one), or of a brace pattern /
        `::`-joined string / list of paths and URLs, counted by the manifest beside them (or the one
        given) or, for local files without one, by reading their tar headers.

        Raises:
            UsageError: missing files, no manifest for remote shards, or an unreadable manifest.
        """
        wds = extras.require("webdataset")
        if isinstance(shards, str | Path) and (Path(shards).suffix == ".json" or Path(shards).is_dir()):
            return cls._from_manifest(_find_manifest(Path(shards)))
        names = wds.shardlists.expand_urls(str(shards)) if isinstance(shards, str | Path) else list(shards)
        if not names:
            raise UsageError(f"no shards in {shards!r}")
        if manifest is None and isinstance(shards, str | Path) and manifest_path(str(shards)).is_file():
            manifest = manifest_path(str(shards))
        if manifest is not None:
            known = cls._from_manifest(_find_manifest(Path(manifest)))
            by_name = {Path(n).name: c for n, c in zip(known.names, known.counts, strict=True)}
            missing = [n for n in names if Path(n).name not in by_name]
            if missing:
                raise UsageError(f"shard {missing[0]} is not in the manifest {manifest}")
            return cls(names, [by_name[Path(n).name] for n in names], known.classes)
        remote = next((n for n in names if _is_url(n)), None)
        if remote is not None:
            raise UsageError(f"{remote}: remote shards need a manifest (data.manifest) with their counts")
        return cls(names, [count_tar_samples(n) for n in _check_files(names)], [])

    @classmethod
    def _from_manifest(cls, path: Path) -> TarShards:
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"not an {MANIFEST_FORMAT} manifest")
            names = [str(path.parent / s["name"]) for s in manifest["shards"]]
            counts = [int(s["count"]) for s in manifest["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UsageError(f"cannot read the shard manifest {path}: {error}") from None
        return cls(_check_files(names), counts, list(manifest.get("classes", [])))

    def read(self, shard: int) -> Iterator[Record]:
        """The records of one shard in stored order (webdataset's tar reader; no decoding).

        A damaged or vanished shard warns and ends early; the feed counts its missing samples as
        unreadable, so training goes on with the same number of batches.
        """
        wds = extras.require("webdataset")
        url = self.names[shard]
        with wds.gopen(url, "rb") as stream:  # closed when the feed stops reading, not at collection
            files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], wds.warn_and_stop)
            for sample in wds.tariterators.group_by_keys(files, handler=wds.warn_and_stop):
                image_key = next((k for k in IMAGE_KEYS if k in sample), None)
                label = int(sample["cls"]) if "cls" in sample else -1
                data = None if image_key is None else sample[image_key]
                yield Record(data, f"{url}:{sample['__key__']}", label)


def count_tar_samples(path: str | Path) -> int:
    """Distinct sample keys in a local tar file, from its headers (member data is skipped, not read)."""
    wds = extras.require("webdataset")
    keys = set()
    with tarfile.open(path) as tar:
        for member in tar:
            key, _ = wds.tariterators.base_plus_ext(member.name)
            if member.isreg() and key is not None and not member.name.startswith("__"):
                keys.add(key)
    return len(keys)


def _find_manifest(path: Path) -> Path:
    if path.is_dir():
        found = sorted(p for p in path.glob("*.json") if _is_manifest(p))
        if len(found) != 1:
            raise UsageError(f"{path}: expected one shard manifest (.json) in the folder, found {len(found)}")
        return found[0]
    if not path.is_file():
        raise UsageError(f"shard manifest not found: {path}")
    return path


def _is_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_url(name: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*://", name) is not None or name.startswith("pipe:")


def _check_files(names: list[str]) -> list[str]:
    missing = next((n for n in names if not _is_url(n) and not os.path.isfile(n)), None)
    if missing is not None:
        raise UsageError(f"shard not found: {missing}")
    return names


class WebDatasetFeed(StreamFeed):
    """A `TrainFeed` over webdataset tar shards: exactly-once epochs split over ranks and workers,
    seeded shard shuffle and shuffle buffer, replayable from any step (see `openmae.data.stream`).

    Args:
        shards: a manifest, a brace pattern, a `::`-joined string or a list of paths / URLs (see
            `TarShards.open`).
        item: decodes and augments a record under its seed (`DecodedItem`).
        manifest: the manifest for shards given by pattern or list, when it is not beside them.
        **feed: `StreamFeed`'s options (batch_size, accum_iter, seed, rank, world_size,
            num_workers, shuffle_buffer, epoch_images...).
    """

    def __init__(self, shards: str | Sequence[str], item, manifest: str | Path | None = None, **feed) -> None:
        self.shards = TarShards.open(shards, manifest)
        super().__init__(self.shards, item, **feed)

    @property
    def classes(self) -> list[str]:
        return self.shards.classes
