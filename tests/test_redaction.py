"""Passwords never show: in any URL form redis-py and pymongo accept, in settings, messages and CLI output."""

from __future__ import annotations

import string
from collections.abc import Callable
from subprocess import CompletedProcess
from urllib.parse import quote, quote_plus

from hypothesis import assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from config.settings import Settings, redact_url
from tests.conftest import EXAMPLES
from tests.soak.harness import run_cli, worker_env

# Any printable character, space included; long enough not to occur by chance in the rest of a line.
PASSWORDS = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ", min_size=8, max_size=40)

# Every place a password goes in the URLs the two clients take: userinfo (raw where the client reads
# it raw, percent-quoted where it must be), and the query parameters redis-py and pymongo read.
FORMS = [
    "redis://default:{raw}@127.0.0.1:6379/0",
    "redis://:{raw}@127.0.0.1:6379/0",
    "redis://default:{quoted}@127.0.0.1:6379/0",
    "rediss://default:{quoted}@redis.example.com:6380/2?ssl_cert_reqs=none",
    "unix://default:{quoted}@/run/redis/redis.sock?db=0",
    "redis://127.0.0.1:6379/0?password={quoted}",
    "redis://127.0.0.1:6379/0?db=1&password={raw}",
    "redis://127.0.0.1:6379/0?pass={quoted}&db=1",
    "mongodb://admin:{plus}@127.0.0.1:27017/",
    "mongodb://admin:{quoted}@h1.example.com:27017,h2.example.com:27018/podembed?authSource=admin",
    "mongodb+srv://admin:{plus}@cluster0.example.mongodb.net/podembed?retryWrites=true&w=majority",
    "mongodb://admin:{raw}@127.0.0.1:27017/?authSource=admin",
    "mongodb://127.0.0.1:27017/?token={quoted}&secret={quoted}",
]

# How URLs appear in messages and log lines.
LINES = ["{url}", "cannot connect to {url}: Connection refused", "PODEMBED_REDIS_URL='{url}' is invalid",
         "{url}\n{url} (retrying)", "a: {url} b: {url}"]


@hypothesis_settings(max_examples=300, deadline=None)
@given(password=PASSWORDS, form=st.sampled_from(FORMS))
def test_no_password_survives_redaction_in_any_url_form(password: str, form: str) -> None:
    url = form.format(raw=password, quoted=quote(password, safe=""), plus=quote_plus(password))
    spelled = {password, quote(password, safe=""), quote_plus(password)}
    bare = form.format(raw="", quoted="", plus="")
    # The password must not be spelled out by the rest of the URL already.
    assume(not any(s in bare for s in spelled))
    # A raw '&' or '#' would end a query value for the client too: it reads another password.
    assume("password={raw}" not in form or not set("&#") & set(password))
    for line in LINES:
        # The password must not be spelled out by the rest of the line either.
        assume(not any(s in line.format(url=bare) for s in spelled))
        text = line.format(url=url)
        shown = redact_url(text)
        assert not any(s in shown for s in spelled), (text, shown)
        assert "***" in shown
    # A library's message quoting a piece of the URL is scrubbed of it too.
    assert password not in redact_url(f"Port could not be cast to integer value as {password!r}", url)


def test_redaction_keeps_what_is_not_secret() -> None:
    assert redact_url("redis://default:S3cret@127.0.0.1:6379/0") == "redis://default:***@127.0.0.1:6379/0"
    assert redact_url("redis://127.0.0.1:6395/0?db=1&password=S3cretPW&x=2") == \
        "redis://127.0.0.1:6395/0?db=1&password=***&x=2"
    assert redact_url("mongodb://admin:M0ngo/PW@h:1/db?authSource=admin") == "mongodb://admin:***@h:1/db?authSource=admin"
    assert redact_url("redis://127.0.0.1:6379/0 is down") == "redis://127.0.0.1:6379/0 is down"
    assert Settings(redis_url="redis://u:a b@h:1/0").redacted()["redis_url"] == "redis://u:***@h:1/0"


def test_the_reported_leaks_stay_out_of_real_cli_output(
    settings: Settings, cli_in_process: Callable[..., CompletedProcess]
) -> None:
    """The forms that once came out whole: a query password, '/' in passwords, a space in a password."""
    port = settings.redis_url.rsplit(":", 1)[1]
    secrets = ["S3cretPW-q", "S3cret/PW-r", "M0ngo/PW-m", "with space-s"]
    urls = {
        "query": (f"redis://127.0.0.1:{port}/0?password={secrets[0]}", settings.mongo_uri),
        "slash": (f"redis://default:{secrets[1]}@127.0.0.1:{port}/0", settings.mongo_uri),
        "mongo slash": (settings.redis_url, f"mongodb://admin:{secrets[2]}@127.0.0.1:{port}/"),
        "space": (f"redis://default:{secrets[3]}@127.0.0.1:{port}/0", settings.mongo_uri),
    }
    outputs = []
    # The first form in processes of their own, as a person runs them; the others in this one.
    for n, (redis_url, mongo_uri) in enumerate(urls.values()):
        env = worker_env(redis_url, mongo_uri, settings.mongo_db, mongo_timeout_ms=300)
        for args in (["ingest", str(EXAMPLES / "E05.vtt"), "--json"], ["status", "0123456789ab", "--json"],
                     ["services", "status"]):
            done = (run_cli if n == 0 else cli_in_process)(env, *args)
            outputs.append(done.stdout + done.stderr)
    # This Redis has no password: over RESP2 (podembed's default) it refuses one, in one line that hides it.
    done = run_cli(worker_env(*urls["query"], settings.mongo_db, mongo_timeout_ms=300), "work", "--burst")
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 1 and "password=*** refused the credentials (AUTH" in done.stderr
    # The banner of `work` shows the Redis URL: a query password and a space in a password. Over RESP3
    # (`protocol=3` in the URL) this Redis takes any password, so the worker starts (here, on the model
    # this process holds).
    for key, protocol in (("query", "&protocol=3"), ("space", "?protocol=3")):
        redis_url, mongo_uri = urls[key]
        env = worker_env(redis_url + protocol, mongo_uri, settings.mongo_db, mongo_timeout_ms=300)
        done = cli_in_process(env, "work", "--burst")
        outputs.append(done.stdout + done.stderr)
        assert "worker on redis://" in done.stderr
    for output in outputs:
        for secret in secrets:
            assert secret not in output and secret.split("/")[0] not in output, (secret, output)
