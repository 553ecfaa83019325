"""Recipe composition, overrides and the errors for broken recipes (file, key path, expectation)."""

from pathlib import Path

import pytest
import yaml

from gemma_tune.cli import main
from gemma_tune.config import load_recipe, recipe_architecture, validate
from gemma_tune.config.presets import preset_architecture, preset_names
from gemma_tune.config.validate import check_backend_support
from gemma_tune.errors import ConfigError
from gemma_tune.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A directory with a chat file and a tokenizer file, and a valid recipe dict naming them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                         '{"role": "assistant", "content": "hello"}]}\n')
    (tmp_path / "tok.model").write_bytes(b"spm")
    recipe = {
        "name": "t",
        "model": {"preset": "gemma3_tiny", "tokenizer": "tok.model", "dtype": "float32"},
        "method": "sft",
        "lora": {"rank": 4},
        "data": {"train": {"path": "chat.jsonl", "format": "chat"}, "max_length": 64},
        "train": {"max_steps": 10, "learning_rate": 1e-3},
    }
    return tmp_path, recipe


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(source, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(source, overrides)
    return str(info.value)


def test_valid_recipe_resolves_paths_and_defaults(workspace):
    tmp, data = workspace
    recipe = load_recipe(write(tmp / "r.yaml", data))
    assert recipe.data.train.path == str(tmp / "chat.jsonl")
    assert recipe.model.tokenizer == str(tmp / "tok.model")
    assert recipe.output_dir == "runs/t"
    assert recipe.lora.targets == ["q", "k", "v", "o", "gate", "up", "down"]
    assert recipe.train.schedule == "cosine" and recipe.data.packing is True
    assert recipe_architecture(recipe).family == "gemma3"


def test_base_composition_later_wins_and_overrides_are_typed(workspace):
    tmp, data = workspace
    write(tmp / "base1.yaml", {"train": {"batch_size": 2, "learning_rate": 0.5}, "seed": 3})
    write(tmp / "base2.yaml", {"base": "base1.yaml", "train": {"batch_size": 4}})
    recipe = load_recipe(write(tmp / "r.yaml", {**data, "base": ["base2.yaml"], "train": {"max_steps": 5}}),
                         ["train.learning_rate=1e-4", "lora.rank=8", "data.packing=false"])
    assert recipe.seed == 3 and recipe.train.batch_size == 4 and recipe.train.max_steps == 5
    assert recipe.train.learning_rate == pytest.approx(1e-4) and isinstance(recipe.train.learning_rate, float)
    assert recipe.lora.rank == 8 and recipe.data.packing is False


def test_recipe_dict_equals_recipe_file(workspace):
    tmp, data = workspace
    assert load_recipe(data) == load_recipe(write(tmp / "r.yaml", data))


def test_architecture_overrides_apply_to_preset(workspace):
    _, data = workspace
    data["model"]["architecture"] = {"num_layers": 2}
    arch = recipe_architecture(load_recipe(data))
    assert arch.num_layers == 2 and arch.hidden_size == preset_architecture("gemma3_tiny").hidden_size


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates(name):
    arch = preset_architecture(name)
    assert arch.num_heads % arch.num_kv_heads == 0


def test_real_preset_facts():
    g2 = preset_architecture("gemma2_27b")
    assert g2.query_scale == pytest.approx(144 ** -0.5) and g2.attn_logit_softcap == 50.0
    assert [g2.is_sliding(i) for i in range(4)] == [True, False, True, False]
    g3 = preset_architecture("gemma3_4b")
    assert [g3.is_sliding(i) for i in range(12)] == [i % 6 < 5 for i in range(12)]
    assert g3.rope_for_layer(5) == (1e6, 8.0) and g3.rope_for_layer(0) == (1e4, 1.0)
    assert preset_architecture("gemma3_1b").rope_for_layer(5) == (1e6, 1.0)
    assert preset_architecture("gemma3_27b").query_scale == pytest.approx(168 ** -0.5)


# ---- a dozen kinds of broken recipe, each reported with the file, the key and what was expected ----

BROKEN = [
    ("unknown key with typo", lambda d: d["train"].update(lerning_rate=1), "r.yaml: train.lerning_rate: unknown key 'lerning_rate'; did you mean 'learning_rate'?"),
    ("unknown top-level key", lambda d: d.update(epochz=1), "r.yaml: epochz: unknown key 'epochz'"),
    ("wrong type", lambda d: d["train"].update(batch_size="eight"), "r.yaml: train.batch_size: expected a valid integer"),
    ("out of range", lambda d: d["train"].update(learning_rate=-1.0), "r.yaml: train.learning_rate: expected a value greater than 0, got -1.0"),
    ("lora dropout out of range", lambda d: d["lora"].update(dropout=1.5), "r.yaml: lora.dropout: expected a value less than 1, got 1.5"),
    ("bad lora target", lambda d: d["lora"].update(targets=["q", "qkv"]), "r.yaml: lora.targets.1: expected 'q', 'k', 'v', 'o', 'gate', 'up' or 'down', got 'qkv'"),
    ("unknown preset", lambda d: d["model"].update(preset="gemma3_1bb"), "r.yaml: model.preset: unknown model preset 'gemma3_1bb'; did you mean 'gemma3_1b'?"),
    ("unknown method", lambda d: d.update(method="sftt"), "r.yaml: method: unknown method 'sftt'; did you mean 'sft'?"),
    ("online RL on sft data", lambda d: d.update(method="grpo", rl={"rewards": ["answer_match"]}), "r.yaml: data.train.format: method grpo trains on prompt data, not chat"),
    ("an rl option without online RL", lambda d: d.update(rl={"beta": 0.1}), "r.yaml: rl.beta: an option of grpo, rloo, not of method sft"),
    ("rloo has no reward scaling", lambda d: d.update(method="rloo", rl={"scale_rewards": "batch", "rewards": ["format"]}), "r.yaml: rl.scale_rewards: not an option of rloo"),
    ("an option of another method", lambda d: d.update(preference={"beta": 0.2}), "r.yaml: preference.beta: an option of"),
    ("missing data file", lambda d: d["data"]["train"].update(path="nope.jsonl"), "r.yaml: data.train.path: data file or directory 'nope.jsonl' not found"),
    ("missing weights dir", lambda d: d["model"].update(weights="ckpt/gemma"), "r.yaml: model.weights: checkpoint directory 'ckpt/gemma' not found"),
    ("missing required key", lambda d: d["data"]["train"].pop("format"), "r.yaml: data.train.format: required key is missing"),
    ("unknown data format", lambda d: d["data"]["train"].update(format="chatt"), "r.yaml: data.train.format: unknown data format 'chatt'; did you mean 'chat'?"),
    ("bad architecture field", lambda d: d["model"].update(architecture={"num_kv_heads": 3}), "r.yaml: model.architecture: num_heads (4) must be a multiple of num_kv_heads (3)"),
    ("unknown architecture field", lambda d: d["model"].update(architecture={"hiden_size": 3}), "r.yaml: model.architecture.hiden_size: unknown key 'hiden_size'; did you mean 'hidden_size'?"),
    ("quantize without lora", lambda d: (d.pop("lora"), d.update(quantize="int4")), "r.yaml: quantize: quantising the base model freezes it"),
    ("bad quantize mode", lambda d: d.update(quantize="int3"), "r.yaml: quantize: expected 'int8' or 'int4', got 'int3'"),
    ("max_length beyond context", lambda d: d["data"].update(max_length=10**6), "r.yaml: data.max_length: expected at most the model's context of 1024 tokens"),
    ("random init without tokenizer", lambda d: d["model"].pop("tokenizer"), "r.yaml: model.tokenizer: a randomly initialised model"),
    ("no preset, architecture or weights", lambda d: d["model"].pop("preset"), "r.yaml: model.preset: expected a model preset (see `gemma-tune list`) or model.architecture for a randomly initialised model, or model.weights"),
    ("image data for a text model", lambda d: d["data"]["train"].update(format="image_text"), "r.yaml: data.train.format: image_text rows hold images but the model has no vision encoder"),
    ("preference data for sft", lambda d: d["data"]["train"].update(format="preference"), "r.yaml: data.train.format: method sft trains on"),
    ("warmup longer than run", lambda d: d["train"].update(warmup_steps=50), "r.yaml: train.warmup_steps: expected fewer warmup steps than train.max_steps (10), got 50"),
]


@pytest.mark.parametrize("name,breaks,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_recipe_is_reported(workspace, name, breaks, message):
    tmp, data = workspace
    breaks(data)
    assert message in error_of(write(tmp / "r.yaml", data))


def test_error_names_the_base_file_that_set_the_value(workspace):
    tmp, data = workspace
    write(tmp / "parts.yaml", {"train": {"batch_size": 0}})
    text = error_of(write(tmp / "r.yaml", {**data, "base": ["parts.yaml"]}))
    assert "parts.yaml: train.batch_size: expected a value greater than 0, got 0" in text


def test_all_problems_are_listed_at_once(workspace):
    tmp, data = workspace
    text = error_of(write(tmp / "r.yaml", data), ["train.batch_size=0", "lora.rank=0"])
    assert "invalid recipe (2 problems)" in text
    assert "command-line override: train.batch_size" in text and "command-line override: lora.rank" in text


@pytest.mark.parametrize("override,message", [
    ("train.learning_rate", "expected KEY.PATH=VALUE, got 'train.learning_rate'"),
    ("train..x=1", "expected KEY.PATH=VALUE"),
    ("seed.x=1", "command-line override: seed: expected a valid integer"),
])
def test_bad_overrides(workspace, override, message):
    tmp, data = workspace
    assert message in error_of(write(tmp / "r.yaml", data), [override])


def test_yaml_syntax_error_names_file_and_line(workspace):
    tmp, _ = workspace
    (tmp / "r.yaml").write_text("name: x\ntrain:\n  batch_size: [1,\n")
    assert "r.yaml:" in error_of(tmp / "r.yaml") and "invalid YAML" in error_of(tmp / "r.yaml")


def test_base_cycle_and_missing_base(workspace):
    tmp, data = workspace
    write(tmp / "a.yaml", {"base": "b.yaml"})
    write(tmp / "b.yaml", {"base": "a.yaml"})
    assert "cycle" in error_of(write(tmp / "r.yaml", {**data, "base": "a.yaml"}))
    assert "base file 'gone.yaml' not found" in error_of(write(tmp / "r.yaml", {**data, "base": "gone.yaml"}))


def test_missing_recipe_file(tmp_path):
    assert "recipe file not found" in error_of(tmp_path / "none.yaml")


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_recipes_validate(recipe):
    loaded = load_recipe(recipe)
    assert loaded.data.train.format in METHODS[loaded.method].formats


# ---- what the chosen backend can run ----

@pytest.mark.parametrize("backend,platform,refused", [
    ("jax", "cpu", True), ("jax", "gpu", False), ("tensorflow", "cpu", False), ("torch", "cpu", False)])
def test_float16_is_refused_only_where_it_cannot_train(workspace, monkeypatch, backend, platform, refused):
    tmp, data = workspace
    monkeypatch.setattr(validate, "jax_platform", lambda: platform)
    data["model"]["dtype"] = "float16"
    recipe = load_recipe(write(tmp / "r.yaml", data))
    if refused:
        with pytest.raises(ConfigError, match="expected model.dtype: bfloat16 or float32") as info:
            check_backend_support(recipe, backend)
        assert info.value.where == "model.dtype"
    else:
        check_backend_support(recipe, backend)
    for dtype in ("float32", "bfloat16"):
        recipe.model.dtype = dtype
        check_backend_support(recipe, backend)


def test_cli_validate_checks_the_backend_it_would_use(workspace, monkeypatch, capsys):
    tmp, data = workspace
    monkeypatch.setattr(validate, "jax_platform", lambda: "cpu")
    path = write(tmp / "r.yaml", data)
    assert main(["validate", str(path), "--backend", "jax", "model.dtype=float16"]) == 2
    assert "model.dtype: float16 does not train with the JAX backend on a CPU" in capsys.readouterr().err
    assert main(["validate", str(path), "--backend", "torch", "model.dtype=float16"]) == 0
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert main(["validate", str(path), "model.dtype=float16"]) == 2
    assert main(["validate", str(path), "backend=torch", "model.dtype=float16"]) == 0
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    assert main(["validate", str(path), "model.dtype=float16"]) == 0
