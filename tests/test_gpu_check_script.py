"""The GPU check script's own plumbing, on the CPU: a stage that its help names but its parser refuses costs a
whole GPU session (it happened: `--stage tune` was documented and refused)."""

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
TEXT = SCRIPT.read_text()


def _documented_stages() -> list[str]:
    section = TEXT.split("# Stages", 1)[1].split("# Each stage runs", 1)[0]
    return re.findall(r"^#   ([a-z][a-z-]*) ", section, flags=re.MULTILINE)


def _declared_stages() -> list[str]:
    return re.search(r"^ALL_STAGES=\(([^)]*)\)", TEXT, flags=re.MULTILINE).group(1).split()


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_every_documented_stage_is_declared_and_has_a_branch():
    documented = _documented_stages()
    assert documented and sorted(documented) == sorted(_declared_stages())
    for stage in documented:
        assert re.search(rf"^        {re.escape(stage)}\)$", TEXT, flags=re.MULTILINE), stage


def test_stages_are_accepted_and_unknown_ones_refused(tmp_path):
    # install and tune skip themselves in a CPU dry run, so this runs the parser and the summary in seconds.
    done = _run(str(tmp_path / "out"), "--cpu-dry-run", "--stage", "install", "--stage", "tune")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "install     skipped" in done.stdout and "tune        skipped" in done.stdout
    refused = _run(str(tmp_path / "out2"), "--cpu-dry-run", "--stage", "no-such-stage")
    assert refused.returncode == 2 and "unknown stage: no-such-stage" in refused.stdout


def test_the_extension_test_group_names_existing_files():
    # A misspelt file there would make the extension group's pytest exit with an error, a test stage lost.
    text = (SCRIPT.parent / "gpu_tests.sh").read_text()
    files = re.search(r"^EXT_FILES=\(([^)]*)\)", text, flags=re.MULTILINE).group(1).split()
    assert files and all((SCRIPT.parents[1] / f).is_file() for f in files), files
