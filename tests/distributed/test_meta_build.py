"""Roles whose weights come from a checkpoint are built on the meta device: no initial values are drawn, and after
the load the model equals the saved one (parameters and logits, bitwise) at TP1 and TP2xPP2."""

from harness import run_ranks
from te_runs import meta_build_rank


def test_from_checkpoint_build_draws_nothing_and_loads_exactly(tmp_path):
    for layout, world in (({}, 1), ({"tp": 2, "pp": 2}, 4)):
        results = run_ranks(meta_build_rank, world, str(tmp_path / str(world)), layout)
        assert all(r["same_params"] for r in results)
        assert all(r["same_logits"] for r in results if r["last"])
