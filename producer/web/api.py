"""The HTTP API: enqueue transcripts, poll a job by id, list, retry and cancel jobs; search the vectors.

Every route but `/healthz`, `/docs` and `/openapi.json` needs `Authorization: Bearer <PODEMBED_API_TOKEN>`
(the API's description holds no data, and a browser opening `/docs` sends no token); the dashboard's page
and `/metrics` are in `producer.web.dashboard`. `podembed serve`
runs the app with uvicorn; the Modal web endpoint imports `create_app`. Routes are plain
`def`s: FastAPI runs them in its thread pool, as Redis, pymongo and chunking block, so the
event loop stays free. A request with a body shows its token before anything of it is read; then
large bodies are taken `PODEMBED_MAX_LARGE_REQUESTS` at a time (the others get a 503 with Retry-After,
so memory stays bounded), and a body must arrive within `PODEMBED_BODY_SECONDS`. Only the loopback
names and `PODEMBED_ALLOWED_HOSTS` are answered, so a page that rebinds its own name to 127.0.0.1 is not.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Annotated

import anyio
import pymongo
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from pymongo.database import Database
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config.errors import (
    ConfigError,
    JobNotFoundError,
    NotifyError,
    PodembedError,
    QueueError,
    SearchError,
    StoreError,
    TranscriptFormatError,
)
from config.services import LOOPBACK
from config.settings import Settings, redact_url
from producer.chunking import ChunkLimits, text_budget
from producer.connections import mongo_database, redis_client
from producer.enqueue import collect_episodes, ingest
from producer.job_status import JobStatus
from producer.jobs import JobRecords
from producer.models import MAX_LABEL_CHARS, Episode
from producer.operations import CancelResult, RetryResult, cancel, retry
from producer.parsing import parse_bytes
from producer.tokens import load_tokenizer
from producer.web.dashboard import add_browser_routes

# Most specific first: the HTTP status each of our errors answers with (other errors: 409).
ERROR_STATUS: list[tuple[type[PodembedError], int]] = [
    (JobNotFoundError, 404),
    (TranscriptFormatError, 422),
    (NotifyError, 422),
    (QueueError, 503),
    (StoreError, 503),
    (SearchError, 422),
    (ConfigError, 500),
]


# A body this large counts against PODEMBED_MAX_LARGE_REQUESTS (a body of unknown length does too).
LARGE_REQUEST_BYTES = 1024 * 1024
# How long a client refused for load waits before trying again.
RETRY_AFTER_SECONDS = 5
# Instructions are a sentence; the model's window bounds them in tokens as well (checked per request).
MAX_INSTRUCTION_CHARS = 1000
# Transcripts of one request not parsed by then are refused: a request holds a thread this long at most,
# plus the one transcript in hand (parsing is linear, a few seconds for the largest body).
PARSE_SECONDS = 30.0
# Methods that carry no body: the token of the others is checked before their body is read.
BODILESS = {"GET", "HEAD", "OPTIONS"}

# Checked by our own dependency, so a missing header is a 401 with our message, not FastAPI's 403.
BEARER = HTTPBearer(auto_error=False)
# The header that carries what `podembed status` says on stderr beside the document (Redis down, say).
NOTE_HEADER = "X-Podembed-Note"


class TranscriptIn(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_LABEL_CHARS,
                      description="file name; its extension picks the parser")
    content: str = Field(description="the transcript: WebVTT, SRT, Whisper or chat JSON, or plain text")
    episode_id: str | None = Field(default=None, max_length=MAX_LABEL_CHARS,
                                   description="default: the file name without its extension")


class JobRequest(BaseModel):
    podcast: str | None = Field(default=None, max_length=MAX_LABEL_CHARS)
    instruction: str | None = Field(default=None, max_length=MAX_INSTRUCTION_CHARS,
                                    description="default: PODEMBED_INSTRUCTION")
    transcripts: list[TranscriptIn] = Field(min_length=1)
    notify: str | None = Field(default=None, max_length=2000,
                               description="POST the job's status document here when it ends (default: "
                                           "PODEMBED_NOTIFY_URL)")


class JobCreated(BaseModel):
    job_id: str
    episodes: int
    chunks: int
    batches: int
    tokens: int
    refused: list[str]


class SearchHit(BaseModel):
    chunk_id: str
    episode_id: str | None
    podcast: str | None
    start: float
    end: float
    score: float = Field(description="cosine similarity to the query")
    text: str


class SearchResults(BaseModel):
    query: str
    engine: str = Field(description="'atlas' ($vectorSearch) or 'exact' (cosine scan over the local cache)")
    hybrid: bool = Field(description="whether the vector ranking was fused with BM25's (scores are then fused ones)")
    model: str
    vector_key: str
    k: int
    hits: list[SearchHit]


class Refused(BaseModel):
    detail: str
    refused: list[str]


def create_app(settings: Settings, *, open_access: bool = False) -> FastAPI:
    """The API over the Redis and MongoDB of `settings`; without `api_token` only if `open_access`."""
    if not settings.api_token and not open_access:
        raise ConfigError("PODEMBED_API_TOKEN is not set: the HTTP API does not run without a token")
    redis = redis_client(settings)
    db = mongo_database(settings)
    records = JobRecords(redis, db, settings.result_ttl)

    token = None if open_access else settings.api_token or ""

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
        if not _token_accepted(token, credentials.credentials if credentials else None):
            raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})

    app = _App(title="podembed", summary="Batch embedding jobs for podcast transcripts.",
               max_body_size=settings.max_request_bytes, docs_url=None, redoc_url=None)
    jobs = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(authorize)],
                     responses={401: {"description": "missing or wrong bearer token"}})

    @app.get("/healthz", tags=["health"])
    def healthz(response: Response) -> dict[str, bool]:
        """Whether Redis and MongoDB answer (no token needed)."""
        health = {"redis": _answers(redis.ping), "mongo": _answers(lambda: _ping(db))}
        if not all(health.values()):
            response.status_code = 503
        return health

    @jobs.post("", status_code=202, response_model=JobCreated, responses={422: {"model": Refused}})
    def create_job(body: JobRequest, response: Response) -> JobCreated | JSONResponse:
        """Parse, chunk and enqueue the transcripts as one job; refused ones are listed."""
        if body.instruction is not None:
            _check_instruction(settings, body.instruction)
        episodes, refused = _parse(body, time.monotonic() + PARSE_SECONDS)
        if not episodes:
            detail = f"nothing to ingest: {len(refused)} transcript(s) refused, none accepted"
            return JSONResponse(status_code=422, content={"detail": detail, "refused": refused})
        job = ingest(settings.replace(notify_url=body.notify or settings.notify_url), redis, db, episodes,
                     kind="ingest", instruction=body.instruction)
        response.headers["Location"] = f"/jobs/{job.job_id}"
        return JobCreated.model_validate(asdict(job) | {"refused": refused})

    @jobs.get("", response_model=list[JobStatus])
    def list_jobs(limit: Annotated[int, Query(ge=1, le=500)] = 20) -> list[JobStatus]:
        """Recent jobs, newest first."""
        return records.recent(limit)

    @jobs.get("/{job_id}", response_model=JobStatus, responses={404: {"description": "no job with this id"}})
    def get_job(job_id: str, response: Response) -> JobStatus:
        """The job's status document; with Redis down, the copy MongoDB kept of a job that had ended (the
        `X-Podembed-Note` header says so), as `podembed status` shows it."""
        try:
            return records.status(job_id)
        except QueueError as down:
            status, note = records.ended_status(job_id, down)
            response.headers[NOTE_HEADER] = redact_url(note)
            return status

    @jobs.post("/{job_id}/retry", response_model=RetryResult)
    def retry_job(job_id: str) -> RetryResult:
        """Requeue the job's failed batches."""
        return retry(settings, redis, db, job_id)

    @jobs.post("/{job_id}/cancel", response_model=CancelResult)
    def cancel_job(job_id: str) -> CancelResult:
        """Remove the job's queued batches; running ones finish."""
        return cancel(settings, redis, db, job_id)

    searcher: list = []
    search_lock = threading.Lock()

    @app.get("/search", tags=["search"], dependencies=[Depends(authorize)], response_model=SearchResults,
             responses={401: {"description": "missing or wrong bearer token"}})
    def search(q: Annotated[str, Query(min_length=1, max_length=2000, description="the query")],
               k: Annotated[int, Query(ge=1, le=100)] = 10, podcast: str | None = None,
               episode: str | None = None, hybrid: bool | None = None) -> SearchResults:
        """The `k` stored chunks closest to the query, under the configured model and instruction."""
        # The searcher (its model, its vector cache) is built on the first query, not at start-up;
        # one query at a time keeps the cache refresh single-threaded.
        from worker.read.search import Searcher

        with search_lock:
            if not searcher:
                searcher.append(Searcher(settings, db))
            hybrid = searcher[0].hybrid if hybrid is None else hybrid
            hits = searcher[0].search([q], k, podcast=podcast, episode_id=episode, hybrid=hybrid)[0]
        return SearchResults(query=q, engine=searcher[0].engine.name, hybrid=hybrid, model=searcher[0].spec.model,
                             vector_key=searcher[0].spec.key, k=k, hits=[SearchHit(**h.to_dict()) for h in hits])

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 echoes the input, which may hold NaN or infinity: not renderable as JSON.
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(413)
    def too_large(request: Request, exc: Exception) -> JSONResponse:
        return _too_large(settings.max_request_bytes)

    @app.exception_handler(PodembedError)
    def podembed_error(request: Request, exc: PodembedError) -> JSONResponse:
        code = next((code for kind, code in ERROR_STATUS if isinstance(exc, kind)), 409)
        return JSONResponse(status_code=code, content={"detail": redact_url(str(exc))})

    app.include_router(jobs)
    add_browser_routes(app, settings, records, authorize)
    app.add_middleware(BodyAdmission, token=token, limit=settings.max_large_requests,
                       body_seconds=settings.body_seconds)
    # Outermost: a request for another host name is answered 400 before anything else. A Host header
    # names an IPv6 address in brackets.
    hosts = [*LOOPBACK, "[::1]", *filter(None, (h.strip() for h in settings.allowed_hosts.split(",")))]
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    return app


UNAUTHORIZED = "missing or wrong bearer token"


def _token_accepted(token: str | None, given: str | None) -> bool:
    """Whether the bearer token `given` is `token` (None: the API is open), in constant time."""
    return token is None or hmac.compare_digest((given or "").encode(), token.encode())


def _bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    scheme, _, given = (authorization or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None


class BodyAdmission:
    """Who may send a body, how many large ones at once, and how fast, in that order, before any of it is read.

    A request with a body and no token is a 401; a large one beyond `limit` at once is a 503 with
    Retry-After; a body not received within `body_seconds` is a 408 and its connection is closed.
    One event loop runs this, so a plain counter needs no lock.
    """

    def __init__(self, app: ASGIApp, token: str | None, limit: int, body_seconds: float) -> None:
        self.app = app
        self.token = token
        self.limit = limit
        self.body_seconds = body_seconds
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODILESS:
            await self.app(scope, receive, send)
            return
        if not _token_accepted(self.token, _bearer(Headers(scope=scope).get("authorization"))):
            await JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"},
                               content={"detail": UNAUTHORIZED})(scope, receive, send)
            return
        receive = _timed_body(receive, self.body_seconds)
        if not _large(scope):
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            busy = JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}, content={
                "detail": f"busy: {self.active} large request(s) (over {LARGE_REQUEST_BYTES} bytes) in progress, "
                          f"the limit is {self.limit} (PODEMBED_MAX_LARGE_REQUESTS); retry in {RETRY_AFTER_SECONDS} s"})
            await busy(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def _timed_body(receive: Receive, seconds: float) -> Receive:
    """`receive` that raises a 408 once the body has taken over `seconds` (what follows the body is not timed)."""
    deadline = time.monotonic() + seconds
    done = False

    async def timed() -> Message:
        nonlocal done
        if done:
            return await receive()
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                message = await receive()
        except TimeoutError:
            # FastAPI passes an HTTPException met while reading the body on to its handler as it is.
            raise HTTPException(408, f"request body not received within {seconds:g} s "
                                     "(PODEMBED_BODY_SECONDS)") from None
        done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return timed


def _large(scope: Scope) -> bool:
    length = dict(scope["headers"]).get(b"content-length")
    return length is None or not length.isdigit() or int(length) > LARGE_REQUEST_BYTES


def _check_instruction(settings: Settings, instruction: str) -> None:
    """A 422 naming the limit when the instruction leaves no room for text in the model's window."""
    try:
        text_budget(load_tokenizer(settings), ChunkLimits(settings.chunk_tokens, 0, instruction))
    except ConfigError as exc:
        raise HTTPException(422, f"instruction too long: {exc}") from None


class _App(FastAPI):
    """FastAPI whose 413 is JSON like every other error, also for a declared Content-Length over the limit
    (Starlette answers that one in plain text, outside every handler and middleware of the app)."""

    def build_middleware_stack(self) -> ASGIApp:
        inner = super().build_middleware_stack()
        limit = self.max_body_size

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            length = Headers(scope=scope).get("content-length", "") if scope["type"] == "http" else ""
            if limit is not None and length.isdigit() and int(length) > limit:
                await _too_large(limit)(scope, receive, send)
                return
            await inner(scope, receive, send)

        return app


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(status_code=413, content={"detail": f"request body over {limit} bytes "
                                                           "(PODEMBED_MAX_REQUEST_BYTES)"})


def _parse(body: JobRequest, deadline: float) -> tuple[list[Episode], list[str]]:
    """Parse every transcript as `ingest` parses files: bad ones are refused and the others go on,
    and those not begun by `deadline` are refused as well."""
    return collect_episodes(
        # "surrogatepass": a lone surrogate escaped in the JSON reaches the parser, which refuses
        # it as invalid UTF-8 like any file's.
        (t.name, partial(_parse_by, deadline, t.content.encode("utf-8", "surrogatepass"), name=t.name,
                         episode_id=t.episode_id or Path(t.name).stem, podcast=body.podcast))
        for t in body.transcripts
    )


def _parse_by(deadline: float, data: bytes, **where: str | None) -> Episode:
    if time.monotonic() > deadline:
        raise TranscriptFormatError(f"{where['name']!r}: not parsed: the request's transcripts took over "
                                    f"{PARSE_SECONDS:g} s")
    return parse_bytes(data, **where)


def _ping(db: Database) -> None:
    # A health check answers quickly: the client's own timeouts allow a slow nx-27017 minutes.
    with pymongo.timeout(3):
        db.command("ping")


def _answers(ping: Callable[[], object]) -> bool:
    try:
        ping()
    except (RedisError, PyMongoError):
        return False
    return True
