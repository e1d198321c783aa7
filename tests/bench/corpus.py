"""The seenunseen corpus the benchmarks read, vendored as `tests/data/seenunseen.tar.xz`.

120 real episodes of "The Seen and the Unseen" (Whisper transcripts by Apoorv Saxena, MIT
licence: `tests/data/LICENSE`, also inside the archive), so `make bench`, `make soak`,
`make eval` and `make scale` run from a clone alone. The archive holds `vtt/E01.vtt` …
`vtt/E120.vtt`, `titles/E01_titles.json` … (section titles with start times),
`metadata.json`, `LICENSE` and `README.md`.

    from tests.bench.corpus import seenunseen_vtt, seenunseen_titles, seenunseen_root
    seenunseen_vtt()      # [Path(.../vtt/E01.vtt), ..., Path(.../vtt/E120.vtt)], in episode order
    seenunseen_titles()   # Path(.../titles): one E{n}_titles.json per episode
    seenunseen_root()     # Path of the extracted folder (metadata.json, LICENSE, README.md)

The archive is extracted once into `.podembed/corpus/seenunseen-<hash of the archive>/`
(under the repository); later calls return the same paths without reading it again.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHIVE = ROOT / "tests" / "data" / "seenunseen.tar.xz"
CACHE = ROOT / ".podembed" / "corpus"


def seenunseen_root() -> Path:
    """The extracted corpus folder, extracting the archive on first use."""
    digest = hashlib.sha256(ARCHIVE.read_bytes()).hexdigest()[:12]
    target = CACHE / f"seenunseen-{digest}"
    if not (target / "LICENSE").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        # Extract beside the target and rename: a run killed halfway leaves no half corpus.
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp, tarfile.open(ARCHIVE, "r:xz") as tar:
            tar.extractall(tmp, filter="data")
            shutil.rmtree(target, ignore_errors=True)
            Path(tmp).rename(target)
            Path(tmp).mkdir()  # TemporaryDirectory removes its folder on exit
    return target


def seenunseen_vtt() -> list[Path]:
    """The 120 WebVTT transcripts, in episode order (E01, E02, …, E120)."""
    return sorted((seenunseen_root() / "vtt").glob("E*.vtt"), key=lambda p: int(p.stem[1:]))


def seenunseen_titles() -> Path:
    """The folder of section titles: `E{n}_titles.json`, a list of `{title, time, title_prob}`."""
    return seenunseen_root() / "titles"
