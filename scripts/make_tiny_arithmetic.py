"""Writes data/tiny/arithmetic.jsonl: prompt-only rows for the GRPO quickstart (recipes/quickstart_grpo.yaml).

Each row asks for a sum a + b (0 ≤ a, b ≤ 9) that data/tiny's SFT data never shows, in the phrasing the SFT
quickstart learnt ("What is a plus b?"), with the sum in `answer` for the answer_match reward: the tuned model
knows the answer's format but not these answers. Run from the project root: python scripts/make_tiny_arithmetic.py
"""

import json
import re
from pathlib import Path

TINY = Path("data/tiny")


def seen_sums() -> set[tuple[int, int]]:
    """The (a, b) of every "a plus b" in the bundled SFT data."""
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(TINY.glob("*.jsonl")) if p.name != "arithmetic.jsonl")
    return {(int(a), int(b)) for a, b in re.findall(r"\b(\d) plus (\d)\b", text)}


def main() -> None:
    seen = seen_sums()
    rows = [{"prompt": f"What is {a} plus {b}?", "answer": str(a + b)}
            for a in range(10) for b in range(10) if (a, b) not in seen]
    with open(TINY / "arithmetic.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{len(rows)} prompts -> {TINY / 'arithmetic.jsonl'}")


if __name__ == "__main__":
    main()
