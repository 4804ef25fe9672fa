"""Pure rank arithmetic: no process groups, no torch.

The rank order matches megatron-core's default ``order="tp-cp-ep-dp-pp"`` (with cp = ep = 1): tp varies fastest,
then dp, then pp, so ``rank = tp_rank + tp * (dp_rank + dp * pp_rank)``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Coord:
    """Where one rank sits in the TP x DP x PP grid."""

    tp_rank: int
    dp_rank: int
    pp_rank: int


@dataclass(frozen=True)
class Layout:
    """A TP x PP x DP layout of a given world size."""

    tp: int
    pp: int
    dp: int

    @classmethod
    def for_world(cls, world_size: int, tp: int, pp: int) -> Layout:
        if tp < 1 or pp < 1 or world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        return Coord(tp_rank=rank % self.tp, dp_rank=(rank // self.tp) % self.dp, pp_rank=rank // (self.tp * self.dp))

    def rank(self, coord: Coord) -> int:
        return coord.tp_rank + self.tp * (coord.dp_rank + self.dp * coord.pp_rank)

    def tp_group_ranks(self, rank: int) -> list[int]:
        c = self.coord(rank)
        return [self.rank(Coord(t, c.dp_rank, c.pp_rank)) for t in range(self.tp)]

    def dp_group_ranks(self, rank: int) -> list[int]:
        c = self.coord(rank)
        return [self.rank(Coord(c.tp_rank, d, c.pp_rank)) for d in range(self.dp)]

    def pp_group_ranks(self, rank: int) -> list[int]:
        c = self.coord(rank)
        return [self.rank(Coord(c.tp_rank, c.dp_rank, p)) for p in range(self.pp)]

    def next_stage_rank(self, rank: int) -> int | None:
        c = self.coord(rank)
        return None if c.pp_rank == self.pp - 1 else self.rank(Coord(c.tp_rank, c.dp_rank, c.pp_rank + 1))

    def prev_stage_rank(self, rank: int) -> int | None:
        c = self.coord(rank)
        return None if c.pp_rank == 0 else self.rank(Coord(c.tp_rank, c.dp_rank, c.pp_rank - 1))


def layers_per_stage(
    num_layers: int, pp: int, first_stage_layers: int | None = None, last_stage_layers: int | None = None
) -> list[int]:
    """Number of layers on each pipeline stage; the first/last stage may be given their own size."""
    if pp < 1:
        raise ValueError("pipeline size must be >= 1")
    if pp == 1:
        if first_stage_layers not in (None, num_layers) or last_stage_layers not in (None, num_layers):
            raise ValueError("first/last stage sizes need pp > 1")
        return [num_layers]
    first = first_stage_layers
    last = last_stage_layers
    for name, n in (("first stage", first), ("last stage", last)):
        if n is not None and n < 1:
            raise ValueError(f"{name} must hold at least one layer, got {n}")
    rest = num_layers - (first or 0) - (last or 0)
    middle = pp - (first is not None) - (last is not None)
    if middle == 0:
        if rest != 0:
            raise ValueError(f"first + last stage layers ({first} + {last}) must equal num_layers ({num_layers})")
        return [first, last]  # type: ignore[list-item]
    if rest < middle or rest % middle:
        raise ValueError(f"{rest} layers cannot be split evenly over {middle} stage(s)")
    each = rest // middle
    sizes = [each] * pp
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    return sizes


def stage_layer_range(
    num_layers: int, pp: int, pp_rank: int, first_stage_layers: int | None = None, last_stage_layers: int | None = None
) -> range:
    """Global indices of the layers that stage ``pp_rank`` holds."""
    sizes = layers_per_stage(num_layers, pp, first_stage_layers, last_stage_layers)
    start = sum(sizes[:pp_rank])
    return range(start, start + sizes[pp_rank])


def split_evenly(n: int, parts: int, index: int) -> range:
    """The ``index``-th of ``parts`` contiguous, near-equal slices of ``range(n)``."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))
