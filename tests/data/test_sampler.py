"""Index streams: a step's images are a function of (seed, stream, step); no image twice in a
step's batch while the pool holds a batch; smaller pools are read as endless permutations."""
import numpy as np
import pytest

from bench.data.sampler import IndexStream


def test_no_image_twice_in_a_batch_and_every_epoch_a_permutation_without_its_remainder():
    pool = np.arange(100, 203)                              # 103 images, batches of 10: 3 left over
    stream = IndexStream(pool, 10, seed=0, name="u")
    seen = []
    for step in range(30):                                  # three epochs of 10 batches
        batch = stream.at(step)
        assert len(batch) == 10 and len(set(batch.tolist())) == 10, step
        seen.append(batch)
    for e in range(3):
        epoch = np.concatenate(seen[10 * e:10 * (e + 1)])
        assert len(set(epoch.tolist())) == 100 and set(epoch.tolist()) <= set(pool.tolist())
    assert not np.array_equal(seen[0], seen[10])            # each epoch its own order


def test_a_step_is_the_same_whatever_came_before_and_differs_by_seed_and_stream():
    a, b = IndexStream(np.arange(50), 8, seed=3, name="l"), IndexStream(np.arange(50), 8, seed=3, name="l")
    for step in range(20):
        a.at(step)
    assert np.array_equal(a.at(17), b.at(17))              # no state: a resumed run reads the same
    assert not np.array_equal(b.at(17), IndexStream(np.arange(50), 8, seed=4, name="l").at(17))
    assert not np.array_equal(b.at(17), IndexStream(np.arange(50), 8, seed=3, name="u").at(17))


@pytest.mark.parametrize("size, batch", [(5, 12), (3, 3), (7, 20)])
def test_a_pool_smaller_than_a_batch_repeats_every_image_evenly(size, batch):
    stream = IndexStream(np.arange(size), batch, seed=0, name="l")
    for step in range(6):
        counts = np.bincount(stream.at(step), minlength=size)
        assert counts.sum() == batch and counts.max() - counts.min() <= 1 + (batch % size > 0), step
    # read end to end, the steps are consecutive permutations of the pool
    flat = np.concatenate([stream.at(s) for s in range(size)])  # size * batch draws: `batch` epochs
    for e in range(batch):
        assert sorted(flat[e * size:(e + 1) * size].tolist()) == list(range(size))
