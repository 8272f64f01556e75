"""A clone set up as the README says runs what CI runs: the same installs, so the same tests."""

from __future__ import annotations

from conftest import ROOT


def test_the_readme_sets_up_what_ci_installs():
    setup = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("python3 -m venv"))
    installs = [command for command in setup.split(" && ") if command.startswith("pip install")]
    ci = (ROOT / ".ci" / "run").read_text().replace("python -m pip", "pip").replace(" --quiet", "")
    assert len(installs) == 2 and all(command in ci for command in installs), (installs, setup)
    assert ci.count("pip install") == len(installs) + 1  # (+ pip's own upgrade): nothing CI alone installs
