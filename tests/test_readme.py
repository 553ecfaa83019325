"""README's commands of the main chain, run as written and in the order written (so the README cannot
rot; tests/readme_steps.py says how, and on which backend): the quickstart itself (README's `gemma-tune run
recipes/quickstart.yaml`), its continuation, exports and the Python API examples; what they leave is then
checked. The other quickstarts' steps run in tests/test_readme_quickstarts.py."""

from readme_steps import bash_commands, chain_steps, check_main_chain, run_steps


def test_readme_commands_run_in_order(tmp_path):
    steps = chain_steps("main")
    assert "gemma-tune run recipes/quickstart.yaml" in bash_commands(steps), "README runs the main job"
    run_steps(steps, tmp_path)
    check_main_chain(tmp_path)
