'''The Ollama Modelfile written beside a GGUF export, so that `ollama create NAME -f Modelfile` (run in the
export directory) makes a model of it.

    FROM ./model.gguf
    TEMPLATE """…"""                 Gemma's chat format as gemma_tune renders it (`TEMPLATE`)
    PARAMETER stop "<end_of_turn>"
    PARAMETER temperature 1.0        sampling defaults: the recipe's (`rl.temperature`, `rl.top_p`, `rl.top_k`,
    PARAMETER top_k 64               what an online-RL run sampled with) where it states them, else Gemma's
    PARAMETER top_p 0.95             published ones (`GEMMA_SAMPLING`: its generation_config and Ollama's)

`TEMPLATE` is Ollama's Go template for the chat format gemma_tune trains on (`hf_tokenizer.CHAT_TEMPLATE`,
the same one the GGUF file carries as `tokenizer.chat_template`): turns `<start_of_turn>user\n…<end_of_turn>\n`
and `<start_of_turn>model\n…<end_of_turn>\n`, a system message joined to the first user turn followed by a
blank line (Gemma has no system role), and `<start_of_turn>model\n` opened after the last user turn. `<bos>`
is not in it: llama.cpp adds it (the file's add_bos_token).
'''

from __future__ import annotations

from pathlib import Path

MODELFILE = "Modelfile"
GEMMA_SAMPLING = {"temperature": 1.0, "top_k": 64, "top_p": 0.95}
STOP = "<end_of_turn>"

TEMPLATE = """{{- $system := "" }}
{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}
{{- $first := true }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $system }}{{ $system }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $first = false }}
{{- if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""


def sampling_defaults(recipe=None) -> dict:
    """temperature, top_k, top_p for the Modelfile: the recipe's `rl` values where set, else Gemma's."""
    values = dict(GEMMA_SAMPLING)
    rl = getattr(recipe, "rl", None)
    for key in values:
        stated = getattr(rl, key, None) if rl is not None else None
        if stated is not None:
            values[key] = stated
    return values


def modelfile_text(gguf_name: str, sampling: dict | None = None) -> str:
    """The Modelfile for the GGUF file `gguf_name` (beside it), with `sampling` overriding Gemma's defaults."""
    values = {**GEMMA_SAMPLING, **{k: v for k, v in (sampling or {}).items() if v is not None}}
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{TEMPLATE}"""', "", f'PARAMETER stop "{STOP}"']
    lines += [f"PARAMETER {key} {values[key]}" for key in ("temperature", "top_k", "top_p")]
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir: str | Path, gguf_name: str, sampling: dict | None = None) -> Path:
    """Write `out_dir/Modelfile` (see `modelfile_text`); returns its path."""
    path = Path(out_dir) / MODELFILE
    path.write_text(modelfile_text(gguf_name, sampling), encoding="utf-8")
    return path
