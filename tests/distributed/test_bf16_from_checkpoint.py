"""bf16 stages that start from another stage's checkpoint (the normal RLHF path: RM and DPO from SFT) train with
finite weights and losses, and their first update starts from the loaded weights. Before the fix the fp32 masters
were copied from the uninitialised (meta-built) model before the load, and the first step wrote that garbage into
the weights: NaN after one step."""

import math

import torch
from harness import run_ranks
from sft_runs import TINY
from stage_runs import DEMO, stage_overrides, stage_rank


def bf16_sft_rank(rank: int, out: str) -> None:
    from mrlhf.config import load_config
    from mrlhf.parallel.state import init_distributed
    from mrlhf.trainers.sft import train_sft

    over = [o for o in stage_overrides(out, {}, ["training.train_steps=2", "training.precision=bf16"])
            if not o.startswith(("data.train_path", "data.eval_path", "data.data_split", "data.eval_fraction"))]
    over += [f"data.train_path={DEMO}/sft_train.jsonl", "data.eval_path=null"]
    cfg = load_config(TINY, over)
    train_sft(cfg, init_distributed(cfg))


def test_bf16_rm_and_dpo_from_an_sft_checkpoint_stay_finite(tmp_path):
    sft = str(tmp_path / "sft")
    run_ranks(bf16_sft_rank, 1, sft)
    for stage in ("rm", "dpo"):
        extra = ["training.precision=bf16", "training.train_steps=3", f"checkpoint.load_dir={sft}/checkpoints",
                 "checkpoint.enabled=false"]  # fmt: skip
        (res,) = run_ranks(stage_rank, 1, stage, str(tmp_path / stage), {}, extra)
        assert len(res["losses"]) == 3 and all(math.isfinite(x) for x in res["losses"]), (stage, res["losses"])
        assert res["params"] and all(torch.isfinite(t.float()).all() for t in res["params"].values()), stage
