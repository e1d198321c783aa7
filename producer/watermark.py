"""The nightly watermark: which episodes of a source were taken, with what content, by which job.

One document per source and vector key in MongoDB `watermarks`. An episode is past the
watermark when its content hash is the one recorded and the job that took it did not end
cancelled, failed or partial: episodes of such a job are taken again by the next run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import JobNotFoundError, StoreError
from producer.job_status import JobState
from producer.jobs import JobRecords, now_iso
from producer.models import Episode, episode_key


@dataclass(frozen=True)
class Mark:
    content_sha256: str
    job_id: str | None


class Watermark:
    def __init__(self, db: Database, mark_id: str) -> None:
        self.db = db
        self.mark_id = mark_id
        self.marks: dict[str, Mark] = {}
        # Entries written before episodes were identified within their podcast: by bare episode id.
        self.legacy: dict[str, str] = {}

    def load(self, records: JobRecords) -> Watermark:
        try:
            doc = self.db.watermarks.find_one({"_id": self.mark_id})
        except PyMongoError as exc:
            raise StoreError(f"cannot read watermark {self.mark_id!r}: {exc}") from exc
        # Pairs (or triples), not a mapping: episode keys may hold '.' or '$', which field names may not.
        for entry in doc["episodes"] if doc else []:
            if len(entry) == 2:
                self.legacy[entry[0]] = entry[1]
            else:
                self.marks[entry[0]] = Mark(entry[1], entry[2])
        undone = _undone_jobs(records, {m.job_id for m in self.marks.values() if m.job_id})
        self.marks = {key: mark for key, mark in self.marks.items() if mark.job_id not in undone}
        return self

    def passed(self, episode: Episode) -> Mark | None:
        """The mark that says `episode` was taken as it is now, if any."""
        content = episode.content_sha256()
        mark = self.marks.get(episode.key)
        if mark is not None and mark.content_sha256 == content:
            return mark
        if self.legacy.get(episode.episode_id) == content:
            return Mark(content, None)
        return None

    def save(self, marks: dict[str, Mark]) -> None:
        """Record `marks` on top of what is recorded (legacy entries are replaced by keyed ones)."""
        entries = {**self.marks, **marks}
        doc = {"_id": self.mark_id, "episodes": sorted([k, m.content_sha256, m.job_id] for k, m in entries.items()),
               "updated_at": now_iso()}
        try:
            # `_id` in the document too: nx-27017 does not take it from the filter on upsert.
            self.db.watermarks.replace_one({"_id": self.mark_id}, doc, upsert=True)
        except PyMongoError as exc:
            raise StoreError(f"cannot write watermark {self.mark_id!r}: {exc}") from exc
        self.marks, self.legacy = entries, {}


def forget_episodes(db: Database, podcast: str | None, episode_ids: Iterable[str], *, dry_run: bool = False) -> int:
    """Drop these episodes of `podcast` from every watermark, so the next nightly takes them again.

    Older entries, keyed by the bare episode id, are dropped too (they say nothing of the podcast).
    Returns how many entries went (or would go).
    """
    ids = set(episode_ids)
    keys = {episode_key(podcast, e) for e in ids}
    dropped = 0
    try:
        for doc in db.watermarks.find({}, {"episodes": 1}):
            kept = [e for e in doc["episodes"] if e[0] not in (ids if len(e) == 2 else keys)]
            dropped += len(doc["episodes"]) - len(kept)
            if not dry_run and len(kept) < len(doc["episodes"]):
                db.watermarks.update_one({"_id": doc["_id"]}, {"$set": {"episodes": kept, "updated_at": now_iso()}})
    except PyMongoError as exc:
        raise StoreError(f"cannot update the watermarks in {db.name}.watermarks: {exc}") from exc
    return dropped


def _undone_jobs(records: JobRecords, job_ids: Iterable[str]) -> set[str]:
    undone = set()
    for job_id in job_ids:
        try:
            if records.status(job_id).state in JobState.UNDONE:
                undone.add(job_id)
        except JobNotFoundError:
            continue  # forgotten by Redis and MongoDB alike: nothing says it failed
    return undone
