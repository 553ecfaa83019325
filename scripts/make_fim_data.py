"""Write data/code_fim/fim_python.jsonl: fill-in-the-middle rows for CodeGemma, in prompt_completion form.

Each row cuts one of the small Python functions below (written for this project) at a line
boundary into prefix / middle / suffix and renders CodeGemma's PSM format:
    prompt     = <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>
    completion = {middle}<|file_separator|>
Deterministic: `python scripts/make_fim_data.py` always writes the same file.
"""

import json
from pathlib import Path

FUNCTIONS = [
    '''def mean(values):
    if not values:
        raise ValueError("mean of an empty list")
    total = sum(values)
    return total / len(values)
''',
    '''def is_palindrome(text):
    letters = [c.lower() for c in text if c.isalnum()]
    return letters == letters[::-1]
''',
    '''def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
''',
    '''def word_counts(text):
    counts = {}
    for word in text.split():
        counts[word] = counts.get(word, 0) + 1
    return counts
''',
    '''def clamp(value, low, high):
    if value < low:
        return low
    if value > high:
        return high
    return value
''',
    '''def flatten(nested):
    flat = []
    for item in nested:
        if isinstance(item, list):
            flat.extend(flatten(item))
        else:
            flat.append(item)
    return flat
''',
    '''def gcd(a, b):
    while b:
        a, b = b, a % b
    return abs(a)
''',
    '''def chunks(items, size):
    if size <= 0:
        raise ValueError("size must be positive")
    return [items[i:i + size] for i in range(0, len(items), size)]
''',
    '''def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\\n") for line in f]
''',
    '''def binary_search(items, target):
    low, high = 0, len(items) - 1
    while low <= high:
        mid = (low + high) // 2
        if items[mid] == target:
            return mid
        if items[mid] < target:
            low = mid + 1
        else:
            high = mid - 1
    return -1
''',
    '''def celsius_to_fahrenheit(celsius):
    return celsius * 9 / 5 + 32
''',
    '''def unique(items):
    seen = set()
    result = []
    for item in items:
        if item not in seen:
            seen.add(item)
            result.append(item)
    return result
''',
]


def rows():
    for source in FUNCTIONS:
        lines = source.splitlines(keepends=True)
        for start in range(1, len(lines)):
            for stop in range(start + 1, min(start + 3, len(lines)) + 1):
                prefix, middle, suffix = "".join(lines[:start]), "".join(lines[start:stop]), "".join(lines[stop:])
                yield {"prompt": f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
                       "completion": f"{middle}<|file_separator|>"}


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "data" / "code_fim" / "fim_python.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for row in rows():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out}")
