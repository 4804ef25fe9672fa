"""The embedded demo task: arithmetic word problems with a format instruction and an exact gold judge.

Assets (made by `tools/make_demo_assets.py`) live in `mrlhf/assets/demo/`; see docs/demo.md.
"""

from pathlib import Path

from mrlhf.demo.judge import gold_response, judge_batch, score

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"

__all__ = ["ASSETS_DIR", "gold_response", "judge_batch", "score"]
