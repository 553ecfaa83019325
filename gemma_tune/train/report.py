"""End-of-run outputs: the loss-curve PNG and the summary (printed, and saved as summary.json)."""

from __future__ import annotations

import json
from pathlib import Path

from gemma_tune.rundir import atomic_write_text
from gemma_tune.tempfiles import atomic_file


def plot_loss(rows: list[dict], path: Path, label: str = "loss", key: str = "loss") -> Path | None:
    """Train (and eval) `key` (the method's curve: the loss, online RL's reward) against step as a PNG
    (a matplotlib Figure, saved through Agg), the y axis called `label`; None when nothing was logged."""
    train = [(r["step"], r[key]) for r in rows if r["split"] == "train" and r.get(key) is not None]
    evals = [(r["step"], r[key]) for r in rows if r["split"] == "eval" and r.get(key) is not None]
    if not train and not evals:
        return None
    from matplotlib.figure import Figure  # not pyplot: the process's matplotlib backend (a notebook's) is left alone

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_summary(summary: dict, run_dir: Path) -> str:
    """Save summary.json atomically and return the human-readable lines."""
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"run {summary['name']}: {summary['status']} after step {summary['steps']}/{summary['total_steps']}"]
    lines.append(f"  tokens      {summary['tokens']:,.0f} ({summary['trained_tokens']:,.0f} trained on) in "
                 f"{summary['seconds']:.1f} s this session")
    if summary.get("tokens_per_s"):
        mfu = f", MFU {summary['mfu']:.1%}" if summary.get("mfu") else ""
        lines.append(f"  throughput  {summary['tokens_per_s']:,.0f} tokens/s{mfu}")
    if summary.get("peak_memory_gib"):
        lines.append(f"  peak memory {summary['peak_memory_gib']:.2f} GiB ({summary['peak_memory_of']})")
    if summary.get("final_loss") is not None:
        lines.append(f"  loss        {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
    curve = summary.get("curve", "loss")
    if curve != "loss" and (summary.get("final_metrics") or {}).get(curve) is not None:
        lines.append(f"  {curve:<11} {summary['first_metrics'][curve]:.4f} -> {summary['final_metrics'][curve]:.4f}")
    if summary.get("eval"):
        shown = {k: v for k, v in summary["eval"].items() if k not in ("step", "split", "tokens") and v is not None}
        lines.append("  eval        " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    train_data = (summary.get("data") or {}).get("train")
    if train_data:
        lines.append(f"  data        {train_data['rows']:,} rows ({train_data['invalid']} invalid skipped, "
                     f"{train_data['truncated']} truncated, {train_data['dropped']} dropped), "
                     f"{train_data['trained_tokens']:,} trained tokens per epoch")
    for fmt, where in summary.get("exports", {}).items():
        lines.append(f"  export      {fmt}: {where}")
    if summary.get("loss_curve"):
        lines.append(f"  loss curve  {summary['loss_curve']}")
    if summary.get("checkpoint"):
        lines.append(f"  checkpoint  {summary['checkpoint']}")
    return "\n".join(lines)
