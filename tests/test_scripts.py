"""Every script under scripts/ that the README offers runs in some test: the SLURM ones in tests/test_slurm.py,
launch_students.sh in tests/test_scale_out.py, config_reference.py in tests/test_config.py, setup_venv.sh through
`make setup` (.ci/run), gpu_checks.sh on a lent GPU only. Here: the thin per-stage scripts reach the CLI's stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "base", "compress", "specialize", "combine", "evaluate", "run")


@pytest.mark.parametrize("stage", STAGES)
def test_thin_stage_script_is_the_cli_stage(stage):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{stage}.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"usage: downscale {stage}" in out.stdout, out.stdout


def test_thin_compress_script_plans_the_demo():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "compress.py"), str(ROOT / "configs" / "demo.yaml"),
                          "--plan", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["num_students"] == 3
    assert plan["student"]["params"]["total"] <= plan["target_params"] <= 0.65 * plan["base"]["params"]["total"]


def test_the_readme_offers_no_script_that_no_test_runs():
    readme = (ROOT / "README.md").read_text()
    offered = {p.name for p in (ROOT / "scripts").iterdir() if f"scripts/{p.name}" in readme}
    tested = "".join(p.read_text() for p in (ROOT / "tests").glob("*.py")) + (ROOT / "Makefile").read_text()
    untested = sorted(name for name in offered if name not in tested and name != "gpu_checks.sh")
    assert not untested, f"README offers scripts no test runs: {untested}"
