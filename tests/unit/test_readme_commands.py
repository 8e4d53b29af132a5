"""What the README tells a new user to type works as written: its commands parse, its requirements
hold what pytest.ini needs."""
import re
import shlex

from tests.helpers.paths import REPO

README = (REPO / "README.md").read_text()


def test_cpu_requirements_hold_every_pytest_plugin_pytest_ini_uses():
    ini = (REPO / "pytest.ini").read_text()
    reqs = {re.split(r"[<>=\s#]", line, maxsplit=1)[0].lower()
            for line in (REPO / "requirements" / "cpu.txt").read_text().splitlines() if line and line[0].isalpha()}
    needs = {"pytest"} | ({"pytest-xdist"} if re.search(r"(^|\s)-n\s", ini) else set()) | (
        {"pytest-timeout"} if "timeout" in ini or "timeout" in README else set())
    assert needs <= reqs, needs - reqs


def test_every_eval_command_in_the_readme_parses():
    from megatron_tip.eval.__main__ import parse_args

    cmds = re.findall(r"python -m megatron_tip\.eval ([^`\n]+)", README)
    assert cmds
    for cmd in cmds:
        parse_args(shlex.split(cmd))  # argparse exits 2 on a missing --model / --data


def test_readme_says_deselected_not_skipped_for_marker_filters():
    setup = README[README.index("## Set up and run"):README.index("Command 1")]
    assert "deselected" in setup and "skipped" not in setup
