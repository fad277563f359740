"""Word count over a generated Zipf-distributed corpus, or over a text file.

    python examples/wordcount.py                 # 200,000 generated lines, 2 workers
    python examples/wordcount.py corpus.txt      # a file of your own
    shmflow run examples/wordcount.py --workers 3

Prints the ten most frequent words and a summary of the run.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

from runtime import StreamEnvironment


def generate_corpus(path: str, lines: int = 200_000, vocabulary: int = 20_000, seed: int = 7) -> None:
    """Write ``lines`` lines of Zipf-distributed words (a-z, 2-9 letters) to ``path``."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(vocabulary)]
    ranks = rng.zipf(1.3, size=lines * 10) % vocabulary
    lengths = rng.integers(5, 16, size=lines)
    out, pos = [], 0
    for n in lengths.tolist():
        out.append(" ".join(words[i] for i in ranks[pos:pos + n].tolist()))
        pos += n
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def build(env: StreamEnvironment, path: str):
    """The job: lines -> words -> lower case -> count per word."""
    return (env.read_text(path)
               .flat_map(str.split)
               .map(str.lower)
               .key_by(lambda word: word)
               .count()
               .collect())


def main(argv: list[str]) -> None:
    if argv:
        path, cleanup = argv[0], None
    else:
        fd, path = tempfile.mkstemp(prefix="shmflow-wordcount-", suffix=".txt")
        os.close(fd)
        cleanup = path
        generate_corpus(path)
    try:
        env = StreamEnvironment()
        counts = build(env, path)
        result = env.execute("wordcount")
    finally:
        if cleanup:
            os.unlink(cleanup)
    top = sorted(counts.values(), key=lambda kv: (-kv[1], kv[0]))[:10]
    width = max(len(w) for w, _ in top) if top else 0
    for word, count in top:
        print(f"{word:<{width}}  {count:>9,}")
    print(result.summary())


if __name__ == "__main__":
    main(sys.argv[1:])
