"""Rank arithmetic of the TP x DP x PP grid and the split of layers over pipeline stages."""

from __future__ import annotations

import itertools

import pytest

from mrlhf.parallel.topology import Coord, Layout, layers_per_stage, split_evenly, stage_layer_range

# every (tp, pp, dp) with tp*pp*dp <= 8
LAYOUTS = [(tp, pp, dp) for tp, pp, dp in itertools.product(range(1, 9), repeat=3) if tp * pp * dp <= 8]


def layout_id(t: tuple[int, int, int]) -> str:
    return "tp{}-pp{}-dp{}".format(*t)


# ---- Layout.for_world ----


def test_for_world() -> None:
    lay = Layout.for_world(8, tp=2, pp=2)
    assert lay == Layout(tp=2, pp=2, dp=2)
    assert lay.world_size == 8
    assert Layout.for_world(1, 1, 1) == Layout(1, 1, 1)
    assert Layout.for_world(12, tp=2, pp=3).dp == 2


@pytest.mark.parametrize("world,tp,pp", [(3, 2, 1), (6, 2, 2), (8, 3, 1), (4, 0, 1), (4, 1, 0), (4, -1, 1), (2, 4, 1)])
def test_for_world_errors(world: int, tp: int, pp: int) -> None:
    with pytest.raises(ValueError):
        Layout.for_world(world, tp=tp, pp=pp)


def test_coord_out_of_range() -> None:
    lay = Layout(tp=2, pp=1, dp=2)
    with pytest.raises(ValueError):
        lay.coord(4)
    with pytest.raises(ValueError):
        lay.coord(-1)


# ---- coord / rank ----


@pytest.mark.parametrize("dims", LAYOUTS, ids=layout_id)
def test_coord_rank_inverse(dims: tuple[int, int, int]) -> None:
    tp, pp, dp = dims
    lay = Layout(tp=tp, pp=pp, dp=dp)
    coords = [lay.coord(r) for r in range(lay.world_size)]
    assert len(set(coords)) == lay.world_size  # a bijection
    for r, c in enumerate(coords):
        assert 0 <= c.tp_rank < tp and 0 <= c.dp_rank < dp and 0 <= c.pp_rank < pp
        assert lay.rank(c) == r
    for t, d, p in itertools.product(range(tp), range(dp), range(pp)):
        assert lay.coord(lay.rank(Coord(t, d, p))) == Coord(t, d, p)


def test_rank_order_tp_fastest_then_dp_then_pp() -> None:
    lay = Layout(tp=2, pp=2, dp=2)
    assert lay.coord(5) == Coord(tp_rank=1, dp_rank=0, pp_rank=1)
    expected = [
        Coord(0, 0, 0), Coord(1, 0, 0), Coord(0, 1, 0), Coord(1, 1, 0),
        Coord(0, 0, 1), Coord(1, 0, 1), Coord(0, 1, 1), Coord(1, 1, 1),
    ]  # fmt: skip
    assert [lay.coord(r) for r in range(8)] == expected


def test_rank_order_examples() -> None:
    lay = Layout(tp=2, pp=1, dp=4)
    assert lay.coord(3) == Coord(tp_rank=1, dp_rank=1, pp_rank=0)
    assert lay.coord(6) == Coord(tp_rank=0, dp_rank=3, pp_rank=0)
    lay = Layout(tp=1, pp=4, dp=2)
    assert lay.coord(3) == Coord(tp_rank=0, dp_rank=1, pp_rank=1)
    assert lay.rank(Coord(tp_rank=0, dp_rank=0, pp_rank=3)) == 6
    lay = Layout(tp=4, pp=2, dp=1)
    assert lay.coord(5) == Coord(tp_rank=1, dp_rank=0, pp_rank=1)


def test_group_examples() -> None:
    lay = Layout(tp=2, pp=2, dp=2)
    assert lay.tp_group_ranks(5) == [4, 5]
    assert lay.dp_group_ranks(5) == [5, 7]
    assert lay.pp_group_ranks(5) == [1, 5]


# ---- groups ----


@pytest.mark.parametrize("dims", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("kind", ["tp", "dp", "pp"])
def test_groups_partition_world(dims: tuple[int, int, int], kind: str) -> None:
    tp, pp, dp = dims
    lay = Layout(tp=tp, pp=pp, dp=dp)
    size = {"tp": tp, "dp": dp, "pp": pp}[kind]
    groups_of = getattr(lay, f"{kind}_group_ranks")
    groups = {tuple(groups_of(r)) for r in range(lay.world_size)}
    assert len(groups) == lay.world_size // size
    members = sorted(r for g in groups for r in g)
    assert members == list(range(lay.world_size))  # disjoint and covering
    for r in range(lay.world_size):
        g = groups_of(r)
        assert r in g and len(g) == size
        c = lay.coord(r)
        for other in g:
            oc = lay.coord(other)
            # members differ only in this group's own coordinate, which runs 0..size-1 in list order
            same = {
                "tp": (oc.dp_rank, oc.pp_rank) == (c.dp_rank, c.pp_rank),
                "dp": (oc.tp_rank, oc.pp_rank) == (c.tp_rank, c.pp_rank),
                "pp": (oc.tp_rank, oc.dp_rank) == (c.tp_rank, c.dp_rank),
            }[kind]
            assert same
        assert [getattr(lay.coord(o), f"{kind}_rank") for o in g] == list(range(size))


# ---- pipeline neighbours ----


@pytest.mark.parametrize("dims", LAYOUTS, ids=layout_id)
def test_next_prev_stage(dims: tuple[int, int, int]) -> None:
    tp, pp, dp = dims
    lay = Layout(tp=tp, pp=pp, dp=dp)
    for r in range(lay.world_size):
        c = lay.coord(r)
        nxt, prv = lay.next_stage_rank(r), lay.prev_stage_rank(r)
        if c.pp_rank == pp - 1:
            assert nxt is None
        else:
            assert lay.coord(nxt) == Coord(c.tp_rank, c.dp_rank, c.pp_rank + 1)
            assert lay.prev_stage_rank(nxt) == r
        if c.pp_rank == 0:
            assert prv is None
        else:
            assert lay.coord(prv) == Coord(c.tp_rank, c.dp_rank, c.pp_rank - 1)
            assert lay.next_stage_rank(prv) == r


def test_next_prev_stage_example() -> None:
    lay = Layout(tp=2, pp=2, dp=2)
    assert lay.next_stage_rank(1) == 5
    assert lay.prev_stage_rank(5) == 1
    assert lay.next_stage_rank(5) is None
    assert lay.prev_stage_rank(1) is None


# ---- layers per stage ----


@pytest.mark.parametrize(
    "num_layers,pp,first,last,expected",
    [
        (4, 1, None, None, [4]),
        (4, 1, 4, 4, [4]),
        (4, 2, None, None, [2, 2]),
        (8, 4, None, None, [2, 2, 2, 2]),
        (3, 3, None, None, [1, 1, 1]),
        (3, 2, 1, None, [1, 2]),
        (3, 2, None, 1, [2, 1]),
        (3, 2, 2, 1, [2, 1]),
        (5, 3, 1, None, [1, 2, 2]),
        (5, 3, None, 3, [1, 1, 3]),
        (7, 4, 1, 2, [1, 2, 2, 2]),
        (6, 4, 2, 2, [2, 1, 1, 2]),
    ],
)
def test_layers_per_stage(num_layers: int, pp: int, first: int | None, last: int | None, expected: list[int]) -> None:
    sizes = layers_per_stage(num_layers, pp, first, last)
    assert sizes == expected
    assert sum(sizes) == num_layers


@pytest.mark.parametrize(
    "num_layers,pp,first,last",
    [
        (3, 2, None, None),  # not even
        (2, 3, None, None),  # more stages than layers
        (4, 0, None, None),  # bad pp
        (4, 1, 2, None),  # first/last sizes need pp > 1
        (4, 1, None, 3),
        (4, 2, 0, None),  # a stage with no layer
        (4, 2, None, 0),
        (4, 2, 3, 2),  # first + last != num_layers
        (4, 2, 1, 1),
        (4, 2, 5, None),  # first larger than the model
        (6, 4, 1, None),  # 5 over 3 middle stages
        (4, 3, 2, 2),  # nothing left for the middle stage
    ],
)
def test_layers_per_stage_errors(num_layers: int, pp: int, first: int | None, last: int | None) -> None:
    with pytest.raises(ValueError):
        layers_per_stage(num_layers, pp, first, last)


@pytest.mark.parametrize(
    "num_layers,pp,first,last",
    [
        (4, 1, None, None),
        (4, 2, None, None),
        (8, 4, None, None),
        (5, 3, 1, None),
        (5, 3, None, 3),
        (7, 4, 1, 2),
        (3, 2, 2, 1),
        (6, 3, 2, 2),
    ],
)
def test_stage_layer_range_contiguous_cover(num_layers: int, pp: int, first: int | None, last: int | None) -> None:
    sizes = layers_per_stage(num_layers, pp, first, last)
    ranges = [stage_layer_range(num_layers, pp, s, first, last) for s in range(pp)]
    assert [len(r) for r in ranges] == sizes
    assert ranges[0].start == 0
    for a, b in zip(ranges, ranges[1:]):
        assert a.stop == b.start
    assert ranges[-1].stop == num_layers
    assert [i for r in ranges for i in r] == list(range(num_layers))


def test_stage_layer_range_example() -> None:
    assert stage_layer_range(5, 3, 0, first_stage_layers=1) == range(0, 1)
    assert stage_layer_range(5, 3, 1, first_stage_layers=1) == range(1, 3)
    assert stage_layer_range(5, 3, 2, first_stage_layers=1) == range(3, 5)


def test_stage_layer_range_error() -> None:
    with pytest.raises(ValueError):
        stage_layer_range(3, 2, 0)


# ---- split_evenly ----


def test_split_evenly_examples() -> None:
    assert [split_evenly(10, 3, i) for i in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    assert [split_evenly(8, 4, i) for i in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert [len(split_evenly(2, 4, i)) for i in range(4)] == [1, 1, 0, 0]
    assert split_evenly(0, 2, 1) == range(0, 0)


@pytest.mark.parametrize("n", [0, 1, 5, 7, 16, 31])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_split_evenly_partitions(n: int, parts: int) -> None:
    slices = [split_evenly(n, parts, i) for i in range(parts)]
    assert [i for s in slices for i in s] == list(range(n))
    lengths = [len(s) for s in slices]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)  # the larger slices come first
