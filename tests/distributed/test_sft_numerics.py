"""Numerics gate: 5 SFT steps under TP2, PP2, DP2 and TP2xPP2 match TP1PP1DP1 within 1e-5 relative (fp32)."""

import pytest
from harness import run_ranks
from sft_runs import sft_rank

LAYOUTS = {
    "tp2": ({"tp": 2}, 2),
    "pp2": ({"pp": 2}, 2),
    "dp2": ({}, 2),
    "tp2pp2": ({"tp": 2, "pp": 2}, 4),
}
REL_TOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def baseline(request, tmp_path_factory):
    flavour = request.param
    extra = [f"model.flavour={flavour}", "training.train_steps=5", "checkpoint.save_interval=0", "checkpoint.enabled=false"]
    if flavour == "gpt2":
        extra.append("model.num_query_groups=null")
    (res,) = run_ranks(sft_rank, 1, str(tmp_path_factory.mktemp("base")), {}, extra)
    return flavour, extra, res["losses"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(baseline, name, tmp_path):
    flavour, extra, ref = baseline
    layout, world = LAYOUTS[name]
    results = run_ranks(sft_rank, world, str(tmp_path), layout, extra)
    assert len(ref) == 5
    for r in results:  # every rank reports the same global loss
        assert r["losses"] == results[0]["losses"]
        for got, want in zip(r["losses"], ref):
            assert abs(got - want) <= REL_TOL * abs(want), f"{flavour} {name}: {r['losses']} vs {ref}"
    assert ref[-1] < ref[0]  # and the run actually learns
