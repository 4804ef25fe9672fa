"""1F1B frees what it has sent: every non-last stage output is pseudo-freed right after its send (megatron's
deallocate_output_tensor), and PP2 losses and gradients still equal PP1 (the SFT numerics tests check those too)."""

from harness import run_ranks
from sft_runs import sft_rank


def freed_outputs_rank(rank: int, out: str) -> dict:
    from mrlhf.parallel import comm

    sent = []
    original = comm.send_forward, comm.send_forward_recv_backward

    def send_forward(t):
        sent.append(t)
        return original[0](t)

    def send_forward_recv_backward(t, spec):
        sent.append(t)
        return original[1](t, spec)

    comm.send_forward, comm.send_forward_recv_backward = send_forward, send_forward_recv_backward
    result = sft_rank(rank, out, {"pp": 2}, ["training.train_steps=2", "checkpoint.enabled=false"])
    return {"sent": len(sent), "freed": sum(t.numel() == 1 for t in sent), "losses": result["losses"]}


def test_sent_stage_outputs_are_freed_and_numerics_hold(tmp_path):
    first, last = run_ranks(freed_outputs_rank, 2, str(tmp_path / "pp2"))
    # 2 steps x 4 microbatches of 1F1B, each freed once sent; the final eval's 32 forward-only sends keep nothing alive
    assert first["freed"] == 8 and first["sent"] == 8 + 32
    assert last["sent"] == 0
    (ref,) = run_ranks(sft_rank, 1, str(tmp_path / "pp1"), {}, ["training.train_steps=2", "checkpoint.enabled=false"])
    for got, want in zip(last["losses"], ref["losses"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want)
