"""`podembed`: the command line. The only place that turns errors into exit codes.

This module holds the parser and `main`; the commands live by group in `jobs` (ingest, nightly,
backfill, status, jobs, retry, cancel), `drain` (services, work, migrate, launch, costs, doctor),
`read` (search, index, export, delete, storage) and `serve`, and share `console`'s output helpers.

Commands that do not embed never import torch: every command imports what it needs when it runs,
and `work` imports the worker loop only then.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from config.errors import EnqueueInterrupted, JobNotFoundError, PodembedError
from config.settings import Settings
from worker.cli.console import EXIT_BROKEN_PIPE, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NOT_FOUND, error
from worker.cli.drain import cmd_costs, cmd_doctor, cmd_launch, cmd_migrate, cmd_services, cmd_work
from worker.cli.jobs import cmd_backfill, cmd_cancel, cmd_ingest, cmd_jobs, cmd_nightly, cmd_retry, cmd_status
from worker.cli.read import cmd_delete, cmd_export, cmd_index, cmd_search, cmd_storage
from worker.cli.serve import cmd_serve


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO if args.command == "work" else
                        logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.verbose < 2:  # pymongo logs every command and reply as JSON at DEBUG: `-vv` shows them
        logging.getLogger("pymongo").setLevel(logging.WARNING)
    if not args.verbose:
        logging.getLogger("rq.worker").addFilter(_without_rq_traceback)
    try:
        settings = Settings.from_env()
        if getattr(args, "notify", None) is not None:
            settings = settings.replace(notify_url=args.notify)
        code = args.handler(settings, args)
        sys.stdout.flush()  # a reader that went away shows here, while we can still exit quietly
        return code
    except JobNotFoundError as exc:
        error(str(exc))
        return EXIT_NOT_FOUND
    except EnqueueInterrupted as exc:
        error(str(exc))
        return EXIT_INTERRUPTED
    except PodembedError as exc:
        error(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `podembed jobs | head -3`: stop quietly, as Unix tools do; the interpreter's last flush
        # must not find the closed pipe either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())
        return EXIT_BROKEN_PIPE


def _without_rq_traceback(record: logging.LogRecord) -> bool:
    """Drop rq's traceback of a failed batch: our failure callback has logged it in one line (`-v` keeps it)."""
    return not str(record.msg).startswith("Worker %s: job %s: exception raised while executing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="podembed", description="Batch embedding of podcast transcripts.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="debug logging on stderr (-vv: pymongo's too)")
    parser.add_argument("--version", action="version", version=f"podembed {_version()}")
    # `-v` after the subcommand too; SUPPRESS keeps one given before it.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                         help="debug logging on stderr (-vv: pymongo's too)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable[[Settings, argparse.Namespace], int], help_: str):
        p = sub.add_parser(name, help=help_, description=help_, parents=[verbose])
        p.set_defaults(handler=handler)
        return p

    p = command("services", cmd_services, "start, stop or show the local Redis and MongoDB-compatible server")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("ingest", cmd_ingest, "parse, chunk and enqueue transcript files; prints the job id")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="transcript files or directories")
    p.add_argument("--podcast", help="name of the show these files belong to; episodes are identified within "
                                     "it (backfill --podcast selects by it)")
    p.add_argument("--episode-id", help="the episode's id, for a single file (default: the file name's stem)")
    p.add_argument("--instruction", help="instruction for this job (default: PODEMBED_INSTRUCTION)")
    _notify_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("work", cmd_work, "run a local worker; the model is loaded once")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")

    p = command("status", cmd_status, "show a job's status by its id")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.add_argument("--watch", action="store_true", help="draw a progress bar on stderr until the job ends")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --watch (default 1)")

    p = command("nightly", cmd_nightly, "enqueue the transcripts that are new or changed since the last run")
    p.add_argument("--source", default="mongo", help="a directory of transcript files, or 'mongo' for the "
                                                     "transcripts collection (default)")
    _notify_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("backfill", cmd_backfill, "embed stored transcripts again, or under another model or instruction")
    p.add_argument("--source", default="mongo", help="a directory of transcript files, or 'mongo' (default)")
    p.add_argument("--since", type=_date, help="published on or after this day (YYYY-MM-DD)")
    p.add_argument("--until", type=_date, help="published on or before this day (YYYY-MM-DD)")
    p.add_argument("--podcast", help="only this show: with --source DIR, the files in its folder of this name "
                                     "(ingest --podcast names the show instead)")
    p.add_argument("--episodes", nargs="+", metavar="EPISODE_ID", help="only these episodes")
    p.add_argument("--model", help="embed with this model (default: PODEMBED_MODEL)")
    p.add_argument("--instruction", help="embed with this instruction (default: PODEMBED_INSTRUCTION)")
    p.add_argument("--force", action="store_true", help="embed chunks again even where their vector is stored")
    p.add_argument("--dry-run", action="store_true", help="enqueue nothing; print the chunks and estimated cost")
    _notify_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("jobs", cmd_jobs, "list recent jobs, newest first")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    p.add_argument("--json", action="store_true", help="print a JSON list of status documents")

    p = command("retry", cmd_retry, "requeue a job's failed batches")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("cancel", cmd_cancel, "remove a job's queued batches (running ones finish)")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("migrate", cmd_migrate, "move vectors stored under ids of an older layout to the current ids")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("export", cmd_export, "write a podcast's (or an episode's) stored vectors as JSONL or Parquet")
    p.add_argument("--podcast", required=True, help="the show, as named at ingest")
    p.add_argument("--episode", help="only this episode id")
    p.add_argument("--model", help="vectors of this model (default: PODEMBED_MODEL)")
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="jsonl (default) or parquet "
                   "(needs pyarrow: pip install 'podembed[parquet]')")
    p.add_argument("--out", type=Path, help="file to write (default for jsonl: stdout)")
    p.add_argument("--json", action="store_true", help="with --out: print one JSON document")

    p = command("delete", cmd_delete, "delete a podcast's (or an episode's) vectors, chunk texts and search-cache "
                "rows; a later nightly embeds it again")
    show = p.add_mutually_exclusive_group(required=True)
    show.add_argument("--podcast", help="the show, as named at ingest")
    show.add_argument("--no-podcast", action="store_true", help="the episodes ingested without a podcast")
    p.add_argument("--episode", help="only this episode id")
    p.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("serve", cmd_serve, "run the HTTP API (needs PODEMBED_API_TOKEN)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--insecure-loopback", action="store_true",
                   help="serve without a token; only on a loopback address")

    p = command("search", cmd_search, "find the stored chunks closest to a query")
    p.add_argument("query", nargs="?", help="what to look for (or --queries FILE)")
    p.add_argument("--queries", type=Path, metavar="FILE",
                   help="one query per line; prints one JSON line per query")
    p.add_argument("-k", type=int, default=10, help="how many chunks per query (default 10)")
    p.add_argument("--podcast", help="only this show")
    p.add_argument("--episode", help="only this episode id")
    p.add_argument("--hybrid", action=argparse.BooleanOptionalAction,
                   help="fuse the vector ranking with BM25's (default: PODEMBED_SEARCH_HYBRID; "
                        "unset: on the exact scan, not on Atlas)")
    p.add_argument("--model", help="search the vectors of this model (default: PODEMBED_MODEL)")
    p.add_argument("--instruction", help="search the vectors embedded with this instruction "
                                         "(default: PODEMBED_INSTRUCTION)")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("index", cmd_index, "create the Atlas Vector Search index for the stored vectors")
    p.add_argument("--print", action="store_true", help="print the definition; create nothing")
    p.add_argument("--model", help="vectors of this model (default: PODEMBED_MODEL)")
    p.add_argument("--instruction", help="vectors embedded with this instruction (default: PODEMBED_INSTRUCTION)")
    p.add_argument("--quantization", choices=("none", "scalar", "binary"), default="none",
                   help="Atlas's automatic quantization of float32 vectors in the index: scalar needs about a "
                        "quarter of the RAM, binary about a 24th (default: none)")

    p = command("storage", cmd_storage, "what MongoDB keeps per embedded chunk, and what N chunks would take on "
                                        "disk and in Atlas Vector Search index RAM")
    p.add_argument("--chunks", type=_positive_int, action="append", metavar="N",
                   help="project for N chunks (repeatable; default 1M, 14M and 100M)")
    p.add_argument("--dims", type=_positive_int, help="recompute the vector bytes for this many dimensions "
                                                      "(default: those stored)")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("launch", cmd_launch, "spawn on Modal the GPU drains the queued backlog needs")
    p.add_argument("--dry-run", action="store_true", help="print the plan; spawn nothing (no Modal credentials needed)")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("costs", cmd_costs, "measured cost per GPU and model, busy vs billed, as the README's Markdown "
                                    "table; or one job's share")
    p.add_argument("job_id", nargs="?", help="a job: its compute and its share of the containers' billed time")
    p.add_argument("--reconcile", action="store_true",
                   help="compare the billed figure with the Modal workspace's billing report (needs credentials)")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("doctor", cmd_doctor, "check what a deploy depends on: Redis, MongoDB, the model, torch and the GPU")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def _notify_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--notify", metavar="URL", help="POST the job's status document, signed, to this http(s) URL "
                                                   "when it ends (default: PODEMBED_NOTIFY_URL)")


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD)") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _version() -> str:
    try:
        return version("podembed")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"
