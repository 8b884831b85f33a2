"""shoal.spmd on local processes: numpy arrays through the ranks' shared-memory segments
(allreduce, reduce, bcast, gather, allgather), checked against the same fold done here."""

from __future__ import annotations

import functools
import operator
import os

import numpy as np
import pytest

import shoal
import shoal.spmd


def made(rank, shape, dtype, layout="C"):
    """Rank ``rank``'s array: the same shape and dtype on every rank, different values."""
    size = int(np.prod(shape))
    base = (np.arange(size) * 7 + rank * 3) % 11 + rank
    arr = base.reshape(shape).astype(dtype)
    if layout == "F":
        return np.asfortranarray(arr)
    if layout == "strided":  # every other item of a larger array
        wide = np.zeros((*shape[:-1], shape[-1] * 2), dtype)
        wide[..., ::2] = arr
        return wide[..., ::2]
    return arr


def reduce_everything(cases):
    comm = shoal.spmd.comm()
    out = []
    for shape, dtype, op, layout in cases:
        arr = made(comm.rank, shape, dtype, layout)
        before = arr.copy()
        total = comm.allreduce(arr, op=op)
        at_one = comm.reduce(arr, op=op, root=1)
        assert np.array_equal(arr, before)  # the input is not touched
        out.append((total, at_one))
    return out


CASES = [
    ((1000,), np.float64, operator.add, "C"),
    ((37, 5), np.int32, operator.mul, "C"),
    ((6, 4), np.float32, np.maximum, "F"),
    ((9, 8), np.int64, np.minimum, "strided"),
    ((3, 3, 3), np.uint8, operator.xor, "C"),
    ((5,), np.bool_, operator.or_, "C"),
    ((), np.float64, operator.add, "C"),  # one item: most ranks reduce an empty part
    ((2,), np.complex128, operator.add, "C"),  # fewer items than ranks
    ((300_000,), np.float64, np.add, "C"),  # 2.4 MB: more than one segment granule
]


@pytest.mark.parametrize("ranks", [2, 3])
def test_allreduce_and_reduce_of_arrays_match_the_fold(ranks):
    got = shoal.spmd.run(reduce_everything, CASES, ranks=ranks, timeout=60)
    for (shape, dtype, op, layout), *per_rank in zip(CASES, *got, strict=True):
        expected = functools.reduce(op, [made(r, shape, dtype, layout) for r in range(ranks)])
        for rank, (total, at_one) in enumerate(per_rank):
            assert total.dtype == expected.dtype and total.shape == expected.shape
            assert np.array_equal(total, expected), (shape, dtype, op, layout)
            if rank == 1:
                assert np.array_equal(at_one, expected)
            else:
                assert at_one is None


def results_are_private():
    comm = shoal.spmd.comm()
    a = comm.allreduce(np.full(500_000, comm.rank, dtype=np.float64))
    a_copy = a.copy()
    b = comm.allreduce(np.full(500_000, 10.0 * comm.rank))  # the same segments again
    a += comm.rank  # writable, and writes stay on this rank
    c = comm.allreduce(np.full(1_000, 1.0))  # parts that fall elsewhere
    d = comm.allreduce(np.full(700_000, 2.0))  # a larger array: new segments
    return (
        np.array_equal(a, a_copy + comm.rank),
        float(b[0]),
        float(c.sum()),
        float(d.sum()),
        a.flags.writeable and a.flags.owndata,
    )


def test_each_result_is_a_new_array_of_its_own():
    got = shoal.spmd.run(results_are_private, ranks=3, timeout=60)
    assert got == [(True, 30.0, 3_000.0, 4_200_000.0, True)] * 3


def moving_parts(rounds):
    # Reduces of different sizes back to back, with broadcasts and gathers between them: a rank
    # that overwrote its segment while a peer still copies out of it would show up here.
    comm = shoal.spmd.comm()
    sums = []
    for i in range(rounds):
        n = 50_000 + (i * 37_003) % 200_000
        total = comm.allreduce(np.arange(n, dtype=np.float64) + comm.rank)
        sums.append(float(total[-1]))
        if i % 3 == 0:
            sums.append(
                float(comm.bcast(np.full(n // 2, i, np.int16) if comm.is_main else None)[-1])
            )
        if i % 4 == 1:
            sums.append(sum(float(x[-1]) for x in comm.allgather(np.full(n, comm.rank + i))))
    return sums


def test_consecutive_collectives_of_changing_sizes_stay_correct():
    ranks, rounds = 3, 24
    got = shoal.spmd.run(moving_parts, rounds, ranks=ranks, timeout=120)
    expected = []
    for i in range(rounds):
        n = 50_000 + (i * 37_003) % 200_000
        expected.append(float(ranks * (n - 1) + sum(range(ranks))))
        if i % 3 == 0:
            expected.append(float(i))
        if i % 4 == 1:
            expected.append(float(sum(r + i for r in range(ranks))))
    assert got == [expected] * ranks


def mine_for(rank):
    # Rank 1's array is large enough to go through its segment; rank 0's is pickled.
    return np.arange((rank + 3) * (10_000 if rank == 1 else 1), dtype=np.int64).reshape(1, -1)


def move_arrays():
    comm = shoal.spmd.comm()
    mine = mine_for(comm.rank)
    from_one = comm.bcast(
        np.asfortranarray(np.eye(300_000 // 300, 300)) if comm.rank == 1 else 0, root=1
    )
    everyone = comm.allgather(mine if comm.rank != 2 else {"not": "an array"})
    at_two = comm.gather(mine.T, root=2)
    return from_one, everyone, at_two


def test_bcast_gather_and_allgather_of_arrays():
    got = shoal.spmd.run(move_arrays, ranks=3, timeout=60)
    mine = [mine_for(r) for r in range(3)]
    for rank, (from_one, everyone, at_two) in enumerate(got):
        assert np.array_equal(from_one, np.eye(1000, 300))
        assert np.array_equal(everyone[0], mine[0]) and np.array_equal(everyone[1], mine[1])
        assert everyone[2] == {"not": "an array"}
        if rank == 2:
            assert [x.shape for x in at_two] == [(3, 1), (40_000, 1), (5, 1)]
            assert all(np.array_equal(x, m.T) for x, m in zip(at_two, mine, strict=True))
        else:
            assert at_two is None


def generic_ops():
    comm = shoal.spmd.comm()
    arr = np.full(4, comm.rank + 1.0)
    with_lambda = comm.allreduce(arr, op=lambda a, b: a * 10 + b)
    objects = comm.allreduce(np.array([comm.rank, "x"], dtype=object))
    divided = comm.allreduce(np.full(3, comm.rank + 1), op=np.true_divide)  # int -> float
    return with_lambda, objects, divided


def test_other_ops_and_dtypes_take_the_generic_path():
    got = shoal.spmd.run(generic_ops, ranks=2, timeout=60)
    for with_lambda, objects, divided in got:
        assert np.array_equal(with_lambda, np.full(4, 12.0))
        assert list(objects) == [1, "xx"]
        assert np.array_equal(divided, np.full(3, 0.5))


def mismatched(kind):
    comm = shoal.spmd.comm()
    if kind.endswith("after an allreduce"):
        # Peers may still be copying out of this one's segments when the bad call comes.
        comm.allreduce(np.ones(10 if kind.startswith("same") else 7))
    if kind == "shape":
        arr = np.zeros(10 + comm.rank)
    elif kind == "dtype":
        arr = np.zeros(10, dtype=np.float32 if comm.rank == 1 else np.float64)
    else:  # not an array on one rank
        arr = [0.0] * 10 if comm.rank == 1 else np.zeros(10)
    try:
        comm.allreduce(arr)
    except ValueError as exc:
        message = str(exc)
    else:
        message = "no error"
    # The ranks go on: the communicator still works.
    return message, comm.allreduce(np.ones(3) * comm.rank).tolist()


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("shape", "array of shape (11,)"),
        ("dtype", "a float32 array"),
        (
            "list",
            "different kinds of objects (rank 0: a float64 array of shape (10,); rank 1: a list",
        ),
        ("list after an allreduce", "(rank 0: a float64 array of shape (10,); rank 1: a list)"),
        (
            "same list after an allreduce",
            "(rank 0: a float64 array of shape (10,); rank 1: a list)",
        ),
    ],
)
def test_mismatched_arrays_are_a_value_error_on_every_rank(kind, words):
    got = shoal.spmd.run(mismatched, kind, ranks=2, timeout=30)
    for message, after in got:
        assert message.startswith("allreduce: ") and words in message
        assert after == [1.0, 1.0, 1.0]


def array_then_other_collective():
    comm = shoal.spmd.comm()
    if comm.rank == 0:
        return comm.allreduce(np.ones(10))
    return comm.bcast(None)


def test_an_array_allreduce_against_another_collective_times_out():
    with pytest.raises(shoal.TaskTimeoutError) as info:
        shoal.spmd.run(array_then_other_collective, ranks=2, timeout=2.5)
    assert any("different collectives" in n for n in info.value.__notes__)


def fail_after_arrays(how):
    comm = shoal.spmd.comm()
    comm.allreduce(np.ones(400_000) * comm.rank)
    if comm.rank == 1 and how == "raise":
        raise KeyError("rank 1 failed")
    if comm.rank == 1 and how == "exit":
        os._exit(3)
    comm.allreduce(np.ones(400_000))  # rank 0 waits here until it is stopped
    return True


def shm_names():
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.")}


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this system")
def test_no_dev_shm_files_after_runs_and_after_a_failed_rank():
    # POSIX semaphores (sem.*) of unrelated processes come and go; shoal makes none.
    before = shm_names()
    assert shoal.spmd.run(moving_parts, 2, ranks=2, timeout=60)
    with pytest.raises(KeyError, match="rank 1 failed"):
        shoal.spmd.run(fail_after_arrays, "raise", ranks=2, timeout=60)
    with pytest.raises(shoal.WorkerCrashedError) as info:
        shoal.spmd.run(fail_after_arrays, "exit", ranks=2, timeout=60)
    assert info.value.index == 1
    assert shm_names() - before == set()
    # And the ranks' pool works afterwards.
    assert shoal.spmd.run(fail_after_arrays, "none", ranks=2, timeout=60) == [True, True]


def segment_mappings():
    comm = shoal.spmd.comm()
    comm.allreduce(np.ones(300_000))
    with open("/proc/self/maps") as maps:
        # The path is the sixth field (an memfd's ends in "(deleted)").
        return [line.split(maxsplit=5)[5] for line in maps if "shm" in line or "memfd" in line]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc on this system")
def test_the_segments_are_memfds_not_files():
    for names in shoal.spmd.run(segment_mappings, ranks=2, timeout=60):
        assert names and all(name.startswith("/memfd:") for name in names), names
