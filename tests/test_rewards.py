"""Reward functions of online RL (gemma_tune.rewards): the built-ins on hand examples, the weighted total with
not-applicable values (TRL's nansum), an imported function, the errors of a function that raises or returns
something unusable, the recipe checks with their keys, and a reward model scoring as `gemma_tune.score` does."""

import math
import sys

import numpy as np
import pytest

from gemma_tune.config.schema import RewardItem
from gemma_tune.errors import ConfigError
from gemma_tune.rewards import (RewardError, RewardFunction, answer_match, format, length_penalty, load_rewards,
                                reward_problems, score_completions)

GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                "altogether in April and May.\n#### 72")


def matches(completions, answers, **options):
    return answer_match(["q"] * len(completions), completions, answer=answers, **options)


def test_answer_match_reads_the_final_answer_of_each_layout():
    completions = [
        "In May she sold 24, so 48 + 24 = 72.\n#### 72",           # GSM8K's layout
        "#### 70\nOn second thought:\n#### 72",                    # the last #### wins
        r"The total is $\boxed{72}$.",                               # \boxed{}
        r"So x = \boxed{\frac{144}{2}} clips, not 70.",            # balanced braces, a fraction
        "<reasoning>48 + 24</reasoning><answer> 72 </answer>",     # an <answer> tag
        "48 and 24 make 72 clips.",                                 # the last number
        "She sold 24 in May, 72 in total, not 96.",                # the last number: wrong
        "#### 71",                                                  # a wrong answer
        "I do not know how many clips she sold.",                  # no number at all
    ]
    assert matches(completions, [GSM8K_ANSWER] * 9) == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_answer_match_compares_numbers_as_numbers_and_other_answers_as_strings():
    completions = ["#### $1,234", "#### 1234.0", "The answer is 1,234.", "<answer>0.75</answer>",
                   r"\boxed{75\%}", "#### 3/4", "<answer> Paris </answer>", "<answer>paris</answer>", "Paris",
                   "#### −5"]
    answers = ["1234", "1,234", "$1234", "3/4", "75", r"\frac{3}{4}", "Paris", "Paris", "Paris", "-5"]
    assert matches(completions, answers) == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_answer_match_column_option_and_missing_references():
    assert answer_match(["q", "q"], ["#### 3", "#### 3"], column="label", label=["3", None], answer=["4", "4"]) \
        == [1.0, None]
    with pytest.raises(RewardError, match=r"column 'answer'.*their columns: label"):
        answer_match(["q"], ["#### 3"], label=["3"], completion_ids=[[1]])


def test_format_matches_the_whole_stripped_completion():
    pattern = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
    completions = ["<reasoning>\n48 + 24\n</reasoning>\n<answer>72</answer>\n",  # multi-line, trailing newline
                   "<reasoning>48 + 24</reasoning><answer>72</answer> so 72",     # extra text after
                   "Sure! <reasoning>x</reasoning><answer>72</answer>",           # extra text before
                   "<answer>72</answer>"]
    assert format(["q"] * 4, completions, pattern=pattern) == [1.0, 0.0, 0.0, 0.0]


def test_length_penalty_in_its_three_regions():
    """L_max = 10, L_cache = 4: no penalty up to 6 tokens, then linear to −1 at 10, −1 beyond."""
    ids = [[7] * n for n in (0, 6, 7, 8, 10, 11)]
    values = length_penalty(["q"] * 6, ["c"] * 6, completion_ids=ids, max_length=10, buffer=4)
    assert values == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    # defaults through load_rewards: L_max = rl.max_completion_length = 8, L_cache = 8 // 4 = 2
    (f,) = load_rewards(["length_penalty"], max_completion_length=8)
    assert f.fn(["q"] * 4, ["c"] * 4, completion_ids=[[1] * n for n in (6, 7, 8, 9)]) == [0.0, -0.5, -1.0, -1.0]


def test_weighted_total_counts_not_applicable_as_zero():
    first = RewardFunction("first", 2.0, "rl.rewards[0]", lambda prompts, completions, **_: [1.0, None, 0.5, None])
    second = RewardFunction("second", 0.5, "rl.rewards[1]",
                            lambda prompts, completions, **_: np.array([-1.0, 4.0, float("nan"), None], object))
    total, values = score_completions([first, second], ["p"] * 4, ["a", "b", "c", "d"], {}, [[1]] * 4)
    assert total.dtype == np.float32 and values["first"].dtype == np.float32
    np.testing.assert_array_equal(total, [2.0 * 1.0 + 0.5 * -1.0, 0.5 * 4.0, 2.0 * 0.5, 0.0])
    np.testing.assert_array_equal(values["first"], [1.0, np.nan, 0.5, np.nan])
    np.testing.assert_array_equal(values["second"], [-1.0, 4.0, np.nan, np.nan])


def test_functions_receive_the_columns_and_completion_ids():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, **kwargs)
        return [0.0] * len(completions)

    prompts = [[{"role": "user", "content": "2+2?"}]] * 2
    score_completions([RewardFunction("spy", 1.0, "rl.rewards[0]", spy)], prompts, ["4", "5"],
                      {"answer": ["4", "4"], "level": [1, 1]}, [[10, 11], [12]])
    assert seen == {"prompts": prompts, "completions": ["4", "5"], "answer": ["4", "4"], "level": [1, 1],
                    "completion_ids": [[10, 11], [12]]}


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `my_rewards` on sys.path with reward functions of the user's."""
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, *, limit=5, **kwargs):\n"
        "    return [1.0 if len(c) <= limit else 0.0 for c in completions]\n"
        "\n"
        "def no_kwargs(prompts, completions):\n"
        "    return [0.0] * len(completions)\n"
        "\n"
        "NOT_A_FUNCTION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_an_imported_function_with_args_and_weights(user_module):
    items = ["my_rewards:short", RewardItem(name="my_rewards:short", weight=0.5, args={"limit": 2}),
             RewardItem(name="format", args={"pattern": r"\d+"})]
    functions = load_rewards(items, max_completion_length=16)
    assert [(f.name, f.weight, f.where) for f in functions] == [
        ("short", 1.0, "rl.rewards[0]"), ("short_2", 0.5, "rl.rewards[1]"), ("format", 1.0, "rl.rewards[2]")]
    total, values = score_completions(functions, ["p"] * 3, ["12", "1234", "abcdefg"], {}, [[1]] * 3)
    np.testing.assert_array_equal(values["short"], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(values["short_2"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(values["format"], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(total, [2.5, 2.0, 0.0])


def failing(prompts, completions, **_):
    return [1.0 / (len(c) - 3) for c in completions]  # ZeroDivisionError on a completion of 3 characters


def test_a_function_that_raises_names_itself_the_completion_and_its_prompt():
    f = RewardFunction("failing", 1.0, "rl.rewards[1]", failing)
    prompts = ["first prompt", "second prompt", "x" * 500]
    with pytest.raises(RewardError) as caught:
        score_completions([f], prompts, ["ok!!", "bad", "bad"], {}, [[1]] * 3)
    error = caught.value
    assert error.where == "rl.rewards[1]"
    assert "reward 'failing' raised on completion 1 (prompt 'second prompt'): ZeroDivisionError" in error.message
    assert isinstance(error.__cause__, ZeroDivisionError)
    with pytest.raises(RewardError, match="completion 0") as caught:  # a long prompt is shortened
        score_completions([f], prompts[2:], ["bad"], {}, [[1]])
    assert "x" * 199 + "…'" in caught.value.message and "x" * 200 not in caught.value.message


def test_a_function_failing_only_on_the_whole_round():
    def batch_only(prompts, completions, **_):
        if len(completions) > 1:
            raise RuntimeError("out of memory")
        return [0.0]

    with pytest.raises(RewardError, match="on none of them alone: RuntimeError: out of memory") as caught:
        score_completions([RewardFunction("batch_only", 1.0, "rl.rewards[0]", batch_only)], ["p", "q"], ["a", "b"],
                          {}, [[1], [2]])
    assert isinstance(caught.value.__cause__, RuntimeError)


@pytest.mark.parametrize("returned, expected", [
    ([1.0], r"returned 1 values for 2 completions; expected a list of 2 numbers"),
    (0.5, r"returned float 0.5; expected a list of 2 numbers"),
    ("10", r"returned str '10'"),
    ([1.0, float("inf")], r"returned inf for completion 1 \(prompt 'q'\); expected a finite number"),
    ([1.0, "1.0"], r"returned '1.0' \(str\) for completion 1 \(prompt 'q'\)"),
    (np.zeros((2, 1)), r"returned ndarray"),
])
def test_unusable_values_are_reward_errors(returned, expected):
    f = RewardFunction("odd", 1.0, "rl.rewards[2]", lambda prompts, completions, **_: returned)
    with pytest.raises(RewardError, match=expected) as caught:
        score_completions([f], ["p", "q"], ["a", "b"], {}, [[1], [2]])
    assert caught.value.where == "rl.rewards[2]" and "reward 'odd'" in caught.value.message


def test_reward_problems_name_their_keys():
    problems = reward_problems([
        "answer_match", "answr_match", "my.module", "my.module:", "package.module:function",
        RewardItem(name="format"), RewardItem(name="format", args={"pattern": "(", "flags": 1}),
        RewardItem(name="length_penalty", args={"max_length": 8, "buffer": 9}),
        RewardItem(name="length_penalty", args={"max_length": 0, "buffer": -1}),
        RewardItem(name="answer_match", weight=float("inf"), args={"column": 3}),
        RewardItem(model="runs/rm", args={"batch_size": 0, "dtype": "float32"}),
        RewardItem(name="nope"),
    ])
    keys = [key for key, _ in problems]
    assert keys == ["rl.rewards[1]", "rl.rewards[2]", "rl.rewards[3]", "rl.rewards[5].args.pattern",
                    "rl.rewards[6].args.flags", "rl.rewards[6].args.pattern", "rl.rewards[7].args.buffer",
                    "rl.rewards[8].args.max_length", "rl.rewards[8].args.buffer", "rl.rewards[9].weight",
                    "rl.rewards[9].args.column", "rl.rewards[10].args.batch_size", "rl.rewards[10].args.dtype",
                    "rl.rewards[11].name"]
    text = dict(problems)
    assert "did you mean 'answer_match'?" in text["rl.rewards[1]"]
    assert "package.module:function" in text["rl.rewards[2]"] and "package.module:function" in text["rl.rewards[3]"]
    assert r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>" in text["rl.rewards[5].args.pattern"]
    assert "not a valid regular expression" in text["rl.rewards[6].args.pattern"]
    assert "not an option of format (its options: pattern)" == text["rl.rewards[6].args.flags"]
    assert "at most max_length (8)" in text["rl.rewards[7].args.buffer"]
    assert "not an option of a reward model (its options: batch_size)" == text["rl.rewards[10].args.dtype"]
    assert reward_problems([]) and reward_problems([])[0][0] == "rl.rewards"
    assert reward_problems([RewardItem(name="format", args={"pattern": "a+"}), "answer_match"]) == []


def test_reward_problems_import_neither_keras_nor_the_functions():
    import subprocess

    code = ("import sys; from gemma_tune.rewards import reward_problems; "
            "assert reward_problems(['answer_match', 'not_imported_module:f', 'length_penalty']) == []; "
            "assert not {'keras', 'not_imported_module', 'jax', 'tensorflow', 'torch'} & set(sys.modules), "
            "sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_rewards_errors_name_their_keys(user_module):
    cases = [
        ([], "rl.rewards", "at least one reward"),
        (["answer_match", "frmat"], "rl.rewards[1]", "did you mean 'format'"),
        ([RewardItem(name="format")], "rl.rewards[0].args.pattern", "required"),
        ([RewardItem(name="length_penalty", args={"buffer": 9})], "rl.rewards[0].args.buffer",
         r"at most max_length \(8: rl.max_completion_length\)"),
        (["no_such_module_here:f"], "rl.rewards[0]", "could not import module 'no_such_module_here' "
                                                     r"\(ModuleNotFoundError"),
        ([RewardItem(name="my_rewards:missing")], "rl.rewards[0].name", "module 'my_rewards' has no 'missing'"),
        ([RewardItem(name="my_rewards:NOT_A_FUNCTION")], "rl.rewards[0].name", "is a int, not a function"),
        (["my_rewards:no_kwargs"], "rl.rewards[0]", r"takes no \*\*kwargs"),
        (["my_rewards.short"], "rl.rewards[0]", "expected a Python function as package.module:function"),
        ([RewardItem(model="/no/such/reward/model")], "rl.rewards[0].model", "could not load the reward model"),
    ]
    for items, where, message in cases:
        with pytest.raises(ConfigError, match=message) as caught:
            load_rewards(items, max_completion_length=8)
        assert caught.value.where == where, (items, caught.value)


# ---- a reward model (Keras: every backend) ----------------------------------------------------------------
TINY = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "query_pre_attn_scalar": 8}
TOKENIZER = "data/tiny/tokenizer.model"


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny RewardModel (random decoder and score head) exported as safetensors, and a causal LM's export."""
    import keras

    from gemma_tune.config.presets import preset_architecture
    from gemma_tune.export import export_model
    from gemma_tune.models import RewardModel, build_model
    from gemma_tune.tokenizer import load_tokenizer

    keras.utils.set_random_seed(3)
    root = tmp_path_factory.mktemp("reward_models")
    lm = build_model(preset_architecture("gemma3_tiny", **TINY))
    export_model(RewardModel(lm), load_tokenizer(TOKENIZER), root / "rm", "safetensors")
    export_model(lm, load_tokenizer(TOKENIZER), root / "lm", "safetensors")
    return root


def test_a_reward_model_scores_as_gemma_tune_score(reward_model_dir):
    import gemma_tune
    from gemma_tune.data.render import Tokenise
    from gemma_tune.scoring import score_sequences
    from gemma_tune.tokenizer import load_tokenizer

    rm = str(reward_model_dir / "rm")
    functions = load_rewards([RewardItem(model=rm, weight=2.0, args={"batch_size": 2}), RewardItem(model=rm)],
                             max_completion_length=8)
    assert [(f.name, f.weight) for f in functions] == [("reward_model", 2.0), ("reward_model_2", 1.0)]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompts = ["What is 2 + 2?", "What is 2 + 2?", "Say hi.", chat, chat]
    completions = ["4", "  It is five.\n", "Hello there!", "Blue.", ""]
    total, values = score_completions(functions, prompts, completions, {"answer": ["4"] * 5}, [[1]] * 5)
    string_rows = [{"prompt": p, "completion": c} for p, c in zip(prompts[:3], completions[:3])]
    expected = gemma_tune.score(rm, string_rows, batch_size=3).scores
    expected += gemma_tune.score(rm, [{"messages": chat + [{"role": "assistant", "content": "Blue."}]}]).scores
    np.testing.assert_allclose(values["reward_model"][:4], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values["reward_model_2"], values["reward_model"], rtol=1e-5, atol=1e-5)
    assert len(set(np.round(expected, 5))) == 4  # the random head tells the rows apart
    # an empty completion is the empty model turn: the prompt, then <end_of_turn>\n
    tok = load_tokenizer(TOKENIZER)
    from gemma_tune.loading import load_model

    ids = Tokenise(TOKENIZER, "prompt", "chat", "completion")({"prompt": chat})["input_ids"]
    empty = score_sequences(load_model(rm), [ids + [tok.end_of_turn_id] + tok.encode("\n")])
    np.testing.assert_allclose(values["reward_model"][4], empty[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total, 3.0 * values["reward_model"], rtol=1e-5, atol=1e-5)
    assert all(math.isfinite(v) for v in total)


def test_a_causal_lm_is_not_a_reward_model(reward_model_dir):
    with pytest.raises(ConfigError, match="not a reward model") as caught:
        load_rewards(["answer_match", RewardItem(model=str(reward_model_dir / "lm"))], max_completion_length=8)
    assert caught.value.where == "rl.rewards[1].model"


def test_a_reward_model_without_a_tokenizer_uses_the_one_given(reward_model_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(reward_model_dir / "rm", bare)
    (bare / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="could not load the reward model.*no tokenizer") as caught:
        load_rewards([RewardItem(model=str(bare))], max_completion_length=8)
    assert caught.value.where == "rl.rewards[0].model"
    (f,) = load_rewards([RewardItem(model=str(bare))], max_completion_length=8, tokenizer=TOKENIZER)
    (own,) = load_rewards([RewardItem(model=str(reward_model_dir / "rm"))], max_completion_length=8)
    args = (["Say hi."], ["Hello!"], {}, [[1]])
    np.testing.assert_allclose(score_completions([f], *args)[0], score_completions([own], *args)[0], rtol=1e-6)
