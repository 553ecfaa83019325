"""Where checkpoint files come from: `hf://ORG/NAME[@REVISION]`, `kaggle://OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]`
or a local directory, resolved to a local directory.

Hub downloads go through `huggingface_hub.snapshot_download` (only the config, safetensors and tokenizer
files; cached, so a second call is offline) and `kagglehub.model_download`. Any failure — offline, gated,
a typo in the name — is a CheckpointError saying what to do.
"""

from __future__ import annotations

from pathlib import Path

from gemma_tune.errors import CheckpointError

HF_SCHEME = "hf://"
KAGGLE_SCHEME = "kaggle://"
HF_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"]


def parse_hf(source: str) -> tuple[str, str | None]:
    """(repo_id, revision or None) of `hf://ORG/NAME[@REVISION]`."""
    body = source[len(HF_SCHEME):]
    repo_id, _, revision = body.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise CheckpointError("expected hf://ORG/NAME or hf://ORG/NAME@REVISION", where=source)
    return repo_id, revision or None


def _download_hf(source: str) -> Path:
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_hf(source)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HF_PATTERNS))
    except Exception as e:  # offline, gated, missing repo or revision: all a source the user must fix
        raise CheckpointError(
            f"could not download from the Hugging Face Hub ({type(e).__name__}: {e}). Check the name, run "
            "`hf auth login` for gated Gemma repos (and accept the licence on the model page), or pass a local "
            "directory holding config.json and *.safetensors", where=source) from e


def _download_kaggle(source: str) -> Path:
    import kagglehub

    handle = source[len(KAGGLE_SCHEME):]
    parts = handle.split("/")
    if len(parts) not in (4, 5) or not all(parts):
        raise CheckpointError("expected kaggle://OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]", where=source)
    try:
        return Path(kagglehub.model_download(handle))
    except Exception as e:
        raise CheckpointError(
            f"could not download from Kaggle ({type(e).__name__}: {e}). Check the handle, set KAGGLE_USERNAME and "
            "KAGGLE_KEY (and accept the Gemma licence on kaggle.com), or pass a local directory", where=source) from e


def resolve_source(source: str | Path) -> Path:
    """A local directory holding the checkpoint named by `source` (downloaded when remote)."""
    text = str(source)
    if text.startswith(HF_SCHEME):
        return _download_hf(text)
    if text.startswith(KAGGLE_SCHEME):
        return _download_kaggle(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointError("no such checkpoint directory (expected a local directory, hf://ORG/NAME or "
                              "kaggle://OWNER/MODEL/FRAMEWORK/VARIATION)", where=text)
    if not path.is_dir():
        raise CheckpointError("expected a checkpoint directory, got a file", where=text)
    return path
