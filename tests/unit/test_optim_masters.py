"""bf16 runs keep fp32 master weights in the optimizer. They must hold the weights the run starts from: RM, DPO and
PPO build their models uninitialised (meta device), make the optimizer, *then* load another stage's checkpoint, so
masters copied at construction held garbage, and the first step wrote it into the model (bf16 RM from an SFT
checkpoint: NaN weights after one step). Masters now take the parameters' values at the first step or save."""

import torch

from mrlhf.config import OptimizerConfig
from mrlhf.plan import fake_world
from mrlhf.trainers.optim import Optimizer


def _param(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.bfloat16))


def test_weights_loaded_after_the_optimizer_is_made_are_what_the_first_step_starts_from():
    with fake_world(1, 0, 1, 1):
        p = _param([float("nan"), 1e30, -3.0, 0.0])  # what an uninitialised (to_empty) tensor may hold
        opt = Optimizer([p], OptimizerConfig(lr=0.01, weight_decay=0.0, eps=1e-8), fp32_grads=True)
        loaded = torch.tensor([0.5, -0.25, 2.0, 1.0], dtype=torch.bfloat16)
        with torch.no_grad():
            p.copy_(loaded)  # the checkpoint load
        p.main_grad = torch.tensor([1.0, -1.0, 2.0, -0.5])
        opt.step(lr=0.01)
        # Adam's first step moves each weight by lr * sign(g) (m/sqrt(v) = g/|g|), from the loaded value
        want = loaded.float() - 0.01 * torch.sign(p.main_grad)
        assert torch.isfinite(p.float()).all()
        assert torch.allclose(p.float(), want.to(torch.bfloat16).float(), atol=0, rtol=0), (p, want)


def test_a_save_before_the_first_step_stores_the_weights():
    with fake_world(1, 0, 1, 1):
        p = _param([7.0, 7.0])
        opt = Optimizer([p], OptimizerConfig(lr=0.01))
        with torch.no_grad():
            p.copy_(torch.tensor([1.5, -2.0]))
        (master,) = opt.state_dict()["masters"].values()  # e.g. the actor's state during PPO's critic warm-up
        assert master.dtype == torch.float32 and master.tolist() == [1.5, -2.0]
        # a loaded state's masters are kept as they are (a resume), not overwritten by the parameters
        other = Optimizer([p], OptimizerConfig(lr=0.01))
        state = opt.state_dict()
        state["masters"] = {0: torch.tensor([3.0, 4.0])}
        other.load_state_dict(state)
        p.main_grad = torch.zeros(2)
        other.step(lr=0.0)
        assert p.float().tolist() == [3.0, 4.0]
