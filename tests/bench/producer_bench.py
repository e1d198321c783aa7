"""Producer chunking throughput on real transcripts, printed as one JSON document.

Parses the 120 WebVTT episodes vendored in tests/data/seenunseen.tar.xz (MIT licence, see its LICENSE),
then chunks them with the default settings and the model's own tokenizer, one process.
Reports parse and chunk seconds and tokens per second (chunk tokens, overlap included).
The CPU is shared with other work: compare figures from one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from config.settings import Settings  # noqa: E402
from producer.chunking import ChunkLimits, chunk_episode  # noqa: E402
from producer.parsing import parse_file  # noqa: E402
from producer.tokens import load_tokenizer  # noqa: E402
from tests.bench.corpus import seenunseen_vtt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=None, help="a folder of .vtt files (default: the vendored corpus)")
    parser.add_argument("--episodes", type=int, default=120)
    args = parser.parse_args()
    settings = Settings()
    tokenizer = load_tokenizer(settings)
    limits = ChunkLimits(settings.chunk_tokens, settings.chunk_overlap_tokens, settings.instruction)
    files = (seenunseen_vtt() if args.data is None else sorted(args.data.glob("*.vtt")))[: args.episodes]

    began = time.perf_counter()
    episodes = [parse_file(path) for path in files]
    parsed = time.perf_counter()
    chunks = [chunk for episode in episodes for chunk in chunk_episode(episode, tokenizer, limits)]
    chunked = time.perf_counter()

    tokens = sum(c.n_tokens for c in chunks)
    chars = sum(len(s.text) for e in episodes for s in e.segments)
    print(json.dumps({
        "episodes": len(episodes), "segments": sum(len(e.segments) for e in episodes), "chunks": len(chunks),
        "tokens": tokens, "parse_seconds": round(parsed - began, 2), "chunk_seconds": round(chunked - parsed, 2),
        "chunk_tokens_per_s": round(tokens / (chunked - parsed)),
        "parse_and_chunk_tokens_per_s": round(tokens / (chunked - began)),
        "chunk_chars_per_s": round(chars / (chunked - parsed)),
    }))


if __name__ == "__main__":
    main()
