"""Exact resume with dropout > 0 at TP2: the default stream and each TP rank's attention-dropout stream
(parallel/random.py) are saved and restored, so the resumed run draws the uninterrupted run's masks."""

import torch
from harness import run_ranks
from sft_runs import assert_bitwise_equal_params, set_fault, sft_rank

DROPOUT = ["model.hidden_dropout=0.1", "model.attention_dropout=0.2", "training.train_steps=4",
           "checkpoint.save_interval=2"]  # fmt: skip


def test_resume_with_dropout_at_tp2_is_bitwise_equal(tmp_path):
    full = run_ranks(sft_rank, 2, str(tmp_path / "full"), {"tp": 2}, DROPOUT)
    (no_dropout,) = run_ranks(sft_rank, 1, str(tmp_path / "nd"), {}, DROPOUT[2:])
    assert full[0]["losses"] != no_dropout["losses"]  # dropout is really on
    out = str(tmp_path / "killed")
    run_ranks(sft_rank, 2, out, {"tp": 2}, DROPOUT, env=set_fault("after_step:3"), expect_exit=137)
    resumed = run_ranks(sft_rank, 2, out, {"tp": 2}, DROPOUT)
    for a, b in zip(full, resumed):
        assert b["losses"] == a["losses"][2:]
    assert_bitwise_equal_params(full, resumed)


def test_tp_region_streams_differ_between_tp_ranks_and_leave_the_default_stream_alone():
    from mrlhf.parallel import random as mp_random

    masks = []
    for tp_rank in (0, 1):
        torch.manual_seed(7)
        mp_random.seed_model_parallel(1234, tp_rank)
        with mp_random.model_parallel_rng(torch.device("cpu")):
            masks.append(torch.rand(64))
        after = torch.rand(4)
        torch.manual_seed(7)
        assert torch.equal(after, torch.rand(4))  # the default stream did not move
    assert not torch.equal(masks[0], masks[1])
    saved = mp_random.get_states()
    with mp_random.model_parallel_rng(torch.device("cpu")):
        first = torch.rand(8)
    mp_random.set_states(saved)
    with mp_random.model_parallel_rng(torch.device("cpu")):
        assert torch.equal(torch.rand(8), first)  # restored state repeats the draw
