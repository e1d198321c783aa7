"""Every transcript format parses real cues; every kind of broken file is refused by name and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.errors import TranscriptFormatError
from producer.enqueue import parse_files
from producer.parsing import parse_bytes, parse_file
from tests.conftest import DATA, EXAMPLES


def test_whisper_vtt_with_speaker_tags() -> None:
    episode = parse_file(EXAMPLES / "E01.vtt", podcast="The Seen and the Unseen")
    first = episode.segments[0]
    assert episode.episode_id == "E01" and episode.podcast == "The Seen and the Unseen"
    assert (first.start, first.end, first.speaker) == (0.0, 7.0, "Guest 2")
    assert first.text == "Welcome to the IBM Podcast Network."
    assert episode.segments[1].speaker == "Amit Varma"
    assert not any(s.text.startswith("[") for s in episode.segments)
    assert all(s.end >= s.start for s in episode.segments)
    assert [s.start for s in episode.segments] == sorted(s.start for s in episode.segments)


def test_vtt_keeps_raw_ampersands_of_real_cues() -> None:
    texts = [s.text for s in parse_file(DATA / "E06.vtt").segments]
    assert any("J&K is on the tenterhooks" in t for t in texts)


def test_chat_json_turns_end_where_the_next_begins() -> None:
    episode = parse_file(EXAMPLES / "E06.json")
    segments = episode.segments
    assert episode.episode_id == "E06"
    assert segments[0].speaker and segments[0].text
    for a, b in zip(segments, segments[1:], strict=False):
        assert a.end == b.start
    assert segments[-1].end == segments[-1].start


def test_srt_whisper_json_and_text_read_the_same_speech() -> None:
    srt = parse_file(DATA / "E03.srt").segments
    whisper = parse_file(DATA / "E03.json").segments
    text = parse_file(DATA / "E03.txt").segments
    assert len(srt) == len(whisper) == 120
    assert [s.text for s in srt] == [s.text for s in whisper]
    assert [s.speaker for s in srt] == [s.speaker for s in whisper]
    assert [t for s in srt for t in (s.start, s.end)] == pytest.approx(
        [t for s in whisper for t in (s.start, s.end)], abs=1e-3
    )
    assert [s.text for s in text] == [s.text for s in srt[:40]]
    assert srt[0].text.startswith("I had a bad dream the other night.")


def test_format_comes_from_content_when_extension_is_missing(tmp_path: Path) -> None:
    plain = tmp_path / "E03"
    plain.write_bytes((DATA / "E03.srt").read_bytes())
    assert len(parse_file(plain).segments) == 120


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("empty.vtt", b"   \n", "empty.vtt: file is empty"),
        ("latin1.vtt", "WEBVTT\n\n00:00.000 --> 00:01.000\ncaf\xe9\n".encode("latin-1"), "latin1.vtt: line 4: not valid UTF-8"),
        ("nul.srt", b"1\n00:00:00,000 --> 00:00:01,000\nhi\x00\n", "nul.srt: line 3: contains a NUL character"),
        ("bad-time.vtt", b"WEBVTT\n\n00:00:01.000 --> 00:61:00.000\nhi\n", "bad-time.vtt: line 3: malformed timestamp"),
        ("no-timing.vtt", b"WEBVTT\n\nhello there\n", "no-timing.vtt: line 3: cue has no 'start --> end'"),
        ("header.vtt", b"00:00.000 --> 00:01.000\nhi\n", "header.vtt: line 1: WebVTT file does not start"),
        ("shape.json", b'{"text": "hello"}', "shape.json: JSON must be an object with 'segments'"),
        ("broken.json", b'{"segments": [', "broken.json: line 1: invalid JSON"),
        ("types.json", b'{"segments": [{"start": "0", "end": 1, "text": "hi"}]}', "segments[0].start: must be a non-negative number"),
        ("chat.json", b'[{"speaker": "A", "time": "00:00:01.000"}]', "chat.json: [0]: missing field 'message'"),
        ("chat-time.json", b'[{"speaker": "A", "time": "1 min", "message": "hi"}]', "[0].time: '1 min' is not HH:MM:SS.mmm"),
        ("slides.pdf", b"%PDF-1.4 not a transcript", "slides.pdf: unknown transcript format"),
        ("silence.vtt", b"WEBVTT\n\n00:00.000 --> 00:01.000\n<i></i>\n", "silence.vtt: no transcript text found"),
    ],
)
def test_broken_files_are_refused_with_file_and_place(name: str, data: bytes, message: str) -> None:
    with pytest.raises(TranscriptFormatError) as caught:
        parse_bytes(data, name=name, episode_id="x")
    assert message in str(caught.value)


def test_good_files_go_through_beside_bad_ones(tmp_path: Path) -> None:
    bad = tmp_path / "E99.vtt"
    bad.write_bytes(b"WEBVTT\n\n00:00:01.000 --> nonsense\nhi\n")
    dup = tmp_path / "E05.srt"
    dup.write_bytes((DATA / "E03.srt").read_bytes())
    episodes, refused = parse_files([EXAMPLES / "E05.vtt", bad, dup, EXAMPLES / "E06.json"])
    assert [e.episode_id for e in episodes] == ["E05", "E06"]
    assert len(refused) == 2
    assert refused[0].startswith(f"{bad}: line 3: malformed timestamp")
    assert "episode id 'E05' already given by" in refused[1]


def test_directory_scan_takes_transcripts_only() -> None:
    episodes, refused = parse_files([EXAMPLES])
    assert sorted(e.episode_id for e in episodes) == ["E01", "E05", "E06"]
    assert refused == []


def test_a_cue_that_ends_before_it_starts_is_kept_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Real Whisper output: seenunseen E104, line 357, "00:17:27.640 --> 00:17:25.140" for "green".
    data = (b"WEBVTT\n\n00:17:26.640 --> 00:17:27.640\n[Guest]: mans a\n\n"
            b"00:17:27.640 --> 00:17:25.140\n[Unknown]: green\n\n00:17:25.140 --> 00:17:28.640\n[Guest]: to de\n")
    with caplog.at_level("WARNING"):
        segments = parse_bytes(data, name="E104.vtt", episode_id="E104").segments
    assert [(s.start, s.end, s.speaker, s.text) for s in segments][1] == (1047.64, 1047.64, "Unknown", "green")
    assert len(segments) == 3
    assert "E104.vtt': line 6: cue ends before it starts" in caplog.text
