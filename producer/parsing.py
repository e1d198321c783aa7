"""Transcript parsers: WebVTT, SRT, Whisper JSON, chat-style JSON and plain text.

Every parser takes the decoded text and the file's name (for messages) and returns
segments; `parse_file` picks the parser from content and extension. Any defect is
a `TranscriptFormatError` naming the file and the line or field.
"""

from __future__ import annotations

import html
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from config.errors import TranscriptFormatError
from producer.models import Episode, Segment, check_labels

logger = logging.getLogger(__name__)

# Whisper/pyannote output as in the seenunseen files: "[Amit Varma]: text".
_BRACKET_SPEAKER = re.compile(r"^\[(?P<speaker>[^\]\n]{1,100})\]:\s*")
# Every pattern that reads input is linear in its length: possessive quantifiers give nothing back, and
# no two parts can match the same characters (a class name holds no '.', a tag no '<'), so a long
# run of '.', '<a' or newlines costs one pass, not one per character (or two to the power of it).
# WebVTT voice span: "<v Amit Varma>text", "<v.loud.fast Amit>text".
_VOICE_SPEAKER = re.compile(r"^<v(?:\.[^\s>.]++)*+\s++(?P<speaker>[^>]{1,100})>")
_TAG = re.compile(r"</?[a-z][^<>]*+>", re.IGNORECASE)
# Hours have at most 9 digits: more is a malformed timestamp (and int() refuses 4,300 digits).
_VTT_TIME = re.compile(r"^(?:(\d{1,9}):)?([0-5]\d):([0-5]\d)\.(\d{3})$")
_SRT_TIME = re.compile(r"^(\d{1,9}):([0-5]\d):([0-5]\d)[,.](\d{3})$")
_CHAT_TIME = re.compile(r"^(?:(\d{1,9}):)?([0-5]\d):([0-5]\d)(?:[.,](\d{1,3}))?$")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Whitespace that is not already one plain space: text already normal is not copied.
_SPACES = re.compile(r"\s{2,}|[^\S ]")
_LEADING_SPACE = re.compile(r"\s*")
# A counter, a line break (blank lines may follow), then a timing: "1\n00:00:01,000 -->".
_SRT_START = re.compile(r"\A\s*+\d++[^\S\n]*+\n\s*+\d++:\d{2}:\d{2}[,.]\d{3}\s*+-->")

TEXT_SUFFIXES = {".txt", ".text", ".md", ""}


def parse_file(
    path: Path, *, episode_id: str | None = None, podcast: str | None = None, published_at: str | None = None
) -> Episode:
    """Parse one transcript file into an Episode (episode id from the file name unless given)."""
    check_labels(str(path), episode_id or path.stem, podcast)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TranscriptFormatError(f"{path}: cannot read file: {exc.strerror or exc}") from exc
    # The bytes are dropped once decoded: parsing holds the text, not both.
    text = decode_text(data, str(path))
    del data
    return parse_text(text, name=str(path), episode_id=episode_id or path.stem, podcast=podcast,
                      published_at=published_at)


def parse_bytes(
    data: bytes, *, name: str, episode_id: str, podcast: str | None = None, published_at: str | None = None
) -> Episode:
    """Parse transcript bytes; `name` gives the extension and is used in error messages."""
    check_labels(name, episode_id, podcast)
    return parse_text(decode_text(data, name), name=name, episode_id=episode_id, podcast=podcast,
                      published_at=published_at)


def parse_text(
    text: str, *, name: str, episode_id: str, podcast: str | None = None, published_at: str | None = None
) -> Episode:
    """Parse decoded transcript text (see `parse_bytes`)."""
    segments = parse_text_auto(text, name)
    if not segments:
        raise TranscriptFormatError(f"{name}: no transcript text found")
    if not episode_id.strip():
        raise TranscriptFormatError(f"{name}: empty episode id")
    return Episode(episode_id=episode_id, podcast=podcast, published_at=published_at, segments=segments, source=name)


def decode_text(data: bytes, name: str) -> str:
    # isspace(), not strip(): no copy of a large file just to see that it is blank.
    if not data or data.isspace():
        raise TranscriptFormatError(f"{name}: file is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TranscriptFormatError(f"{name}: line {line}: not valid UTF-8 (byte {exc.start})") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise TranscriptFormatError(f"{name}: line {line}: contains a NUL character")
    return text


def parse_text_auto(text: str, name: str) -> list[Segment]:
    suffix = Path(name).suffix.lower()
    # The first characters after leading whitespace, without copying the whole text as lstrip() would.
    start = _LEADING_SPACE.match(text).end()
    head = text[start : start + 8]
    if head.startswith("WEBVTT"):
        return parse_vtt(text, name)
    if suffix == ".json" or (suffix == "" and head[:1] in "[{" and _is_json(text)):
        return parse_json(text, name)
    if _SRT_START.match(text) or suffix == ".srt":
        return parse_srt(text, name)
    if suffix == ".vtt":
        raise TranscriptFormatError(f"{name}: line 1: WebVTT file does not start with 'WEBVTT'")
    if suffix in TEXT_SUFFIXES:
        return parse_plain_text(text, name)
    raise TranscriptFormatError(
        f"{name}: unknown transcript format (expected WebVTT, SRT, Whisper or chat JSON, or plain text)"
    )


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def parse_vtt(text: str, name: str) -> list[Segment]:
    """WebVTT cues; NOTE, STYLE and REGION blocks are skipped, speaker tags kept."""
    return _parse_cues(text, name, _VTT_TIME, "cue", skip=("WEBVTT", "NOTE", "STYLE", "REGION"))


def parse_srt(text: str, name: str) -> list[Segment]:
    """SubRip cues: a counter line, a timing line with commas, then text lines."""
    return _parse_cues(text, name, _SRT_TIME, "SRT cue")


def _parse_cues(
    text: str, name: str, time_pattern: re.Pattern[str], label: str, skip: tuple[str, ...] = ()
) -> list[Segment]:
    """Blocks of an optional identifier line (a cue id, SRT's counter), a timing line, then text."""
    segments: list[Segment] = []
    for line_no, lines in _blocks(text):
        if skip and lines[0].startswith(skip):
            continue
        timing_at = 0 if "-->" in lines[0] else 1
        if timing_at >= len(lines) or "-->" not in lines[timing_at]:
            raise TranscriptFormatError(f"{name}: line {line_no}: {label} has no 'start --> end' timing line")
        start, end = _parse_timing(lines[timing_at], time_pattern, name, line_no + timing_at)
        segment = _make_segment(start, end, lines[timing_at + 1 :])
        if segment:
            segments.append(segment)
    return segments


def parse_json(text: str, name: str) -> list[Segment]:
    """Whisper JSON (`{"segments": [{start, end, text}]}`) or chat JSON (`[{speaker, time, message}]`)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        # json's message ends where its position would go ("Unterminated string starting at"): give the column.
        at = "" if exc.msg.endswith(" at") else " at"
        raise TranscriptFormatError(f"{name}: line {exc.lineno}: invalid JSON: {exc.msg}{at} column {exc.colno}"
                                    ) from None
    except (ValueError, RecursionError) as exc:
        # An integer of thousands of digits, or nesting deeper than the interpreter's recursion limit.
        raise TranscriptFormatError(f"{name}: invalid JSON: {exc}") from None
    if isinstance(doc, dict) and "segments" in doc:
        return parse_whisper_segments(doc["segments"], name)
    if isinstance(doc, list):
        return parse_chat_messages(doc, name)
    raise TranscriptFormatError(
        f"{name}: JSON must be an object with 'segments' (Whisper) or a list of "
        f"{{speaker, time, message}} (chat), got {type(doc).__name__}"
        + (f" with keys {sorted(doc)[:5]}" if isinstance(doc, dict) else "")
    )


def parse_whisper_segments(items: object, name: str) -> list[Segment]:
    if not isinstance(items, list):
        raise TranscriptFormatError(f"{name}: field 'segments' must be a list, got {type(items).__name__}")
    segments: list[Segment] = []
    for i, item in enumerate(items):
        where = f"{name}: segments[{i}]"
        if not isinstance(item, dict):
            raise TranscriptFormatError(f"{where}: must be an object, got {type(item).__name__}")
        start = _number(item, "start", where)
        end = _number(item, "end", where)
        if end < start:
            raise TranscriptFormatError(f"{where}: end {end} is before start {start}")
        speaker = None if item.get("speaker") is None else _string(item, "speaker", where)
        segment = _make_segment(start, end, [_string(item, "text", where)], speaker=speaker)
        if segment:
            segments.append(segment)
    return segments


def parse_chat_messages(items: list[object], name: str) -> list[Segment]:
    """Chat turns carry only a start time: each ends where the next begins."""
    turns: list[tuple[float, str, str]] = []
    for i, item in enumerate(items):
        where = f"{name}: [{i}]"
        if not isinstance(item, dict):
            raise TranscriptFormatError(f"{where}: must be an object with speaker, time, message")
        speaker = _string(item, "speaker", where)
        message = _string(item, "message", where)
        raw_time = _string(item, "time", where)
        match = _CHAT_TIME.match(raw_time.strip())
        if not match:
            raise TranscriptFormatError(f"{where}.time: {raw_time[:40]!r} is not HH:MM:SS.mmm")
        start = _seconds(match)
        if turns and start < turns[-1][0]:
            raise TranscriptFormatError(f"{where}.time: {raw_time} is earlier than the turn before it")
        turns.append((start, speaker, message))
    segments: list[Segment] = []
    for i, (start, speaker, message) in enumerate(turns):
        end = turns[i + 1][0] if i + 1 < len(turns) else start
        segment = _make_segment(start, end, [message], speaker=speaker)
        if segment:
            segments.append(segment)
    return segments


def parse_plain_text(text: str, name: str) -> list[Segment]:
    """Plain text has no timing: one segment per paragraph, times 0."""
    return [s for _, lines in _blocks(text) if (s := _make_segment(0.0, 0.0, lines))]


def _blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """Blank-line separated blocks with the 1-based line number of their first line, as they come."""
    current: list[str] = []
    start = 0
    for i, line in enumerate(_lines(text), start=1):
        line = line.rstrip()  # the unstripped copy of a huge line is dropped at once
        if line:
            if not current:
                start = i
            current.append(line)
        elif current:
            yield start, current
            current = []
    if current:
        yield start, current


def _lines(text: str) -> Iterator[str]:
    """Lines split at \\n, \\r\\n and \\r only, one at a time.

    `str.splitlines` also splits at U+2028, NEL, form feed and others, which are text inside a cue.
    """
    start = 0
    for match in _LINE_BREAK.finditer(text):
        yield text[start : match.start()]
        start = match.end()
    if start < len(text):
        yield text[start:]


def _parse_timing(line: str, pattern: re.Pattern[str], name: str, line_no: int) -> tuple[float, float]:
    left, _, right = line.partition("-->")
    parts = right.split(maxsplit=1)  # the end time; the rest of a long line is not split
    if not parts:
        raise TranscriptFormatError(f"{name}: line {line_no}: timing line has no end time: {line.strip()[:80]!r}")
    start_m, end_m = pattern.match(left.strip()), pattern.match(parts[0])
    if not start_m or not end_m:
        raise TranscriptFormatError(f"{name}: line {line_no}: malformed timestamp in {line.strip()[:80]!r}")
    start, end = _seconds(start_m), _seconds(end_m)
    if end < start:
        # Whisper writes such cues now and then (seenunseen E104): keep the words, not the bad end.
        logger.warning("%r: line %d: cue ends before it starts (%r); its end is set to its start",
                       name, line_no, line.strip())
        end = start
    return start, end


def _seconds(match: re.Match[str]) -> float:
    hours, minutes, seconds, fraction = match.groups()
    millis = int((fraction or "0").ljust(3, "0"))
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + millis / 1000


def _make_segment(start: float, end: float, lines: list[str], speaker: str | None = None) -> Segment | None:
    # Each step replaces `text`, so a huge cue is held in about two copies at a time, not five.
    text = lines[0].strip() if len(lines) == 1 else " ".join(line.strip() for line in lines).strip()
    if speaker is None:
        match = _BRACKET_SPEAKER.match(text) or _VOICE_SPEAKER.match(text)
        if match:
            speaker = match["speaker"].strip()
            text = text[match.end() :]
    # One regex pass, not split() and join(): a long line makes no list of millions of words.
    text = _SPACES.sub(" ", html.unescape(_TAG.sub("", text))).strip()
    if not text:
        return None
    # Interned: a speaker's name is one string however many cues name it.
    return Segment(start=start, end=end, speaker=sys.intern(speaker) if speaker else None, text=text)


def _string(item: dict[str, object], key: str, where: str) -> str:
    if key not in item:
        raise TranscriptFormatError(f"{where}: missing field '{key}'")
    value = item[key]
    if not isinstance(value, str):
        raise TranscriptFormatError(f"{where}.{key}: must be a string, got {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError:
        # JSON may escape half a surrogate pair ("\ud800"): no UTF-8 text, so no hash, BSON or token.
        raise TranscriptFormatError(f"{where}.{key}: not valid Unicode (a lone surrogate)") from None
    return value


def _number(item: dict[str, object], key: str, where: str) -> float:
    if key not in item:
        raise TranscriptFormatError(f"{where}: missing field '{key}'")
    value = item[key]
    # The bound refuses NaN, infinity and integers too large for a float.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= sys.float_info.max:
        raise TranscriptFormatError(f"{where}.{key}: must be a non-negative number, got {value!r:.40}")
    return float(value)
