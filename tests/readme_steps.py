"""README's commands as steps, and how the README tests run them: every line of its shell blocks after the
set-up section, and every Python block, each in a fresh interpreter, in order, in a scratch directory that
holds the project's recipes/, configs/ and data/. The steps are split in two independent chains (the main
quickstart with its exports and API examples; the DPO, SimPO, GRPO and PaliGemma quickstarts) so that the
two test files run on parallel workers."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
# A step naming one of these belongs to the second chain (tests/test_readme_quickstarts.py).
OTHER_QUICKSTARTS = ("quickstart_dpo", "quickstart_simpo", "quickstart_grpo", "paligemma")


def readme_steps() -> list[tuple[str, str]]:
    """("bash", one command line) and ("python", one block), in README order, after the set-up section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    steps = []
    for match in BLOCK.finditer(text, text.index("## Using it")):
        kind, body = match.groups()
        if kind == "python":
            steps.append((kind, body))
        else:
            steps += [(kind, line) for line in body.splitlines() if line.strip() and not line.startswith("#")]
    return steps


def chain_steps(chain: str) -> list[tuple[str, str]]:
    """readme_steps() of one chain, in README order: "main" (no step names one of OTHER_QUICKSTARTS) or
    "quickstarts" (every step that does); together they are every step."""
    if chain not in ("main", "quickstarts"):
        raise ValueError(f"chain is main or quickstarts, not {chain!r}")
    return [(kind, step) for kind, step in readme_steps()
            if any(name in step for name in OTHER_QUICKSTARTS) == (chain == "quickstarts")]


def run_steps(steps: list[tuple[str, str]], workdir: Path) -> None:
    """Run `steps` in order in `workdir` (given recipes/, configs/, data/ links); each must exit 0 without a
    traceback."""
    for name in ("recipes", "configs", "data"):
        (workdir / name).symlink_to(ROOT / name)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for kind, step in steps:
        command = ["bash", "-c", step] if kind == "bash" else [sys.executable, "-c", step]
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"README step failed: {step}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, step


def bash_commands(steps: list[tuple[str, str]]) -> list[str]:
    """The shell steps with their trailing comments removed."""
    return [re.sub(r"\s+#.*$", "", step) for kind, step in steps if kind == "bash"]
