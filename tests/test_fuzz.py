"""Bad input, generated: every parser returns an episode or refuses the file by name, and
`POST /jobs` answers every body with a job or a clear 422, never a crash or half a job.

Inputs are real transcripts mutated (cut, spliced, re-encoded, NULs, random bytes), cue files
built from odd timings and text, JSON of every shape, and plain random bytes. `make soak`
runs the same strategies for 10,000+ inputs; the suite runs a few hundred.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pymongo.database import Database
from redis import Redis

from config.errors import TranscriptFormatError
from config.settings import Settings, redact_url
from producer.jobs import JOBS_INDEX
from producer.parsing import parse_bytes
from producer.web.api import create_app
from tests.conftest import DATA, EXAMPLES

# Every suffix the parsers pick by, upper case, none, and ones they refuse.
NAMES = ["ep.vtt", "ep.srt", "ep.json", "ep.txt", "ep", "ep.md", "EP.VTT", "ep.bin"]
REAL = [path.read_bytes() for path in (EXAMPLES / "E05.vtt", DATA / "E03.srt", DATA / "E03.json", DATA / "E03.txt",
                                       EXAMPLES / "E06.json")]
# Seconds one input may take before it counts as a hang (the largest here parse in well under one).
HANG_SECONDS = 10


@contextmanager
def hang_guard(seconds: float = HANG_SECONDS) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"input still being parsed after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_parse(data: bytes, name: str) -> bool:
    """Parse `data` as file `name`: True if accepted (a sound episode), False if refused by name."""
    with hang_guard():
        try:
            episode = parse_bytes(data, name=name, episode_id="fuzz")
        except TranscriptFormatError as exc:
            assert str(exc).startswith(f"{name}: "), str(exc)
            return False
    assert episode.episode_id == "fuzz" and episode.segments
    for segment in episode.segments:
        assert segment.text and segment.text == segment.text.strip()
        assert 0 <= segment.start <= segment.end and math.isfinite(segment.end)
        segment.text.encode()  # UTF-8 text: it is hashed, tokenized and stored as BSON
        assert segment.speaker is None or segment.speaker.encode()
    return True


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real transcript, damaged a few times over."""
    data = bytearray(draw(st.sampled_from(REAL)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["cut", "insert", "delete", "nul", "splice", "digits"]))
        if kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 200))]
        elif kind == "nul":
            data[at:at] = b"\x00"
        elif kind == "splice":
            data[at:at] = data[: draw(st.integers(0, 300))]
        else:
            data[at : at + 1] = draw(st.sampled_from([b"9", b"99999", b"-", b":", b",", b".", b"-->", b"\n"]))
    encoding = draw(st.sampled_from(["keep", "keep", "keep", "utf-16", "latin-1", "cp1252"]))
    if encoding != "keep":
        return bytes(data).decode("utf-8", "replace").encode(encoding, "replace")
    return bytes(data)


TIMES = st.one_of(
    st.from_regex(r"\A(\d{1,3}:)?\d{2}:\d{2}[.,]\d{3}\Z"),
    st.from_regex(r"\A-?\d{0,12}:?\d{0,3}:\d{0,3}[.,]?\d{0,5}\Z"),
    st.text(max_size=12),
)


@st.composite
def cue_file(draw: st.DrawFn) -> bytes:
    """WebVTT or SRT built from odd timings, cue ids, speakers and text."""
    vtt = draw(st.booleans())
    lines = [draw(st.sampled_from(["WEBVTT", "WEBVTT - title", "", "NOTE x"]))] if vtt else []
    for i in range(draw(st.integers(0, 6))):
        lines.append("")
        if draw(st.booleans()):
            lines.append(str(i + 1))
        lines.append(f"{draw(TIMES)} {draw(st.sampled_from(['-->', '->', '']))} {draw(TIMES)}")
        lines.extend(draw(st.lists(st.text(max_size=40), max_size=3)))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


def json_values(floats: st.SearchStrategy[float]) -> st.SearchStrategy[object]:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), floats, st.text(max_size=20))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


JSON_VALUES = json_values(st.floats())
FIELDS = st.sampled_from(["start", "end", "text", "speaker", "time", "message", "segments", "x"])


@st.composite
def json_file(draw: st.DrawFn) -> bytes:
    """Whisper or chat JSON with fields of every type, or any JSON at all."""
    item = st.dictionaries(FIELDS, JSON_VALUES | st.sampled_from([0, 1.5, "00:00:01.000", "hi", "\ud800"]),
                           max_size=5)
    doc = draw(st.one_of(
        st.builds(lambda s: {"segments": s}, st.lists(item, max_size=4) | JSON_VALUES),
        st.lists(item, max_size=4),
        JSON_VALUES,
    ))
    return json.dumps(doc).encode()


INPUTS = st.one_of(mutated(), cue_file(), json_file(), st.binary(max_size=512))


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=INPUTS, name=st.sampled_from(NAMES))
def test_parsers_accept_or_refuse_by_name(data: bytes, name: str) -> None:
    check_parse(data, name)


@pytest.mark.parametrize(("name", "data", "message"), [
    ("empty.vtt", b"", "empty.vtt: file is empty"),
    ("blank.srt", b" \n\t\r\n", "blank.srt: file is empty"),
    ("bom.txt", b"\xef\xbb\xbf", "bom.txt: no transcript text found"),
    ("utf16.vtt", "WEBVTT\n\n00:00.000 --> 00:01.000\nhi\n".encode("utf-16"), "utf16.vtt: line 1: not valid UTF-8"),
    ("latin1.srt", "1\n00:00:00,000 --> 00:00:01,000\nJosé\n".encode("latin-1"), "latin1.srt: line 3: not valid UTF-8"),
    ("nul.vtt", b"WEBVTT\n\n00:00.000 --> 00:01.000\nhi\x00\n", "nul.vtt: line 4: contains a NUL character"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "deep.json: invalid JSON: maximum recursion depth exceeded"),
    ("digits.json", b'{"segments": [{"start": ' + b"1" * 5000 + b', "end": 2, "text": "x"}]}',
     "digits.json: invalid JSON: Exceeds the limit (4300 digits)"),
    ("huge.json", b'{"segments": [{"start": 1' + b"0" * 400 + b', "end": 2, "text": "x"}]}',
     "huge.json: segments[0].start: must be a non-negative number"),
    ("inf.json", b'{"segments": [{"start": 1e999, "end": 1e999, "text": "x"}]}',
     "inf.json: segments[0].start: must be a non-negative number, got inf"),
    ("surrogate.json", b'[{"speaker": "a", "time": "00:01", "message": "\\udc00"}]',
     "surrogate.json: [0].message: not valid Unicode"),
    ("hours.vtt", b"WEBVTT\n\n" + b"9" * 5000 + b":00:00.000 --> 00:01.000\nhi\n", "hours.vtt: line 3: malformed"),
    ("list.json", b"[1, 2]", "list.json: [0]: must be an object with speaker, time, message"),
    ("segments.json", b'{"segments": {"start": 0}}', "segments.json: field 'segments' must be a list, got dict"),
    ("text.json", b'{"segments": [{"start": 0, "end": 1, "text": 5}]}',
     "text.json: segments[0].text: must be a string"),
])
def test_bad_files_are_refused_with_a_clear_message(name: str, data: bytes, message: str) -> None:
    with pytest.raises(TranscriptFormatError) as refused:
        with hang_guard():
            parse_bytes(data, name=name, episode_id="x")
    assert str(refused.value).startswith(message)


def test_enormous_files_and_single_cues_parse_in_bounded_time() -> None:
    one_cue = b"WEBVTT\n\n00:00.000 --> 00:01.000\n[Amit Varma]: " + b"word " * 1_600_000
    one_word = b"1\n00:00:00,000 --> 00:00:01,000\n" + b"a" * 8_000_000
    many = b"".join(b"%d\n00:00:%02d,000 --> 00:00:%02d,500\ncue number %d\n\n" % (i, i % 60, i % 60, i)
                    for i in range(150_000))
    with hang_guard():
        cue = parse_bytes(one_cue, name="one.vtt", episode_id="one")
        word = parse_bytes(one_word, name="word.srt", episode_id="word")
        cues = parse_bytes(many, name="many.srt", episode_id="many")
    assert [(s.speaker, len(s.text)) for s in cue.segments] == [("Amit Varma", 5 * 1_600_000 - 1)]
    assert len(word.segments[0].text) == 8_000_000
    assert len(cues.segments) == 150_000 and cues.segments[-1].text == "cue number 149999"


# Adversarial shapes, each a function of a repeat count: long runs of what a pattern starts with
# (`<v.`, `<a`, `[`, a counter and newlines, digits), nested and unclosed tags, dots and spaces.
SHAPES: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "voice-dots": ("ep.txt", lambda n: b"<v" + b"." * n),
    "voice-classes": ("ep.txt", lambda n: b"<v" + b".a" * n),
    "voice-in-cue": ("ep.vtt", lambda n: b"WEBVTT\n\n00:00.000 --> 00:01.000\n<v" + b"." * n),
    "unclosed-tags": ("ep.txt", lambda n: b"<a" * n),
    "nested-tags": ("ep.txt", lambda n: b"<b><i" * n),
    "lone-brackets": ("ep.txt", lambda n: b"<" * n + b"x"),
    "speaker-brackets": ("ep.txt", lambda n: b"[" * n + b"x"),
    "srt-newlines": ("ep", lambda n: b"1" + b"\n" * n + b"x"),
    "srt-spaces": ("ep", lambda n: b"1" + b" \n" * n + b"x"),
    "srt-digits": ("ep", lambda n: b"1\n" + b"0" * n + b"x"),
    "digit-run": ("ep.srt", lambda n: b"1\n" + b"1" * n + b":00:00,000 --> 00:00:01,000\nx"),
    "dots-and-spaces": ("ep.txt", lambda n: b". " * n),
    "long-word": ("ep.txt", lambda n: (b"a" * 99 + b" ") * (n // 100)),
    "timing-arrows": ("ep.vtt", lambda n: b"WEBVTT\n\n" + b"-->" * n),
}
# A doubling of the input may cost this much more time; linear is 2, quadratic 4.
LINEAR_RATIO = 2.5


def _best_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
    return best


def _doubling_ratio(run_at: Callable[[int], Callable[[], object]]) -> tuple[int, float]:
    """The size at which one run takes measurable time (10 ms), and the time ratio of twice that size to it.

    Best of several runs, and of three tries: a neighbour on the machine slows a run, never speeds it.
    """
    size = 4096
    with hang_guard():
        while _best_seconds(run_at(size), repeats=1) < 0.01 and size < 8_000_000:
            size *= 2
        ratio = min(_best_seconds(run_at(2 * size)) / _best_seconds(run_at(size)) for _ in range(3))
    return size, ratio


def _parse_or_refuse(name: str, data: bytes) -> Callable[[], object]:
    def parse() -> None:
        try:
            parse_bytes(data, name=name, episode_id="shape")
        except TranscriptFormatError:
            pass

    return parse


@pytest.mark.parametrize("shape", SHAPES)
def test_parsing_time_is_linear_in_size_on_adversarial_shapes(shape: str) -> None:
    name, make = SHAPES[shape]
    size, ratio = _doubling_ratio(lambda n: _parse_or_refuse(name, make(n)))
    assert ratio <= LINEAR_RATIO, f"{shape}: doubling {size} repeats cost {ratio:.2f}x"


@pytest.mark.parametrize("text", ["a", "a://", "a://b:c", "?pass", "a1"])
def test_redaction_time_is_linear_in_size(text: str) -> None:
    """Every error message is redacted, and messages quote input (a malformed timing line, a name)."""
    size, ratio = _doubling_ratio(lambda n: partial(redact_url, text * n))
    assert ratio <= LINEAR_RATIO, f"{text!r}: doubling {size} repeats cost {ratio:.2f}x"


TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
TRANSCRIPT = st.fixed_dictionaries(
    {"name": st.sampled_from(NAMES), "content": INPUTS.map(lambda b: b.decode("utf-8", "replace"))},
    optional={"episode_id": st.text(max_size=12)},
)
JSON_VALUES = json_values(st.floats())
BODIES = st.one_of(
    st.fixed_dictionaries({"transcripts": st.lists(TRANSCRIPT, min_size=1, max_size=3)},
                          optional={"podcast": st.text(max_size=20) | st.none(), "instruction": st.none()}
                          ).map(lambda doc: json.dumps(doc).encode()),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.builds(lambda t: json.dumps({"transcripts": t}).encode(), JSON_VALUES),
    st.binary(max_size=256),
)


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings.replace(api_token=TOKEN)))


def check_post(client: TestClient, redis: Redis, db: Database, body: bytes) -> bool:
    """POST `body` to /jobs: True if a job was created, False if refused (400: not JSON, 422: not a
    job request or no transcript accepted) with nothing left behind."""
    jobs, batches, stored = redis.zcard(JOBS_INDEX), len(redis.keys("rq:job:*")), db.jobs.count_documents({})
    with hang_guard():
        answer = client.post("/jobs", content=body, headers=AUTH)
    assert answer.status_code in (202, 400, 422), (answer.status_code, answer.text)
    if answer.status_code == 202:
        created = answer.json()
        assert created["chunks"] > 0 and created["batches"] >= 1
        assert redis.zcard(JOBS_INDEX) == jobs + 1 and db.jobs.count_documents({"_id": created["job_id"]}) == 1
        return True
    assert answer.json()["detail"]
    assert (redis.zcard(JOBS_INDEX), len(redis.keys("rq:job:*")), db.jobs.count_documents({})) == (
        jobs, batches, stored)
    return False


@hypothesis_settings(max_examples=100, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=BODIES)
def test_post_jobs_answers_every_body_with_a_job_or_a_clear_refusal(
    client: TestClient, redis: Redis, db: Database, body: bytes
) -> None:
    check_post(client, redis, db, body)


def test_post_jobs_refuses_content_with_a_lone_surrogate(client: TestClient, redis: Redis, db: Database) -> None:
    body = b'{"transcripts": [{"name": "E.txt", "content": "half a pair: \\ud800"}]}'
    assert check_post(client, redis, db, body) is False


def test_post_jobs_refuses_a_non_finite_number(client: TestClient, redis: Redis, db: Database) -> None:
    assert check_post(client, redis, db, b'{"transcripts": [{"name": "E.txt", "content": Infinity}]}') is False
