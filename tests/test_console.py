"""What a run shows on a terminal: log lines on lines of their own above one progress bar (ours, with the
loss of the log rows), the first step announced as compiling, and no warnings from Keras' data adapter."""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 1,
        "head_dim": 16, "query_pre_attn_scalar": 16}


def test_a_run_on_a_terminal_shows_one_bar_below_its_log_lines(tmp_path):
    recipe = {"name": "console", "output_dir": str(tmp_path / "run"),
              "model": {"preset": "gemma3_tiny", "architecture": TINY, "tokenizer": "data/tiny/tokenizer.model",
                        "dtype": "float32"},
              "lora": {"rank": 4},
              "data": {"train": {"path": "data/tiny/chat.jsonl", "format": "chat"}, "max_length": 64},
              "train": {"max_steps": 8, "batch_size": 2, "log_every": 4},
              "export": {"formats": ["keras"]}}  # the keras export needs TensorFlow: its start-up lines stay hidden
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    leader, follower = pty.openpty()  # a terminal of 120 columns: the bar is drawn
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "gemma_tune", "run", str(path)], cwd=ROOT, stdin=follower,
                            stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) == 0
    screen = b"".join(chunks).decode(errors="replace")

    assert "shuffle=True" not in screen and "Traceback" not in screen
    for line in screen.replace("\r\n", "\n").split("\n"):
        if "step 4/8 loss" in line or "step 8/8 loss" in line:  # a log line starts its own line, never glued to the bar
            assert line.rsplit("\r", 1)[-1].startswith("step "), repr(line)
    compiling = screen.index("step 1 compiles the training step")
    first_bar = re.search(r"\d+/8 \[", screen)
    assert first_bar and first_bar.start() > compiling  # no bar (and no ETA) before the first step is done
    logged = re.search(r"step 8/8 loss (\d+\.\d+)", screen).group(1)
    assert f"loss={logged}" in screen  # the bar's loss is the logged one (not a second, different number)
    assert "loss:" not in screen  # no Keras progress bar
    if os.environ.get("KERAS_BACKEND", "jax") != "tensorflow":  # on its own backend TensorFlow may announce itself
        for noise in ("cudart_stub", "oneDNN", "cuInit", "absl::InitializeLog", "normalizer.cc"):
            assert noise not in screen, noise


def test_native_start_up_lines_are_dropped_and_the_rest_kept(capfd):
    from gemma_tune.console import without_native_start_up_lines

    with without_native_start_up_lines():
        os.write(2, b"I0000 00:00:1.2 123 cudart_stub.cc:31] Could not find cuda drivers on your machine\n")
        os.write(2, b"normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.\n")
        os.write(2, b"a real warning\n")
    assert capfd.readouterr().err == "a real warning\n"
