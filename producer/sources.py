"""Where `nightly` and `backfill` read transcripts: a directory of files, or MongoDB `transcripts`.

Both give Episodes. A transcript that cannot be read is refused with a message (kept in
the source's `refused`) and the others go on, as `ingest` does with files.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Protocol

from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import ConfigError, StoreError, TranscriptFormatError
from producer.enqueue import describe_episode, transcript_files
from producer.models import Episode
from producer.parsing import parse_bytes, parse_file, parse_whisper_segments

MONGO = "mongo"


@dataclass(frozen=True)
class KnownNames:
    """The podcasts and episode ids a source holds, read without parsing a transcript."""

    podcasts: list[str]
    episode_ids: list[str]


class TranscriptSource(Protocol):
    key: str
    refused: list[str]

    def episodes(self, episode_ids: Collection[str] = ()) -> Iterator[Episode]: ...

    def known(self) -> KnownNames: ...


class DirectorySource:
    """Transcript files under a directory; a file in a subdirectory belongs to the podcast it names."""

    def __init__(self, root: Path) -> None:
        if root.is_file():
            raise ConfigError(f"--source {root} is a file: nightly and backfill read a directory of transcripts "
                              "(podembed ingest FILE embeds one file)")
        if not root.is_dir():
            raise ConfigError(f"no such directory: {root}")
        self.root = root
        self.key = f"dir:{root.resolve()}"
        self.refused: list[str] = []

    def episodes(self, episode_ids: Collection[str] = ()) -> Iterator[Episode]:
        """Episodes of every transcript file (only those named, if `episode_ids`); ids from file names."""
        self.refused = []
        seen: dict[str, Path] = {}
        for path in transcript_files([self.root]):
            if episode_ids and path.stem not in episode_ids:
                continue
            folders = path.relative_to(self.root).parts[:-1]
            try:
                episode = parse_file(path, podcast=folders[0] if folders else None)
            except TranscriptFormatError as exc:
                self.refused.append(str(exc))
                continue
            if episode.key in seen:
                self.refused.append(f"{path}: {describe_episode(episode)} already given by {seen[episode.key]}")
                continue
            seen[episode.key] = path
            yield episode

    def known(self) -> KnownNames:
        """Podcasts are the names of the folders holding transcripts (not `ingest --podcast`'s), ids file stems."""
        files = [path.relative_to(self.root) for path in transcript_files([self.root])]
        return KnownNames(podcasts=sorted({f.parts[0] for f in files if len(f.parts) > 1}),
                          episode_ids=sorted({f.stem for f in files}))


class MongoSource:
    """MongoDB `transcripts`: `_id`, `episode_id` (default: `_id`; two podcasts may share one),
    `podcast`, `published_at` (ISO string or date), and `segments` ([{start, end, speaker, text}])
    or `text` (any format the parser takes)."""

    key = "mongo:transcripts"

    def __init__(self, db: Database) -> None:
        self.collection = db.transcripts
        self.refused: list[str] = []

    def episodes(self, episode_ids: Collection[str] = ()) -> Iterator[Episode]:
        """Every document's episode, or those with the episode ids named."""
        self.refused = []
        named = sorted(episode_ids)
        query = {"$or": [{"episode_id": {"$in": named}}, {"_id": {"$in": named}}]} if episode_ids else {}
        try:
            for doc in self.collection.find(query):
                try:
                    yield transcript_episode(doc)
                except TranscriptFormatError as exc:
                    self.refused.append(str(exc))
        except PyMongoError as exc:
            raise StoreError(f"cannot read {self.collection.full_name}: {exc}") from exc

    def known(self) -> KnownNames:
        """Read from the server without any transcript's text."""
        try:
            podcasts = self.collection.distinct("podcast")
            # An episode's id is its `_id` where it names none.
            ids = [doc.get("episode_id", doc["_id"]) for doc in self.collection.find({}, {"episode_id": 1})]
        except PyMongoError as exc:
            raise StoreError(f"cannot read {self.collection.full_name}: {exc}") from exc
        return KnownNames(podcasts=sorted(p for p in podcasts if isinstance(p, str)),
                          episode_ids=sorted({str(i) for i in ids}))


def open_source(name: str, db: Database) -> TranscriptSource:
    """`mongo` for the `transcripts` collection, anything else is a directory (`./mongo` for one so named)."""
    return MongoSource(db) if name == MONGO else DirectorySource(Path(name))


def transcript_episode(doc: dict[str, Any]) -> Episode:
    """The Episode of one `transcripts` document; a defect is a TranscriptFormatError naming the field."""
    name = f"transcripts/{doc['_id']}"
    episode_id = doc.get("episode_id", doc["_id"])
    if not isinstance(episode_id, str | int) or not str(episode_id).strip():
        raise TranscriptFormatError(f"{name}.episode_id: must be a non-empty string, got {episode_id!r}")
    episode_id = str(episode_id)
    podcast = doc.get("podcast")
    if podcast is not None and not isinstance(podcast, str):
        raise TranscriptFormatError(f"{name}.podcast: must be a string, got {type(podcast).__name__}")
    published_at = _published_at(doc.get("published_at"), name)
    if "segments" in doc:
        segments = parse_whisper_segments(doc["segments"], name)
        if not segments:
            raise TranscriptFormatError(f"{name}: no transcript text found")
        return Episode(episode_id=episode_id, podcast=podcast, published_at=published_at, segments=segments,
                       source=name)
    text = doc.get("text")
    if not isinstance(text, str):
        raise TranscriptFormatError(f"{name}: needs 'segments' ([{{start, end, speaker, text}}]) or 'text'")
    # The name has no extension, so the parser goes by content (WebVTT, SRT, JSON or plain text).
    return parse_bytes(text.encode(), name=f"{name}/text", episode_id=episode_id, podcast=podcast,
                       published_at=published_at)


@dataclass(frozen=True)
class EpisodeFilter:
    """Which episodes a backfill takes (dates inclusive); the empty filter takes all."""

    since: date | None = None
    until: date | None = None
    podcast: str | None = None
    episode_ids: frozenset[str] = frozenset()

    def key(self) -> str:
        """The selection as text: equal selections, equal keys."""
        return f"{self.since}|{self.until}|{self.podcast}|{','.join(sorted(self.episode_ids))}"

    def matches(self, episode: Episode) -> bool:
        if self.episode_ids and episode.episode_id not in self.episode_ids:
            return False
        if self.podcast is not None and episode.podcast != self.podcast:
            return False
        if self.since is None and self.until is None:
            return True
        # Bounds on the date leave out episodes that have none (files carry no publication date).
        if episode.published_at is None:
            return False
        published = datetime.fromisoformat(episode.published_at).date()
        return (self.since is None or published >= self.since) and (self.until is None or published <= self.until)


def _published_at(value: object, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise TranscriptFormatError(f"{name}.published_at: {value!r} is not an ISO-8601 date") from None
        return value
    raise TranscriptFormatError(f"{name}.published_at: must be an ISO-8601 string or a date, "
                                f"got {type(value).__name__}")
