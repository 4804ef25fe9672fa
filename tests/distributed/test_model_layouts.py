"""Checkpoints load at another TP/PP layout with equal logits; heads agree across layouts and with references."""

import pytest
import torch
from harness import run_ranks
from model_runs import fixed_batch, heads_rank, load_then_logits, save_trained_then_logits

TOL = 1e-5


def last_stage(results):
    return [r for r in results if r.get("logits") is not None]


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_checkpoint_saved_tp2pp2_loads_at_tp1(flavour, tmp_path):
    saved = last_stage(run_ranks(save_trained_then_logits, 4, str(tmp_path), {"tp": 2, "pp": 2}, flavour))
    (loaded,) = run_ranks(load_then_logits, 1, str(tmp_path), {}, flavour)
    ref = saved[0]["logits"]
    assert (loaded["before"] - ref).abs().max() > 1e-2  # the fresh model really was different
    assert (loaded["norms_reset"] - ref).abs().max() > 1e-2  # saved norms/biases are not their init values
    assert (loaded["logits"] - ref).abs().max() <= TOL
    # and back up: TP1PP1 checkpoint loads at TP2xPP2
    tp1 = str(tmp_path / "tp1")
    (saved1,) = run_ranks(save_trained_then_logits, 1, tp1, {}, flavour)
    back = last_stage(run_ranks(load_then_logits, 4, tp1, {"tp": 2, "pp": 2}, flavour))
    for r in back:
        assert (r["logits"] - saved1["logits"]).abs().max() <= TOL


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_heads_match_across_layouts_and_reference(flavour):
    (ref,) = run_ranks(heads_rank, 1, {}, flavour)
    batch = fixed_batch(384)
    mask = batch["attention_mask"]
    # LM head: vocab-parallel log-probs equal log_softmax of the full logits at the labels
    want = torch.log_softmax(ref["logits"], -1).gather(-1, batch["labels"][..., None]).squeeze(-1)
    assert (ref["actor"] - want).abs().max() <= TOL
    # padding is invisible: junk in pad slots, the sample run alone, and left padding all give the same reward
    assert ref["reward"].shape == (3,) and ref["critic"].shape == (3, 11)
    assert (ref["reward_junk_pad"] - ref["reward"]).abs().max() <= TOL
    assert abs(float(ref["reward_alone"][0]) - float(ref["reward"][1])) <= TOL
    assert (ref["reward_left_pad"] - ref["reward"]).abs().max() <= TOL
    for layout, world in (({"tp": 2}, 2), ({"pp": 2}, 2), ({"tp": 2, "pp": 2}, 4)):
        results = [r for r in run_ranks(heads_rank, world, layout, flavour) if r["actor"] is not None]
        assert len(results) == layout.get("tp", 1)  # every TP rank of the last stage holds the outputs
        for r in results:
            assert (r["logits"] - ref["logits"]).abs().max() <= TOL
            assert (r["actor"] - ref["actor"]).abs().max() <= TOL
            assert ((r["critic"] - ref["critic"]) * mask).abs().max() <= TOL
            assert (r["reward"] - ref["reward"]).abs().max() <= TOL
