"""The webhook of a job's end: one POST of its status document, signed, from whichever process ends it.

A job asks for one with a notify URL (`--notify`, POST /jobs' `notify`, or `PODEMBED_NOTIFY_URL`), kept in
its Redis hash. The process that sees the job reach an ended state (the worker that counts its last batch or
fails it for good, the producer of a job with nothing left to embed, `cancel`) hands it to `job_ended`. The
delivery is claimed with one HSETNX on the job's hash, so whoever comes second sends nothing, and is sent on a
thread of its own (a worker's lanes never wait on a receiver), with a retry after each of
`PODEMBED_NOTIFY_RETRY_INTERVALS`. How it went is the status document's `notify`.

The receiver checks `X-Podembed-Signature: sha256=<hex>`, the HMAC-SHA256 of the raw body under
`PODEMBED_NOTIFY_SECRET`. Only http(s) URLs are taken, and none whose host resolves to a loopback, private
or otherwise non-public address unless `PODEMBED_NOTIFY_ALLOW_PRIVATE=1`: checked when the job is created
and again before each attempt, and redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from config.errors import NotifyError, PodembedError
from config.settings import Settings, redact_url
from producer import scripts
from producer.job_status import JobState, JobStatus
from producer.jobs import JobKeys, JobRecords

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Podembed-Signature"

# One thread sends every delivery of the process, in order. Its threads are joined at interpreter exit,
# so a CLI command or a burst worker that ends a job still delivers before the process is gone.
_sender: ThreadPoolExecutor | None = None
_sender_lock = threading.Lock()


def sign(body: bytes, secret: str) -> str:
    """The `X-Podembed-Signature` value of `body`: `sha256=` and the hex HMAC-SHA256 under `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_target(settings: Settings) -> None:
    """Refuse the settings' notify URL before a job is created with it: a NotifyError naming what is wrong."""
    if settings.notify_url is None:
        return
    if not settings.notify_secret:
        raise NotifyError("PODEMBED_NOTIFY_SECRET is not set: a notify URL needs it to sign what is sent there")
    check_url(settings.notify_url, allow_private=settings.notify_allow_private)


def check_url(url: str, *, allow_private: bool) -> None:
    """An http(s) URL whose host resolves to public addresses only (any, with `allow_private`)."""
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotifyError(f"notify URL {shown!r}: only http:// and https:// URLs with a host are allowed")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except ValueError as exc:
        raise NotifyError(f"notify URL {shown!r}: {exc}") from None
    except (OSError, UnicodeError) as exc:
        raise NotifyError(f"notify URL {shown!r}: cannot resolve {parts.hostname}: {exc}") from None
    if allow_private:
        return
    for info in found:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global:
            raise NotifyError(f"notify URL {shown!r}: {parts.hostname} resolves to {address}, not a public address "
                              "(PODEMBED_NOTIFY_ALLOW_PRIVATE=1 allows loopback and private ones)")


def job_ended(settings: Settings, records: JobRecords, status: JobStatus) -> None:
    """Send the job's end to its notify URL on the sending thread, if it ended and asked for one."""
    if status.notify is None or status.state not in JobState.ENDED:
        return
    global _sender
    with _sender_lock:
        if _sender is None:
            _sender = ThreadPoolExecutor(1, thread_name_prefix="notify")
        _sender.submit(_deliver_logged, settings, records, status.job_id)


def flush() -> None:
    """Wait until every delivery handed to the sending thread so far is done (retries included)."""
    with _sender_lock:
        waiting = _sender.submit(lambda: None) if _sender is not None else None
    if waiting is not None:
        waiting.result()


def deliver(settings: Settings, records: JobRecords, job_id: str) -> bool:
    """POST the ended job's status document to its notify URL, if this process claims the delivery.

    True if it was claimed here (sent or failed for good); its outcome is in the job's status.
    """
    status = records.status(job_id)
    if status.state not in JobState.ENDED:
        return False
    keys = JobKeys.of(job_id)
    hash_key = keys.record
    url = scripts.CLAIM_NOTIFY.run(records.redis, keys._asdict())
    if url is None:
        return False
    url = url.decode()
    body = json.dumps({k: v for k, v in status.to_dict().items() if k != "notify"}).encode()
    # Without the secret nothing can be signed: no attempt is worth making.
    error = _attempts(settings, records, hash_key, url, body) if settings.notify_secret else (
        "PODEMBED_NOTIFY_SECRET is not set on the process that ended the job: nothing was sent")
    if error is None:
        _record(records, hash_key, {"notify_state": "sent"}, clear_error=True)
        logger.info("job %s: its end (%s) was sent to %s", job_id, status.state, redact_url(url))
    else:
        _record(records, hash_key, {"notify_state": "failed", "notify_error": error})
        logger.error("job %s: its end was not delivered to %s: %s", job_id, redact_url(url), error)
    records.save(records.status(job_id))
    return True


def _attempts(settings: Settings, records: JobRecords, hash_key: str, url: str, body: bytes) -> str | None:
    """POST until one is taken or the retries are spent; the last error, or None once sent."""
    error = None
    for attempt, pause in enumerate((0, *settings.notify_retry_intervals), start=1):
        time.sleep(pause)
        try:
            _post(settings, url, body)
            error = None
        except NotifyError as exc:
            error = str(exc)
            logger.warning("%s: notify attempt %d to %s failed: %s", hash_key, attempt, redact_url(url), error)
        _record(records, hash_key, {"notify_attempts": str(attempt), "notify_error": error or ""})
        if error is None:
            return None
    return error


def _post(settings: Settings, url: str, body: bytes) -> None:
    assert settings.notify_secret is not None
    check_url(url, allow_private=settings.notify_allow_private)  # the name may resolve elsewhere by now
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", SIGNATURE_HEADER: sign(body, settings.notify_secret),
        "User-Agent": "podembed"})
    try:
        with _OPENER.open(request, timeout=settings.notify_timeout_s) as response:
            response.read(1024)
    except urllib.error.HTTPError as exc:
        raise NotifyError(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise NotifyError(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None


def _record(records: JobRecords, hash_key: str, fields: dict[str, str], *, clear_error: bool = False) -> None:
    try:
        with records.redis.pipeline() as pipe:
            pipe.hset(hash_key, mapping=fields)
            if clear_error:
                pipe.hdel(hash_key, "notify_error")
            pipe.execute()
    except RedisError as exc:
        logger.warning("notify: cannot record the delivery in %s: %s", hash_key, exc)


def _deliver_logged(settings: Settings, records: JobRecords, job_id: str) -> None:
    try:
        deliver(settings, records, job_id)
    except (PodembedError, RedisError) as exc:
        logger.error("job %s: its end was not delivered: %s", job_id, exc)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer like any other non-2xx: following it could lead to an address refused above."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


# No proxy from the environment either: the address checked is the address connected to.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
