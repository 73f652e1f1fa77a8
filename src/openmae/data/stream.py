"""Streaming training data: micro-batches read in order from shards, replayable from any step.

A map-style dataset is shuffled by index (`SeededSampler`); shards (tar files, parquet files) are
read front to back, so the order is planned per epoch instead, from the shards' sample counts:

1. The shards are shuffled (seeded by run seed + epoch) and laid end to end.
2. That sequence is cut into consecutive *lanes*, one per (rank, loader worker), of exactly the
   images the lane must deliver: every sample is read by one lane, every rank gets the same number
   of micro-batches (no rank waits at an all-reduce for one that ran out), and the epoch has an
   explicit length, `epoch_images`, a multiple of the global batch (the rest of the shards is left
   out of the epoch, as `drop_last` does; the shard shuffle leaves out other samples each epoch).
   A shard on a lane boundary is read by both lanes, each keeping its part: the second one reads
   (without decoding) the samples before its part, at most one shard per lane and epoch.
3. Each lane shuffles its samples through a buffer of `shuffle_buffer` samples. The order the
   buffer produces depends only on the lane's length and seed, so it is computed up front
   (`buffer_shuffle_order`) and the reading holds at most a buffer's worth of encoded samples.
4. Micro-batch k of rank r comes from lane k mod L (L lanes per rank, one per worker), and its
   image j gets the position (k * B + j) * R + r and `sample_seed(run_seed, epoch, position)`,
   as the map-style path numbers positions. The seed drives the augmentation and masking noise.

With repeated views (`views = k`, see `data.sampler`) a micro-batch of B samples is B / k images
times k views, view v of the image at position p seeded by sample position p k + v; an epoch keeps
its length in samples, so it reads 1/k of the images, and k epochs make a pass: one shard shuffle
(seeded by run seed + pass), laid end to end and cut into the lanes of its k epochs in turn.

Resuming at image `start` of an epoch (a multiple of the global batch) replays exactly the
remaining micro-batches, with the same samples and seeds, of the uninterrupted epoch: each lane
knows how many of its outputs are done, so it does not open a shard whose samples are all done;
in the shard where it resumes it reads (without decoding) the samples before the first one still
needed, and the samples it has not output yet are read, and decoded, as in the uninterrupted run.
That replay holds for the same shards, world size, workers and batch size; with other ones the
epoch resumes at the same image count but the split differs.

The two multi-GPU pitfalls of webdataset pipelines (as timm users meet them) do not arise: ranks
are split here, from torch.distributed's rank and world size (or given ones), so no
`nodesplitter` is needed and no rank reads another's shards; and nothing asks an iterable
dataset for its `len()`: the epoch length and the micro-batches per rank (`batches_per_epoch`)
are computed from the counts, the same on every rank.

The loader workers start for each epoch (`batches`), with the epoch's plan, and `close` stops
them; a worker that is assigned no lane ends at once.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from openmae.data.feed import MicroBatch
from openmae.data.folder import UnreadableImageWarning
from openmae.data.images import UnreadableImageError
from openmae.data.sampler import collate_seeded, sample_seed, view_seeds
from openmae.distributed import ignore_sigterm
from openmae.errors import UsageError


class Record(NamedTuple):
    """A sample as stored: its encoded image (None when the shard holds none) and label (-1: none)."""

    data: bytes | str | None  # encoded bytes, or a path to the image file
    name: str  # where it comes from, for messages
    label: int


class ShardSource(Protocol):
    """Shards whose sample counts are known up front (from a manifest or file metadata)."""

    names: list[str]
    counts: list[int]

    def read(self, shard: int) -> Iterator[Record]:
        """The records of shard `shard`, in stored order (no decoding)."""
        ...


class Segment(NamedTuple):
    """Samples [begin, end) of one shard, in stored order."""

    shard: int
    begin: int
    end: int


def lane_sizes(epoch_images: int, batch_size: int, world_size: int, lanes: int, views: int = 1) -> list[int]:
    """Images per lane in one epoch of `epoch_images` samples, lanes numbered rank * lanes + lane
    (lane = micro-batch mod lanes); a micro-batch of `batch_size` samples holds batch_size / views images."""
    per_rank = epoch_images // (batch_size * world_size)  # micro-batches of each rank
    per_lane = [len(range(lane, per_rank, lanes)) * (batch_size // views) for lane in range(lanes)]
    return per_lane * world_size


def plan_lanes(counts: Sequence[int], order: Sequence[int], sizes: Sequence[int]) -> list[list[Segment]]:
    """Cut the shards, laid end to end in `order`, into consecutive lanes of `sizes` samples."""
    if sum(sizes) > sum(counts):
        raise ValueError(f"{sum(sizes)} samples planned from shards holding {sum(counts)}")
    plans: list[list[Segment]] = []
    shards = iter(order)
    shard, begin = -1, 0
    left = 0  # samples of the current shard not yet given to a lane
    for size in sizes:
        lane = []
        while size > 0:
            if left == 0:
                shard, begin = next(shards), 0
                left = counts[shard]
                continue
            take = min(size, left)
            lane.append(Segment(shard, begin, begin + take))
            begin, left, size = begin + take, left - take, size - take
        plans.append(lane)
    return plans


def buffer_shuffle_order(length: int, buffer: int, generator: torch.Generator) -> list[int]:
    """The output order of a shuffle buffer over inputs 0..length-1, as input indices.

    The buffer fills with the first `buffer` inputs; then each input replaces a uniformly drawn
    buffered one, which is output; at the end the buffer is output in random order. So the
    reading never holds more than `buffer` inputs not yet output. `buffer` <= 1 keeps the order.
    """
    if buffer <= 1 or length <= 1:
        return list(range(length))
    size = min(buffer, length)
    slots = list(range(size))
    picks = torch.randint(size, (length - size,), generator=generator).tolist()
    order = []
    for incoming, slot in zip(range(size, length), picks, strict=True):
        order.append(slots[slot])
        slots[slot] = incoming
    order.extend(slots[i] for i in torch.randperm(size, generator=generator).tolist())
    return order


def lane_records(
    source: ShardSource, lane: Sequence[Segment], order: Sequence[int], done: int
) -> Iterator[Record | None]:
    """The lane's records in shuffled `order`, from its output `done` on (None: missing from its shard).

    Shards whose samples were all output before `done` are not opened; records read but already
    output are dropped undecoded.
    """
    wanted = order[done:]
    if not wanted:
        return
    first = min(wanted)
    already = {i for i in order[:done] if i > first}
    inputs = _read_lane(source, lane, first)
    pending: dict[int, Record | None] = {}
    for index in wanted:
        while index not in pending:
            got, record = next(inputs)
            if got not in already:
                pending[got] = record
        yield pending.pop(index)


def _read_lane(
    source: ShardSource, lane: Sequence[Segment], first: int
) -> Iterator[tuple[int, Record | None]]:
    """`(lane input index, record)` from input `first` on; a shard that ends early gives None."""
    offset = 0
    for segment in lane:
        length = segment.end - segment.begin
        if offset + length <= first:  # all output before the resume point: not opened
            offset += length
            continue
        skip = segment.begin + max(first - offset, 0)  # in shard order: before it, not needed
        seen = 0
        with contextlib.closing(source.read(segment.shard)) as records:  # closes the shard's file
            for record in records:
                if seen == segment.end:
                    break
                if seen >= skip:
                    yield offset + seen - segment.begin, record
                seen += 1
        if seen < segment.end:
            warnings.warn(
                f"shard {source.names[segment.shard]} ended after {seen} samples, "
                f"{source.counts[segment.shard]} expected: the rest count as unreadable",
                UnreadableImageWarning,
                2,
            )
            for missing in range(max(seen, skip), segment.end):
                yield offset + missing - segment.begin, None
        offset += length


@dataclass(frozen=True)
class Layout:
    """Who reads what: this rank of `world_size`, `lanes` loader lanes per rank, micro-batch size
    in samples, and views per image."""

    rank: int
    world_size: int
    lanes: int
    batch_size: int
    views: int = 1

    @property
    def images_per_batch(self) -> int:
        return self.batch_size // self.views


# (record, seeds) -> (views [k, C, H, W], label, seeds) or None
ItemFn = Callable[[Record | None, tuple[int, ...]], tuple | None]


class _EpochStream(IterableDataset):
    """One epoch of one rank from micro-batch `first_batch` on; in a worker, that worker's lane."""

    def __init__(
        self,
        source: ShardSource,
        plans: list[list[Segment]],
        layout: Layout,
        epoch: int,
        seed: int,
        first_batch: int,
        batches_per_rank: int,
        shuffle_buffer: int,
        item: ItemFn,
        collate: Callable[[list], MicroBatch],
    ) -> None:
        self.source, self.plans, self.layout = source, plans, layout
        self.epoch, self.seed = epoch, seed
        self.first_batch, self.batches_per_rank = first_batch, batches_per_rank
        self.shuffle_buffer, self.item, self.collate = shuffle_buffer, item, collate

    def __iter__(self) -> Iterator[MicroBatch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        L, R, r, k = self.layout.lanes, self.layout.world_size, self.layout.rank, self.layout.views
        B = self.layout.images_per_batch
        first = self.first_batch + worker  # the DataLoader takes batch i from worker i mod L
        if first >= self.batches_per_rank:
            return
        lane = first % L
        segments = self.plans[r * L + lane]
        length = sum(s.end - s.begin for s in segments)
        # The lane's own stream of draws (negative positions: never a sample's).
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1 - (r * L + lane)))
        order = buffer_shuffle_order(length, self.shuffle_buffer, generator)
        records = lane_records(self.source, segments, order, done=first // L * B)
        for batch in range(first, self.batches_per_rank, L):
            positions = ((batch * B + j) * R + r for j in range(B))
            items = [self.item(next(records), view_seeds(self.seed, self.epoch, p, k)) for p in positions]
            yield self.collate(items, views=k)


class StreamFeed:
    """A `TrainFeed` over a `ShardSource`: see the module docstring for the order and the replay.

    Args:
        source: the shards and their counts.
        item: `(record, seeds) -> (views [k, C, H, W], label, seeds)` or None for an unreadable
            record; it decodes once and augments view i under `seeds[i]` (see `DecodedItem`).
        batch_size, accum_iter: the loop's micro-batch (in samples) and accumulation; the epoch
            length is a multiple of batch_size x accum_iter x world_size.
        seed: the run seed (shard order, shuffle buffers, sample seeds).
        rank, world_size: this process's place; None: torch.distributed's, or 0 of 1.
        num_workers: loader worker processes (one lane each); 0 reads in this process.
        shuffle_buffer: samples each lane shuffles among (0 or 1: stored order within a lane).
        shuffle_shards: shuffle the shard order each epoch.
        epoch_images: training samples per epoch over all ranks (None: as many as the shards
            hold images), rounded down to a multiple of the global batch.
        pin_memory: page-locked batches (for CUDA copies).
        views: augmented views per image read (a divisor of `batch_size`).
    """

    def __init__(
        self,
        source: ShardSource,
        item: ItemFn,
        batch_size: int,
        accum_iter: int = 1,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        epoch_images: int | None = None,
        pin_memory: bool = False,
        views: int = 1,
    ) -> None:
        if batch_size % views:
            raise ValueError(f"a micro-batch of {batch_size} samples is not whole images of {views} views")
        rank, world_size = rank_and_world(rank, world_size)
        self.source, self.item, self.collate = source, item, collate_seeded
        self.layout = Layout(rank, world_size, max(1, num_workers), batch_size, views)
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.shuffle_buffer, self.shuffle_shards = shuffle_buffer, shuffle_shards
        self.global_batch = batch_size * accum_iter * world_size
        self.epoch_images = _epoch_length(sum(source.counts), epoch_images, self.global_batch)
        self._loader_iterator = None

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank gets per epoch (the same on every rank)."""
        return self.epoch_images // (self.layout.batch_size * self.layout.world_size)

    def plan(self, epoch: int) -> list[list[Segment]]:
        """The segments of every lane of the job (numbered rank * lanes + lane) in `epoch`: its part
        of the pass of `views` epochs it belongs to."""
        pass_, part = divmod(epoch, self.layout.views)
        counts = self.source.counts
        order = list(range(len(counts)))
        if self.shuffle_shards:
            generator = torch.Generator().manual_seed(self.seed + pass_)
            order = torch.randperm(len(counts), generator=generator).tolist()
        L = self.layout
        sizes = lane_sizes(self.epoch_images, L.batch_size, L.world_size, L.lanes, L.views)
        lanes = plan_lanes(counts, order, sizes * L.views)  # the lanes of every epoch of the pass
        return lanes[part * len(sizes) : (part + 1) * len(sizes)]

    def batches(self, epoch: int, start: int = 0) -> Iterator[MicroBatch]:
        """This rank's micro-batches of `epoch` after the first `start` images (all ranks counted)."""
        per_step = self.layout.batch_size * self.layout.world_size
        if start % self.global_batch or not 0 <= start <= self.epoch_images:
            raise ValueError(
                f"cannot start epoch {epoch} at image {start}: not a multiple of the global batch "
                f"{self.global_batch} within the epoch's {self.epoch_images} images"
            )
        self.close()
        stream = _EpochStream(
            self.source, self.plan(epoch), self.layout, epoch, self.seed, start // per_step,
            self.batches_per_epoch, self.shuffle_buffer, self.item, self.collate,
        )  # fmt: skip
        loader = DataLoader(
            stream,
            batch_size=None,  # the stream yields whole micro-batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=ignore_sigterm if self.num_workers else None,
        )
        self._loader_iterator = iter(loader)
        yield from self._loader_iterator

    def close(self) -> None:
        """Stop the current epoch's loader workers (they ignore SIGTERM, so exit would wait for them)."""
        iterator, self._loader_iterator = self._loader_iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


class DecodedItem:
    """The `item` function of a feed: decode a record once, augment one view per seed.

    `decode(data, seeds, name)` (e.g. `decode.ImageLoader`) gives `[k, C, H, W]`, view i drawn
    from `seeds[i]`, and raises `UnreadableImageError` for a damaged image; such records, and
    missing ones, give None, which the collate drops and counts (warned once per name per worker).
    """

    def __init__(self, decode: Callable[[bytes | str, tuple[int, ...], str], torch.Tensor]) -> None:
        self.decode = decode
        self.warned: set[str] = set()

    def __call__(self, record: Record | None, seeds: tuple[int, ...]) -> tuple | None:
        if record is None or record.data is None:
            if record is not None:
                self._warn(record.name, "no image in the sample")
            return None
        try:
            views = self.decode(record.data, seeds, record.name)
        except UnreadableImageError as error:
            self._warn(record.name, str(error.__cause__ or error))
            return None
        return views, record.label, seeds

    def _warn(self, name: str, why: str) -> None:
        if name not in self.warned:
            self.warned.add(name)
            warnings.warn(f"skipping unreadable image {name}: {why}", UnreadableImageWarning, 3)


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The given place, else torch.distributed's (initialised by torchrun), else rank 0 of 1."""
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _epoch_length(total: int, asked: int | None, global_batch: int) -> int:
    """Samples per epoch: `asked` or `total`, rounded down to a multiple of the global batch (with
    k views an epoch reads 1/k of that in images, and a pass of k epochs all of it)."""
    if asked is not None and asked > total:
        raise UsageError(f"data.epoch_images={asked} is more than the {total} images in the shards")
    length = (total if asked is None else asked) // global_batch * global_batch
    if length == 0:
        raise UsageError(f"the shards' {total} images do not fill one global batch of {global_batch}")
    return length
