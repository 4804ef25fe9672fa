"""``ppo.offload_optimizer``: the actor's and critic's optimizer state (AdamW moments, bf16's fp32 masters) lives in
host memory outside training -- the memory report shows none of it on the device while generating and making
experience -- and the run is bit-identical to one that keeps it resident, through a checkpoint save, a kill and a
resume (PP2, bf16)."""

import torch
from harness import run_ranks
from ppo_runs import ppo_rank
from sft_runs import set_fault

COMMON = ["training.train_steps=2", "training.precision=bf16", "checkpoint.enabled=true", "checkpoint.save_interval=1"]


def test_offloaded_optimizer_state_is_bit_identical_through_save_and_resume(tmp_path):
    layout = {"pp": 2}
    resident = run_ranks(ppo_rank, 2, str(tmp_path / "resident"), layout, COMMON)
    out, offload = str(tmp_path / "offload"), [*COMMON, "ppo.offload_optimizer=true"]
    run_ranks(ppo_rank, 2, out, layout, offload, env=set_fault("after_step:1"), expect_exit=137)
    resumed = run_ranks(ppo_rank, 2, out, layout, offload)
    for a, b in zip(resident, resumed):
        assert a["coord"] == b["coord"]
        rec_a, rec_b = a["records"][-1], b["records"][0]  # iteration 2 of both (AdamW state exists from the 1st)
        assert rec_a["iteration"] == rec_b["iteration"] == 2
        for role in ("actor", "critic"):
            # offloaded: only AdamW's 0-d step counters (4 bytes per tensor), which torch keeps on the CPU anyway
            counters = 4 * len(b["optimizers"][role]["inner"]["state"])
            for phase in ("generate", "experience"):
                assert rec_b[f"{phase}_mem_{role}_optimizer_bytes"] == counters, (role, phase)
                assert rec_a[f"{phase}_mem_{role}_optimizer_bytes"] > 0, (role, phase)
            assert rec_b[f"train_mem_{role}_optimizer_bytes"] == rec_a[f"train_mem_{role}_optimizer_bytes"] > 0
        skip = ("time_", "iteration_time_s")
        want = {k: v for k, v in rec_a.items() if not k.startswith(skip) and "_mem_" not in k}
        got = {k: v for k, v in rec_b.items() if not k.startswith(skip) and "_mem_" not in k}
        assert got == want
        for role, opt in a["optimizers"].items():
            other = b["optimizers"][role]
            assert sorted(opt["masters"]) == sorted(other["masters"]) and opt["masters"], role  # bf16: fp32 masters
            for i, m in opt["masters"].items():
                assert torch.equal(m, other["masters"][i]), (role, i)
            for i, st in opt["inner"]["state"].items():
                for k, v in st.items():
                    assert torch.equal(v, other["inner"]["state"][i][k]), (role, i, k)
        for role in a["params"]:
            for name, (p, _, _) in a["params"][role].items():
                assert torch.equal(p, b["params"][role][name][0]), (role, name)
