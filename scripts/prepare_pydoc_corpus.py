"""Write the Python reference manual's topics (shipped with Python as pydoc_data.topics, under the
PSF license) as a folder of .txt files, one document per topic: an offline style corpus.

    python scripts/prepare_pydoc_corpus.py      # prints the folder
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def prepare_pydoc_corpus(dest: str | os.PathLike | None = None) -> Path:
    from pydoc_data.topics import topics

    from hnkit.util import cache_root

    dest = Path(dest) if dest else cache_root() / "corpora" / "pydoc"
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(topics):
        path = dest / f"{name}.txt"
        if not path.exists() or path.read_text(encoding="utf-8") != topics[name]:
            path.write_text(topics[name], encoding="utf-8")
    return dest


if __name__ == "__main__":
    print(prepare_pydoc_corpus(sys.argv[1] if len(sys.argv) > 1 else None))
