import torch

from openmae.data.sampler import SeededDataset, SeededSampler, collate_seeded
from openmae.engine.tasks import noise_from_seeds


def test_epoch_is_cut_to_whole_global_batches_and_shuffled_per_epoch():
    sampler = SeededSampler(103, global_batch=10, seed=1)
    first = [i for i, _ in sampler]
    assert len(first) == 100 and len(set(first)) == 100
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != first


def test_ranks_split_each_global_batch_and_seeds_do_not_depend_on_world_size():
    single = list(SeededSampler(40, global_batch=8, seed=3))
    ranks = [list(SeededSampler(40, global_batch=8, seed=3, rank=r, world_size=2)) for r in range(2)]
    for step in range(5):
        global_batch = set(single[step * 8 : (step + 1) * 8])
        per_rank = set(ranks[0][step * 4 : (step + 1) * 4]) | set(ranks[1][step * 4 : (step + 1) * 4])
        assert per_rank == global_batch


def test_resume_offset_replays_the_rest_of_the_epoch():
    full = list(SeededSampler(50, global_batch=5, seed=0))
    resumed = SeededSampler(50, global_batch=5, seed=0)
    resumed.set_epoch(0, start=20)
    assert list(resumed) == full[20:]
    assert len(resumed) == 30


class _Noisy(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return None if i == 2 else (torch.rand(1, 2, 2), i)


def test_seeded_items_replay_and_unreadable_items_are_counted():
    data = SeededDataset(_Noisy())
    a, b = data[(0, (123,))], data[(0, (123,))]
    assert torch.equal(a[0], b[0]) and a[2] == (123,)
    assert not torch.equal(data[(0, (124,))][0], a[0])
    images, labels, seeds, skipped = collate_seeded([data[(i, (7,))] for i in range(4)])
    assert images.shape == (3, 1, 2, 2) and skipped == 1 and labels.tolist() == [0, 1, 3]


def test_noise_is_a_function_of_the_seed_only():
    noise = noise_from_seeds(torch.tensor([5, 6, 5]), 10, "cpu")
    assert noise.shape == (3, 10)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert float(noise.min()) >= 0 and float(noise.max()) < 1


class _Fixed(torch.utils.data.Dataset):
    draws_random = False

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.rand(1), i  # would differ per seed if the wrapper seeded it


def test_datasets_without_randomness_are_read_unseeded():
    torch.manual_seed(0)
    data = SeededDataset(_Fixed())
    first, again = data[(0, (5,))], data[(0, (5,))]
    assert first[2] == (5,) and first[1] == 0
    assert not torch.equal(first[0], again[0])  # the global stream advanced: no seeding took place
