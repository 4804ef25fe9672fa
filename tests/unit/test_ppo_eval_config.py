"""Held-out PPO evaluation's settings: bad values and a missing eval split are one line before start-up."""

from pathlib import Path

import pytest

from mrlhf.config import load_config
from mrlhf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PPO_YAML = str(ROOT / "configs" / "ppo_demo.yaml")


@pytest.mark.parametrize(
    "override,words",
    [("ppo.eval_temperature=-1", "ppo.eval_temperature must be in [0, 10]"),
     ("ppo.eval_temperature=.nan", "'ppo.eval_temperature' must be a finite number"),
     ("ppo.eval_reward_function=no_colon", "ppo.eval_reward_function must be 'module:callable'"),
     ("ppo.eval_reward_function=a:b,:c", "got ':c'")],
)  # fmt: skip
def test_bad_eval_settings_name_the_field(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(PPO_YAML, [override])
    assert words in str(e.value), str(e.value)


def test_eval_reward_functions_are_split():
    cfg = load_config(PPO_YAML, ["ppo.eval_reward_function=mrlhf.demo.judge:reward, tests.x:y"])
    assert cfg.ppo.eval_reward_functions == ["mrlhf.demo.judge:reward", "tests.x:y"]
    assert load_config(PPO_YAML, ["ppo.eval_reward_function=null"]).ppo.eval_reward_functions == []


def error_line(capsys, code: int) -> str:
    assert code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("mrlhf: error:"), lines
    return lines[0]


def test_cli_refuses_evaluation_without_an_eval_split_and_an_unimportable_eval_function(capsys, tmp_path):
    from mrlhf.cli import main

    no_roles = ["ppo.actor_load_dir=null", "ppo.critic_load_dir=null", f"training.output_dir={tmp_path / 'out'}",
                "data.cache_dir=null"]  # fmt: skip
    line = error_line(capsys, main(["ppo", "--config", PPO_YAML, "data.eval_path=null", "training.eval_interval=5",
                                    *no_roles]))  # fmt: skip
    assert "training.eval_interval > 0" in line and "data.eval_path" in line, line
    # a split that rounds to no rows (0.01% of 2000 prompts) is refused as none
    line = error_line(capsys, main(["ppo", "--config", PPO_YAML, "data.eval_path=null", "data.eval_fraction=0.0001",
                                    *no_roles]))  # fmt: skip
    assert "training.eval_interval > 0" in line, line
    line = error_line(capsys, main(["ppo", "--config", PPO_YAML, "ppo.eval_reward_function=no_such_eval_mod:f",
                                    *no_roles]))  # fmt: skip
    assert "ppo.eval_reward_function=no_such_eval_mod:f: cannot import module 'no_such_eval_mod'" in line, line
    assert not (tmp_path / "out").exists()


def test_plot_has_an_eval_figure_from_the_sparse_eval_records(tmp_path):
    import json

    from mrlhf.plot import figure_groups, plot_run

    records = [{"iteration": 0, "eval_reward_mean": 0.5, "eval_response_length": 7.0, "time_eval_s": 0.2}]
    records += [{"iteration": i, "reward_raw_mean": 0.1 * i, "time_generate_s": 0.5} for i in (1, 2, 3)]
    records[2].update(eval_reward_mean=0.7, eval_response_length=6.0, time_eval_s=0.2)
    x_key, groups = figure_groups(records)
    assert x_key == "iteration"
    assert groups["eval"] == ["eval_reward_mean", "eval_response_length"]
    assert groups["time"] == ["time_generate_s", "time_eval_s"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pytest.importorskip("matplotlib")
    assert (run / "plots" / "eval.png").as_posix() in [p.replace("\\", "/") for p in plot_run(str(run))]
