"""`describe_keys` (what `gemma-tune keys [SECTION]` prints): every schema key with its type, default and meaning."""

import pytest

from gemma_tune.config import schema
from gemma_tune.config.keys import describe_keys, type_name
from gemma_tune.errors import ConfigError


def schema_fields(model=schema.Recipe, prefix=""):
    """(dotted path, FieldInfo) of every field, sections included, walked independently of keys.py."""
    for name, field in model.model_fields.items():
        yield prefix + name, field
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, schema.Section):
                yield from schema_fields(arg, f"{prefix}{name}.")


def entries(text):
    """{path: (head line, description)} of describe_keys output."""
    out, path = {}, None
    for line in text.splitlines():
        if line.startswith("    "):
            out[path] = (out[path][0], (out[path][1] + " " + line.strip()).strip())
        else:
            path = line.split("  ")[0]
            out[path] = (line, "")
    return out


def test_every_key_is_described():
    listed = entries(describe_keys())
    fields = dict(schema_fields())
    assert {"lora.rank", "data.train.path", "data.eval.format", "train.batch_size", "export.dtype"} <= set(fields)
    for path, field in fields.items():
        assert field.description, f"{path} has no description in schema.py"
        assert path in listed, f"{path} is not listed"
        assert listed[path][1] == field.description
    assert set(listed) == set(fields) | {"base"}


@pytest.mark.parametrize("path,head", [
    ("train.batch_size", "train.batch_size  int > 0, default 8"),
    ("lora.dropout", "lora.dropout  float in [0, 1), default 0"),
    ("backend", "backend  jax | tensorflow | torch | null, default null"),
    ("lora.targets", "lora.targets  non-empty list of q|k|v|o|gate|up|down, default [q, k, v, o, gate, up, down]"),
    ("model.weights", "model.weights  str | null, default null"),
    ("data.train.path", "data.train.path  str, required"),
    ("lora", "lora  section | null, default null"),
    ("train.max_grad_norm", "train.max_grad_norm  float > 0 | null, default 1"),
    ("train.jit_compile", "train.jit_compile  bool | auto, default auto"),
    ("data.train.columns", "data.train.columns  mapping of str to str, default {}"),
])
def test_types_and_defaults_read_as_in_yaml(path, head):
    assert entries(describe_keys())[path][0] == head


def test_a_section_or_prefix_narrows_the_list():
    lora = entries(describe_keys("lora"))
    assert set(lora) == {"lora", "lora.rank", "lora.alpha", "lora.dropout", "lora.targets"}
    train = entries(describe_keys("train"))
    assert "train.batch_size" in train and not any(p.startswith("data.") for p in train)
    source = entries(describe_keys("data.train"))
    assert set(source) == {"data.train"} | {f"data.train.{k}" for k in schema.DataSource.model_fields}
    assert set(entries(describe_keys("train.batch_size"))) == {"train.batch_size"}


def test_an_unknown_section_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean train") as e:
        describe_keys("trian")
    assert e.value.where == "trian"
    with pytest.raises(ConfigError, match="the sections are model, lora, data, train, preference, reward, rl, distribution, export"):
        describe_keys("nothing_like_it")
    with pytest.raises(ConfigError):
        describe_keys("data.trai")  # a prefix must end at a dot


def test_type_name_of_constraints():
    assert type_name(schema.DataSection.model_fields["max_length"].annotation,
                     schema.DataSection.model_fields["max_length"].metadata) == "int > 1"
    assert type_name(schema.PreferenceSection.model_fields["label_smoothing"].annotation,
                     schema.PreferenceSection.model_fields["label_smoothing"].metadata) == "float in [0, 0.5) | null"
