"""The continuous-batching engine on every rank, without HTTP: at PP1, PP2 with a spare ring slot and TP2, its
greedy tokens equal the fixed-batch Generator's while requests queue, join mid-flight and get cancelled; a seeded
sampled request does not depend on what else is in the ring; a stop token ends its choice."""

import pytest
from harness import run_ranks
from serving_runs import engine_rank


@pytest.mark.parametrize("layout,slots,rows", [({}, None, 3), ({"pp": 2}, 3, 3), ({"tp": 2}, None, 3)],
                         ids=["pp1", "pp2-spare-slot", "tp2"])  # fmt: skip
def test_engine_equals_generator_under_continuous_batching(layout, slots, rows):
    world = layout.get("tp", 1) * layout.get("pp", 1)
    r = run_ranks(engine_rank, world, layout, slots, rows)[0]
    ref = r["ref"]
    assert r["queued"] == ref  # 10 prompts through fewer rows than prompts
    assert r["waves"] == ref[:6]
    assert r["joined_busy_rows"] > 0  # the second wave was admitted while the first was generating
    assert r["after_cancel_busy"] == 0 and 3 <= r["cancelled_len"] < 40
    alone, crowd = r["sampled"]
    assert alone == crowd and len({tuple(t) for t in alone}) > 1  # same sample in a crowd; choices differ
    first = ref[1].index(r["stop"])
    assert r["stopped"] == ref[1][: first + 1] and r["stop_finish"] == "stop"
