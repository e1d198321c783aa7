"""Transcript sources on real files and a real `transcripts` collection (nx-27017)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from pymongo.database import Database

from config.errors import ConfigError
from producer.parsing import parse_file
from producer.sources import DirectorySource, EpisodeFilter, MongoSource, open_source
from tests.conftest import DATA, EXAMPLES

SHOW = "The Seen and the Unseen"


def transcript_docs() -> list[dict]:
    """Three real episodes as `transcripts` documents: segments, WebVTT text, plain text."""
    whisper = json.loads((DATA / "E03.json").read_text())
    return [
        {"_id": "E03", "podcast": SHOW, "published_at": datetime(2016, 10, 3, 6, 0, tzinfo=UTC),
         "segments": whisper["segments"]},
        {"_id": "E05", "podcast": SHOW, "published_at": "2016-11-20T08:00:00+00:00",
         "text": (EXAMPLES / "E05.vtt").read_text()},
        {"_id": "E03.notes", "podcast": "Notes", "published_at": "2017-01-05",
         "text": (DATA / "E03.txt").read_text()},
    ]


def test_directory_source_podcast_from_folder_and_refusals(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "E05.vtt", tmp_path / "E05.vtt")
    (tmp_path / SHOW / "more").mkdir(parents=True)
    shutil.copy(DATA / "E03.srt", tmp_path / SHOW / "E03.srt")
    shutil.copy(DATA / "E03.txt", tmp_path / SHOW / "E05.txt")  # the same id in another podcast: its own episode
    shutil.copy(DATA / "E03.txt", tmp_path / SHOW / "more" / "E03.txt")  # the same id in the same podcast
    (tmp_path / "broken.vtt").write_text("WEBVTT\n\n00:00:01.000 --> 00:0x:02.000\nhello\n")

    source = DirectorySource(tmp_path)
    episodes = {(e.podcast, e.episode_id): e for e in source.episodes()}

    assert sorted(episodes, key=str) == sorted([(SHOW, "E03"), (SHOW, "E05"), (None, "E05")], key=str)
    assert episodes[SHOW, "E03"].segments == parse_file(DATA / "E03.srt").segments
    assert episodes[SHOW, "E05"].segments == parse_file(DATA / "E03.txt").segments
    assert episodes[None, "E05"].segments == parse_file(EXAMPLES / "E05.vtt").segments
    assert len(source.refused) == 2
    assert any("broken.vtt: line 3: malformed timestamp" in m for m in source.refused)
    assert any(f"episode id 'E03' of podcast {SHOW!r} already given by" in m for m in source.refused)
    assert source.key == f"dir:{tmp_path.resolve()}"
    assert [e.episode_id for e in source.episodes(["E03"])] == ["E03"]


def test_directory_source_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        DirectorySource(tmp_path / "missing")


def test_mongo_source_reads_segments_and_any_text_format(db: Database) -> None:
    db.transcripts.insert_many(transcript_docs())
    source = open_source("mongo", db)
    assert isinstance(source, MongoSource)
    episodes = {e.episode_id: e for e in source.episodes()}

    assert sorted(episodes) == ["E03", "E03.notes", "E05"]
    assert source.refused == []
    # The Whisper segments stored in Mongo read the same as the Whisper file and the SRT file.
    assert episodes["E03"].segments == parse_file(DATA / "E03.json").segments == parse_file(DATA / "E03.srt").segments
    assert episodes["E03"].published_at == "2016-10-03T06:00:00+00:00"
    # A `text` holding WebVTT is parsed as WebVTT, speakers and timings included.
    assert episodes["E05"].segments == parse_file(EXAMPLES / "E05.vtt").segments
    assert episodes["E03.notes"].segments == parse_file(DATA / "E03.txt").segments
    assert episodes["E03.notes"].podcast == "Notes"
    # Read by `_id` when ids are named.
    assert [e.episode_id for e in source.episodes(["E05", "E99"])] == ["E05"]


def test_mongo_source_refuses_bad_documents(db: Database) -> None:
    db.transcripts.insert_many([
        {"_id": "no-text", "podcast": SHOW},
        {"_id": "bad-date", "published_at": "last tuesday", "text": "hello"},
        {"_id": "bad-segment", "segments": [{"start": 3.0, "end": 1.0, "text": "backwards"}]},
        {"_id": "ok", "text": "Plain words of a transcript."},
        # Names printed and logged: no control characters, whichever field brings them.
        {"_id": "forged\nERROR line", "text": "words"},
        {"_id": "bad-podcast", "podcast": "Show\x1b[2J", "segments": [{"start": 0, "end": 1, "text": "words"}]},
        {"_id": "bad-episode", "episode_id": "E\u202e1", "text": "words"},
    ])
    source = MongoSource(db)
    assert [e.episode_id for e in source.episodes()] == ["ok"]
    assert sorted(source.refused) == [
        "transcript name 'transcripts/forged\\nERROR line/text': holds the control character U+000A",
        "transcripts/bad-date.published_at: 'last tuesday' is not an ISO-8601 date",
        "transcripts/bad-episode/text: episode id 'E\\u202e1': holds the control character U+202E",
        "transcripts/bad-podcast: podcast 'Show\\x1b[2J': holds the control character U+001B",
        "transcripts/bad-segment: segments[0]: end 1.0 is before start 3.0",
        "transcripts/no-text: needs 'segments' ([{start, end, speaker, text}]) or 'text'",
    ]


def test_episode_filter_dates_podcast_ids(db: Database) -> None:
    db.transcripts.insert_many(transcript_docs())
    episodes = list(MongoSource(db).episodes())

    def chosen(selection: EpisodeFilter) -> list[str]:
        return sorted(e.episode_id for e in episodes if selection.matches(e))

    assert chosen(EpisodeFilter()) == ["E03", "E03.notes", "E05"]
    assert chosen(EpisodeFilter(podcast=SHOW)) == ["E03", "E05"]
    assert chosen(EpisodeFilter(since=date(2016, 10, 4))) == ["E03.notes", "E05"]
    assert chosen(EpisodeFilter(until=date(2016, 11, 20))) == ["E03", "E05"]  # inclusive
    assert chosen(EpisodeFilter(since=date(2016, 11, 21), until=date(2017, 1, 5))) == ["E03.notes"]
    assert chosen(EpisodeFilter(podcast=SHOW, episode_ids=frozenset({"E05", "E03.notes"}))) == ["E05"]
    # A date bound leaves out what has no date.
    undated = parse_file(EXAMPLES / "E05.vtt")
    assert EpisodeFilter(podcast=None).matches(undated)
    assert not EpisodeFilter(since=date(2000, 1, 1)).matches(undated)
