"""The streaming feed's plan: exactly-once lanes, a bounded shuffle buffer, and exact replay from a step."""

import collections
import itertools
import warnings

import pytest
import torch

from openmae.data.folder import UnreadableImageWarning
from openmae.data.sampler import sample_seed
from openmae.data.stream import (
    Record,
    Segment,
    StreamFeed,
    buffer_shuffle_order,
    lane_records,
    lane_sizes,
    plan_lanes,
)
from openmae.errors import UsageError


class MemoryShards:
    """Shards of records whose label is a global sample id; remembers which shards were opened."""

    def __init__(self, counts, short=None):
        self.names = [f"shard{i}" for i in range(len(counts))]
        self.counts = list(counts)
        self.short = short or {}  # shard -> records it really holds (fewer than its count)
        self.firsts = list(itertools.accumulate([0, *counts]))
        self.opened = []

    def read(self, shard):
        self.opened.append(shard)
        for i in range(self.short.get(shard, self.counts[shard])):
            yield Record(b"", f"{self.names[shard]}:{i}", self.firsts[shard] + i)


def fake_item(record, seeds):
    """No decoding: the sample id as the label, its seeds, and views that depend on the seeds."""
    if record is None:
        return None
    return torch.stack([torch.full((1, 2, 2), float(seed % 1000)) for seed in seeds]), record.label, seeds


def run_epoch(feed, epoch=0, start=0):
    batches = list(feed.batches(epoch, start))
    feed.close()
    return batches


def test_lanes_cover_the_shards_once_in_consecutive_pieces_of_the_planned_sizes():
    counts = [7, 3, 10, 1, 9]
    sizes = lane_sizes(24, batch_size=2, world_size=2, lanes=3)  # 6 micro-batches per rank
    assert sizes == [4, 4, 4] * 2
    plans = plan_lanes(counts, [2, 0, 4, 1, 3], sizes)
    assert [sum(s.end - s.begin for s in lane) for lane in plans] == sizes
    samples = [(s.shard, i) for lane in plans for s in lane for i in range(s.begin, s.end)]
    assert len(samples) == len(set(samples)) == 24
    assert plans[0] == [Segment(2, 0, 4)] and plans[2] == [Segment(2, 8, 10), Segment(0, 0, 2)]
    with pytest.raises(ValueError, match="31 samples planned from shards holding 30"):
        plan_lanes(counts, range(5), [16, 15])


def test_shuffle_buffer_is_a_seeded_permutation_never_ahead_of_the_reading_by_more_than_the_buffer():
    order = buffer_shuffle_order(100, 8, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(100))
    assert order != list(range(100))
    assert all(index < position + 8 for position, index in enumerate(order))  # read at most 8 ahead
    assert order == buffer_shuffle_order(100, 8, torch.Generator().manual_seed(0))
    assert order != buffer_shuffle_order(100, 8, torch.Generator().manual_seed(1))
    assert buffer_shuffle_order(5, 1, torch.Generator()) == list(range(5))
    assert sorted(buffer_shuffle_order(5, 100, torch.Generator())) == list(range(5))  # buffer > length


def test_a_lane_resumed_at_any_output_gives_the_rest_and_opens_no_finished_shard():
    source = MemoryShards([6, 6, 6, 6])
    lane = [Segment(1, 2, 6), Segment(3, 0, 6), Segment(0, 0, 6), Segment(2, 0, 3)]
    order = buffer_shuffle_order(19, 4, torch.Generator().manual_seed(3))
    full = [r.label for r in lane_records(source, lane, order, done=0)]
    assert sorted(full) == sorted([8, 9, 10, 11, *range(18, 24), *range(6), 12, 13, 14])
    for done in range(20):
        source.opened.clear()
        assert [r.label for r in lane_records(source, lane, order, done)] == full[done:]
        needed = order[done:]
        if needed:  # shards before the first input still needed stay closed
            first_segment = next(i for i, end in enumerate([4, 10, 16, 19]) if min(needed) < end)
            assert source.opened[0] == lane[first_segment].shard


def make_feed(source, rank=0, world_size=1, num_workers=0, **options):
    options = {"batch_size": 2, "seed": 5, "shuffle_buffer": 4, **options}
    return StreamFeed(source, fake_item, rank=rank, world_size=world_size, num_workers=num_workers, **options)


def test_two_ranks_with_two_workers_see_every_sample_of_the_epoch_exactly_once():
    counts = [5, 9, 2, 7, 4, 6]  # 33 samples; global batch 2 x 2 ranks x accum 2 = 8 -> 32 per epoch
    seen = collections.Counter()
    seeds = set()
    per_rank = []
    for rank in range(2):
        feed = make_feed(MemoryShards(counts), rank, 2, num_workers=2, accum_iter=2)
        assert feed.epoch_images == 32 and feed.batches_per_epoch == 8
        batches = run_epoch(feed)
        per_rank.append(len(batches))
        for images, labels, batch_seeds, skipped in batches:
            assert images.shape == (2, 1, 2, 2) and skipped == 0
            seen.update(labels.tolist())
            seeds.update(batch_seeds.tolist())
    assert per_rank == [8, 8]  # no rank runs out before another: DDP never waits for a missing batch
    assert sum(seen.values()) == 32 and max(seen.values()) == 1
    assert seeds == {sample_seed(5, 0, position) for position in range(32)}  # the map-style numbering
    # Another epoch reads the shards in another order and leaves out another sample.
    other = collections.Counter()
    for rank in range(2):
        for _, labels, _, _ in run_epoch(make_feed(MemoryShards(counts), rank, 2, 2, accum_iter=2), epoch=1):
            other.update(labels.tolist())
    assert max(other.values()) == 1 and set(other) != set(seen)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resuming_at_a_step_gives_exactly_the_rest_of_the_uninterrupted_epoch(num_workers):
    counts = [11, 4, 8, 13, 6]
    for rank in range(2):
        feed = make_feed(MemoryShards(counts), rank, 2, num_workers, shuffle_buffer=5)
        full = run_epoch(feed, epoch=2)
        assert len(full) == feed.batches_per_epoch == 10
        for step in (1, 4, 7, 10):  # global batch 4: micro-batches are steps here
            rest = run_epoch(feed, epoch=2, start=step * 4)
            assert len(rest) == len(full) - step
            for (a_img, a_lab, a_seed, _), (b_img, b_lab, b_seed, _) in zip(full[step:], rest, strict=True):
                assert torch.equal(a_lab, b_lab) and torch.equal(a_seed, b_seed) and torch.equal(a_img, b_img)


def test_a_resumed_epoch_does_not_open_the_shards_it_had_finished():
    source = MemoryShards([4] * 8)
    feed = make_feed(source, shuffle_buffer=1, shuffle_shards=False)
    run_epoch(feed, start=0)
    assert source.opened == list(range(8))
    source.opened.clear()
    run_epoch(feed, start=20)
    assert source.opened == [5, 6, 7]


def test_a_shard_shorter_than_its_count_gives_skipped_samples_and_keeps_the_batch_count():
    source = MemoryShards([4, 4, 4], short={1: 1})
    feed = make_feed(source, shuffle_buffer=1, shuffle_shards=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = run_epoch(feed)
    assert len(batches) == 6
    assert sum(b[3] for b in batches) == 3 and sum(len(b[1]) for b in batches) == 9
    warned = [str(w.message) for w in caught if w.category is UnreadableImageWarning]
    assert any("shard1 ended after 1" in message for message in warned)


def test_epoch_length_is_explicit_and_checked():
    assert make_feed(MemoryShards([10, 10]), epoch_images=13).epoch_images == 12
    with pytest.raises(UsageError, match="more than the 20 images"):
        make_feed(MemoryShards([10, 10]), epoch_images=21)
    with pytest.raises(UsageError, match="do not fill one global batch of 8"):
        make_feed(MemoryShards([3, 4]), batch_size=4, world_size=2)
    feed = make_feed(MemoryShards([10, 10]))
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        next(feed.batches(0, start=3))


def test_ranks_come_from_torch_distributed_unless_given(monkeypatch):
    assert make_feed(MemoryShards([8]), rank=None, world_size=None).layout.world_size == 1
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    layout = make_feed(MemoryShards([8]), rank=None, world_size=None).layout
    assert (layout.rank, layout.world_size) == (1, 2)
    assert make_feed(MemoryShards([8]), rank=0, world_size=4).layout.world_size == 4
