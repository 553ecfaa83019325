"""README's commands for the DPO, SimPO, GRPO and PaliGemma quickstarts, run as written and in the order
written (tests/readme_steps.py says how, and on which backend; they do not depend on the main chain of
tests/test_readme.py, and run beside it); what they leave is then checked."""

from readme_steps import bash_commands, chain_steps, check_quickstarts, run_steps


def test_readme_quickstarts_run_in_order(tmp_path):
    steps = chain_steps("quickstarts")
    commands = bash_commands(steps)
    for recipe in ("quickstart_dpo", "quickstart_simpo", "quickstart_grpo", "paligemma_quickstart"):
        assert f"gemma-tune run recipes/{recipe}.yaml" in commands, recipe
    run_steps(steps, tmp_path)
    check_quickstarts(tmp_path)
