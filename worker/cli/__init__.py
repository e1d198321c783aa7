"""`podembed`: the command line. The only place that turns errors into exit codes.

Commands that do not embed never import torch: `work` imports the worker loop
only when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import date, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from config.closest import no_such
from config.errors import (
    ConfigError,
    EnqueueInterrupted,
    JobNotFoundError,
    PodembedError,
    QueueError,
    SelectionError,
)
from config.settings import Settings, redact_url
from producer.models import escape_controls

if TYPE_CHECKING:
    from producer.enqueue import EnqueuedJob
    from producer.jobs import JobRecords, JobStatus
    from producer.models import Episode

EXIT_ERROR = 1
EXIT_NOT_FOUND = 2
# What a shell reports for a command ended by SIGPIPE: the reader of its output went away.
EXIT_BROKEN_PIPE = 141
# What a shell reports for a command ended by Ctrl-C (SIGINT).
EXIT_INTERRUPTED = 130
# The `jobs` table's state column: its longest state, `interrupted`.
STATE_WIDTH = 11


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
        _error(str(exc))
        return EXIT_NOT_FOUND
    except EnqueueInterrupted as exc:
        _error(str(exc))
        return EXIT_INTERRUPTED
    except PodembedError as exc:
        _error(str(exc))
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


def cmd_services(settings: Settings, args: argparse.Namespace) -> int:
    from config.services import services_down, services_status, services_up

    action = {"up": services_up, "down": services_down, "status": services_status}[args.action]
    states = action(settings)
    if args.json:
        _print_json([asdict(state) for state in states])
        return 0
    for state in states:
        # `down` stops only what `up` started: one that still answers was started otherwise.
        print(state.line() + (", left running" if args.action == "down" and state.answering else ""))
    return 0


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo, reach_redis
    from producer.enqueue import TRANSCRIPT_SUFFIXES, ingest, stream_files, transcript_files

    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise ConfigError(f"no such file or directory: {', '.join(missing)}")
    unknown = [str(p) for p in args.paths if p.is_file() and p.suffix.lower() not in TRANSCRIPT_SUFFIXES]
    if unknown:
        raise ConfigError(f"not a transcript file: {', '.join(unknown)} (podembed reads "
                          f"{', '.join(sorted(TRANSCRIPT_SUFFIXES))} files)")
    if args.episode_id is not None and (len(args.paths) != 1 or args.paths[0].is_dir() or not args.episode_id.strip()):
        raise ConfigError("--episode-id names the episode of a single file, not of several files or a directory")
    redis, db = reach_redis(settings), reach_mongo(settings)  # before a long parse, not after it
    refused: list[str] = []
    # Files are parsed as the job is enqueued, window by window: the first batches are on the queue early.
    episodes = stream_files(args.paths, refused, podcast=args.podcast, episode_id=args.episode_id)
    n_files = len(transcript_files(args.paths))

    def progress(job: EnqueuedJob, window: list[Episode]) -> None:
        _show_progress(job.episodes - 1, n_files, f"enqueued {window[-1].source}")

    # The same command run again after a crash resumes it (see README, Streaming and the claim check).
    run_key = "|".join(["ingest", str(args.podcast), str(args.episode_id), *(str(p.resolve()) for p in args.paths)])
    on_terminal = sys.stderr.isatty()
    job = ingest(settings, redis, db, episodes, kind="ingest", instruction=args.instruction, run_key=run_key,
                 on_window=progress if on_terminal else None)
    if on_terminal:
        sys.stderr.write("\r\x1b[K")
    for message in refused:
        _error(f"refused {message}")
    if not job.episodes:
        raise PodembedError(f"nothing to ingest: {len(refused)} file(s) refused, none accepted")
    if args.json:
        _print_json({"job_id": job.job_id, "episodes": job.episodes, "chunks": job.chunks, "batches": job.batches,
                     "tokens": job.tokens, "skipped": job.skipped, "resumed_from": job.resumed_from,
                     "refused": refused})
    else:
        of_podcast = "" if args.podcast is None else f" of podcast {args.podcast!r}"  # as given: --podcast assigns
        print(f"job {job.job_id}: {_count(job.episodes, 'episode')}{of_podcast}, {_count(job.chunks, 'chunk')} "
              f"({job.skipped} already embedded), {_count(job.batches, 'batch')}, {_count(job.tokens, 'token')}")
        if job.resumed_from:
            resumed_jobs = " ".join(sorted(set(job.resumed.values())))
            print(f"resumed: the {_count(len(job.resumed), 'episode')} that job(s) {resumed_jobs} had enqueued are "
                  "left to them")
        if refused:
            print(f"{_count(len(refused), 'file')} refused (see above)")
    return EXIT_ERROR if refused else 0


def cmd_work(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo, reach_redis
    from worker.loop import run_worker

    redis = reach_redis(settings)
    reach_mongo(settings).client.close()  # the worker opens its own; this one only checked it answers
    _without_progress_bars()
    share = "strict priority" if settings.backfill_share is None else f"backfill share {settings.backfill_share}"
    print(f"worker on {redact_url(settings.redis_url)} queues {', '.join(settings.queue_names())} (in this order, "
          f"{share}), model {settings.model}", file=sys.stderr)
    run_worker(settings, burst=args.burst, redis=redis)
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo, reach_redis, redis_client
    from producer.jobs import JobRecords

    db = reach_mongo(settings)
    try:
        records = JobRecords(reach_redis(settings), db, settings.result_ttl)
    except QueueError as down:
        status = _ended_status(JobRecords(redis_client(settings), db, settings.result_ttl), args.job_id, down)
    else:
        status = _watch(records, args.job_id, args.interval) if args.watch else records.status(args.job_id)
    if args.json:
        _print_json(status.to_dict())
        return 0
    c, b = status.chunks, status.batches
    rows = [
        ("job", f"{status.job_id} ({status.kind})"),
        ("queue", status.queue or "-"),
        ("state", status.state),
        ("created", status.created_at),
        ("finished", status.finished_at or "-"),
        ("model", status.model),
        ("episodes", str(status.episodes)),
        ("chunks", f"{c.total} total: {c.embedded} embedded, {c.skipped} skipped, {c.failed} failed, "
                   f"{c.cancelled} cancelled, {c.pending} pending"
                   + (f" ({c.in_progress} of them embedded so far)" if c.pending else "")),
        ("batches", f"{b.total} total: {b.queued} queued, {b.running} running, {b.finished} finished, "
                    f"{b.failed} failed, {b.cancelled} cancelled"),
        ("compute", f"{status.gpu_seconds:.2f} s on {status.device or '-'}"),
        ("cost", f"${status.cost_usd:.6f}"),
    ]
    rows += [(f"error {batch}", reason) for batch, reason in status.errors.items()]
    if status.notify:
        n = status.notify
        rows.append(("notify", f"{n.state} ({n.attempts} attempts) to {n.url}" + (f": {n.error}" if n.error else "")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {escape_controls(value)}")
    return 0


def cmd_nightly(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo, reach_redis
    from producer.operations import nightly
    from producer.sources import open_source

    db = reach_mongo(settings)
    run = nightly(settings, reach_redis(settings), db, open_source(args.source, db))
    for message in run.refused:
        _error(f"refused {message}")
    if args.json:
        _print_json(run.to_dict())
    elif run.job_id:
        print(f"job {run.job_id}: {_count(run.episodes, 'new or changed episode')} ({run.unchanged} unchanged), "
              f"{_count(run.chunks, 'chunk')}, {_count(run.batches, 'batch')}, {_count(run.tokens, 'token')}")
    else:
        print(f"nothing new in {run.source} since the last run ({_count(run.unchanged, 'episode')} unchanged)")
    return EXIT_ERROR if run.refused else 0


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo, reach_redis, redis_client
    from producer.operations import backfill
    from producer.sources import MONGO, EpisodeFilter, open_source

    if args.instruction is not None:
        settings = settings.replace(instruction=args.instruction)
    if (args.since or args.until) and args.source != "mongo":
        raise ConfigError("--since/--until select by publication date, which transcript files do not carry: "
                          "select a directory's episodes with --episodes or --podcast, or use --source mongo")
    db = reach_mongo(settings)
    selection = EpisodeFilter(since=args.since, until=args.until, podcast=args.podcast,
                              episode_ids=frozenset(args.episodes or ()))
    source = open_source(args.source, db)
    known = source.known()
    if not known.episode_ids and args.source == MONGO:
        raise SelectionError("MongoDB `transcripts` holds no transcript: `ingest` embeds files without storing them "
                             "there. To embed files again, give their directory: backfill --source DIR")
    if args.podcast is not None and args.podcast not in known.podcasts:
        where = ("in MongoDB `transcripts`" if args.source == MONGO else
                 f"in {args.source}: with --source DIR, a podcast is a folder of it")
        raise SelectionError(no_such("podcast", args.podcast, known.podcasts, where))
    # A dry run enqueues nothing: it needs no Redis.
    redis = redis_client(settings) if args.dry_run else reach_redis(settings)
    run = backfill(settings, redis, db, source, selection, model=args.model, force=args.force, dry_run=args.dry_run)
    for message in run.refused:
        _error(f"refused {message}")
    for episode_id in run.not_found:
        _error(no_such("episode", episode_id, known.episode_ids, f"among those selected from {args.source}"))
    if run.not_found and len(run.not_found) == len(selection.episode_ids):
        raise SelectionError(f"none of the {_count(len(run.not_found), 'episode')} given with --episodes was found "
                             f"in {args.source}")
    if args.json:
        _print_json(run.to_dict())
        return EXIT_ERROR if run.refused else 0
    # --podcast selects a show of MongoDB `transcripts`, or a folder of --source DIR: the output says which.
    of_podcast = "" if args.podcast is None else f" of podcast {args.podcast!r}" + (
        "" if args.source == MONGO else f" (the folder {Path(args.source) / args.podcast})")
    counts = (f"{_count(run.episodes, 'episode')}{of_podcast}, {_count(run.chunks, 'chunk')} "
              f"({run.already_embedded} already embedded, left out), {_count(run.batches, 'batch')}, "
              f"{_count(run.tokens, 'token')}")
    if run.estimate:
        e = run.estimate
        measured = (f"measured in the ledger on {e.device}" if e.estimate_from == "ledger" else
                    "the configured default: the ledger has no batch of this model")
        print(f"dry run, nothing enqueued: {counts}")
        print(f"estimate for {e.model}: {e.est_gpu_seconds:.1f} GPU-seconds, ${e.est_cost_usd:.4f}, "
              f"at {e.tokens_per_second:.0f} tokens/s ({measured})")
    elif run.job_id:
        print(f"job {run.job_id}: {counts}")
    else:
        print(f"nothing to backfill for {run.model}: {counts}")
    return EXIT_ERROR if run.refused else 0


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo, reach_redis
    from producer.jobs import JobRecords

    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    statuses = JobRecords(reach_redis(settings), reach_mongo(settings), settings.result_ttl).recent(args.limit)
    if args.json:
        _print_json([s.to_dict() for s in statuses])
        return 0
    print(f"{'job':<12}  {'kind':<8}  {'state':<{STATE_WIDTH}}  {'created':<25}  {'chunks done':>13}  {'failed':>6}  "
          f"{'cancelled':>9}  {'cost':<9}  queue")
    for s in statuses:
        # Done is embedded or already there (skipped); failed and cancelled chunks are counted apart.
        done = f"{s.chunks.embedded + s.chunks.skipped}/{s.chunks.total}"
        cost = f"${s.cost_usd:.4f}"
        print(f"{s.job_id:<12}  {s.kind:<8}  {s.state:<{STATE_WIDTH}}  {s.created_at:<25}  {done:>13}  "
              f"{s.chunks.failed:>6}  {s.chunks.cancelled:>9}  {cost:<9}  {s.queue or '-'}")
    return 0


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo, reach_redis
    from producer.operations import retry

    result = retry(settings, reach_redis(settings), reach_mongo(settings), args.job_id)
    if args.json:
        _print_json(asdict(result))
    elif result.state == "cancelled":
        print(f"job {result.job_id}: cancelled, nothing to retry")
    else:
        print(f"job {result.job_id}: {_count(len(result.requeued), 'failed batch')} requeued; now {result.state}")
        if result.deleted:
            print(f"{_count(len(result.deleted), 'failed batch')} deleted outside podembed cannot be requeued (their "
                  "chunk ids went with them): run the same ingest, nightly or backfill again to embed what they held")
    return 0


def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo, reach_redis
    from producer.operations import cancel

    result = cancel(settings, reach_redis(settings), reach_mongo(settings), args.job_id)
    if args.json:
        _print_json(asdict(result))
    else:
        print(f"job {result.job_id}: {_count(len(result.removed), 'queued batch')} removed; now {result.state}")
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo
    from worker.migration import migrate_ids

    result = migrate_ids(reach_mongo(settings))
    if args.json:
        _print_json(asdict(result))
    else:
        print(f"{result.moved} of {result.examined} vector documents and {result.chunks_moved} of "
              f"{result.chunks_examined} chunks moved to their current ids; {result.watermark_entries} watermark "
              "entries given their current key")
    return 0


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo
    from worker.read.catalog import Selection, export_vectors

    selection = Selection(args.podcast, args.episode, args.model or settings.model)
    result = export_vectors(reach_mongo(settings), selection, args.format, args.out, sys.stdout.buffer)
    summary = (f"exported {_count(result.vectors, 'vector')} of {_count(result.episodes, 'episode')} of "
               f"{selection.describe()}"
               f"{f' to {result.out}' if result.out else ''}")
    if args.json and result.out:
        _print_json(asdict(result))
    else:  # without --out the vectors are on stdout: the summary goes to stderr
        print(summary, file=sys.stdout if result.out else sys.stderr)
    return 0


def cmd_delete(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo
    from worker.read.catalog import Selection, delete_vectors, require_stored
    from worker.read.vector_cache import cache_paths

    db = reach_mongo(settings)
    selection = Selection(None if args.no_podcast else args.podcast, args.episode)
    caches = cache_paths(settings.data_dir, settings.mongo_uri, settings.mongo_db)
    result = delete_vectors(db, selection, search_caches=caches, dry_run=args.dry_run)
    if not result.episodes:  # nothing matched: say which name, and the closest stored ones
        require_stored(db, selection.podcast, selection.episode_id)
    if args.json:
        _print_json(asdict(result))
    else:
        verb = "would delete" if result.dry_run else "deleted"
        episodes = (f"episode {result.episodes[0]!r}" if len(result.episodes) == 1 else
                    _count(len(result.episodes), "episode") + (f" ({_listed(result.episodes)})" if result.episodes
                                                               else ""))
        show = "no podcast" if selection.podcast is None else f"podcast {selection.podcast!r}"
        print(escape_controls(
            f"{verb} {_count(result.vectors, 'vector')} and {_count(result.chunks, 'chunk text')} of {episodes} of "
            f"{show}, {_count(result.cached_rows, 'search-cache row')}; "
            f"{_count(result.watermark_entries, 'watermark entry')} {'would go' if result.dry_run else 'gone'} "
            "(the ledger keeps its batches)"))
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from config.services import LOOPBACK
    from producer.web.api import create_app

    open_access = not settings.api_token
    if open_access and not args.insecure_loopback:
        raise ConfigError("PODEMBED_API_TOKEN is not set: set it, or pass --insecure-loopback to serve "
                          "without a token on a loopback address")
    if open_access and args.host not in LOOPBACK:
        raise ConfigError(f"--insecure-loopback serves on a loopback address only, not on {args.host}")
    app = create_app(settings, open_access=open_access)
    print(f"podembed API on http://{args.host}:{args.port} (OpenAPI: /docs, /openapi.json)"
          f"{', no token: loopback only' if open_access else ''}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="debug" if args.verbose else "info")
    return 0


def cmd_search(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo
    from worker.read.catalog import require_stored
    from worker.read.search import Searcher

    if args.query is None and args.queries is None:
        raise ConfigError("no query: give one (podembed search \"what to find\"), or --queries FILE")
    if args.query is not None and args.queries is not None:
        raise ConfigError("give one query, or --queries FILE, not both")
    if args.queries is not None:
        try:
            queries = [line for line in args.queries.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --queries {args.queries}: {exc}") from None
    else:
        queries = [args.query]
    db = reach_mongo(settings)
    _without_progress_bars()
    searcher = Searcher(settings, db, model=args.model, instruction=args.instruction)
    hybrid = searcher.hybrid if args.hybrid is None else args.hybrid
    results = searcher.search(queries, args.k, podcast=args.podcast, episode_id=args.episode, hybrid=hybrid)
    if not any(results) and (args.podcast is not None or args.episode is not None):
        require_stored(db, args.podcast, args.episode)  # nothing found: a name that matches nothing is named
    if args.queries is not None:
        for query, hits in zip(queries, results, strict=True):
            print(json.dumps({"query": query, "engine": searcher.engine.name, "hybrid": hybrid,
                              "hits": [h.to_dict() for h in hits]}))
        return 0
    hits = results[0]
    if args.json:
        _print_json({"query": args.query, "engine": searcher.engine.name, "hybrid": hybrid,
                     "model": searcher.spec.model, "vector_key": searcher.spec.key, "k": args.k,
                     "hits": [h.to_dict() for h in hits]})
        return 0
    mode = f"{searcher.engine.name}{' + BM25' if hybrid else ''}"
    print(f"{len(hits)} chunks for {args.query!r} ({mode} search, {searcher.spec.model})")
    for rank, hit in enumerate(hits, 1):
        where = f"{hit.podcast or '-'} / {hit.episode_id} {_clock(hit.start)}-{_clock(hit.end)}"
        text = hit.text if len(hit.text) <= 200 else hit.text[:197] + "..."
        # Stored text is printed as text, never as the terminal escapes it may hold.
        print(f"{rank:>3}. {hit.score:.3f}  {escape_controls(where)}\n     {escape_controls(text)}")
    return 0


def cmd_index(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo
    from producer.enqueue import vector_spec
    from worker.read.search import create_index, index_definition

    if args.model and args.model != settings.model:
        settings = settings.replace(model=args.model, model_path=None)
    db = reach_mongo(settings)
    definition = index_definition(settings, db, vector_spec(settings, args.instruction), args.quantization)
    if args.print:
        _print_json(definition)
        return 0
    outcome = create_index(db, definition)
    print(f"search index {definition['name']!r} {outcome} on {db.name}.embeddings; Atlas builds it in the "
          f"background, and podembed search uses it once it is queryable")
    return 0


def cmd_storage(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo
    from producer.enqueue import vector_spec
    from worker.storage import PROJECT_CHUNKS, storage_report

    spec = vector_spec(settings)
    report = storage_report(reach_mongo(settings), spec.key, spec.dtype, chunks=tuple(args.chunks or PROJECT_CHUNKS),
                            dims=args.dims)
    if args.json:
        _print_json(asdict(report))
        return 0
    print(f"{report.embedded_chunks:,} embedded chunks, {report.dimensions}-d {report.dtype} vectors "
          f"(vector key {report.vector_key})")
    for name, value in report.bytes_per_embedded_chunk.items():
        print(f"  {name:<20} {value:>10,.0f} B per embedded chunk")
    ram_per_vector = report.index_ram_bytes_per_vector
    print("  index RAM per vector: " + ", ".join(f"{q} {b:,.0f} B" for q, b in ram_per_vector.items()))
    for row in report.projections:
        ram = ", ".join(f"{q} {row[f'index_ram_gb_{q}']:,.1f}" for q in report.index_ram_bytes_per_vector)
        print(f"  {row['chunks']:>13,} chunks: {row['disk_gb']:,.1f} GB on disk; index RAM GB: {ram}")
    for note in report.notes:
        print(f"  note: {note}")
    return 0


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600:d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def cmd_launch(settings: Settings, args: argparse.Namespace) -> int:
    from modal_jobs.launcher import launch, plan_launch, remote_spawner
    from modal_jobs.settings import ModalSettings
    from modal_jobs.spawns import SpawnLedger
    from producer.connections import reach_mongo, reach_redis

    on_modal = ModalSettings.from_env()
    redis = reach_redis(settings)
    plan = plan_launch(settings, on_modal, redis, reach_mongo(settings))
    if not args.json:
        t, b = plan.throughput, plan.backlog
        measured = (f"measured on {t.measured_batches} {on_modal.gpu} batches" if t.measured_batches else
                    f"PODEMBED_DEFAULT_TOKENS_PER_SECOND: no {on_modal.gpu} batch of {settings.model} in the ledger")
        print(f"backlog: {b.batches} batches ({b.queued} queued, {b.retries_due} retries due, {b.abandoned} "
              f"abandoned), {b.chunks} chunks, {b.tokens} tokens; {t.tokens_per_s:.0f} tokens/s per container "
              f"({measured})")
        for name, q in plan.queues.items():
            print(f"  queue {name}: {q.batches} batches ({q.queued} queued, {q.retries_due} retries due, "
                  f"{q.abandoned} abandoned), {q.tokens} tokens")
        if plan.first_queue is not None:
            clears = "never: no container" if plan.first_clear_s is None else \
                f"about {_clock(plan.first_clear_s)} with {plan.running + plan.cold + plan.drains} container(s)"
            print(f"highest-priority backlog: queue {plan.first_queue}, clears in {clears} (cold starts not counted)")
        if b.retries_later:
            print(f"{b.retries_later} retries wait out their back-off (the first in {b.next_retry_in_s:.0f} s): "
                  f"the deployed launcher spawns for them every {on_modal.launcher_period_s} s")
        print(f"{plan.drains} drain(s) of up to {plan.drain_budget_s:.0f} s to spawn on {on_modal.gpu} "
              f"({plan.running} worker(s) already on the queue, {plan.cold} spawned and not started yet, "
              f"at most {plan.max_containers} containers)")
    calls = [] if args.dry_run else launch(plan, remote_spawner(on_modal), SpawnLedger(redis, settings.queue_name))
    if args.json:
        _print_json({**plan.to_dict(), "dry_run": args.dry_run, "calls": calls})
    else:
        for call_id in calls:
            print(f"spawned {call_id}")
    return 0


def cmd_costs(settings: Settings, args: argparse.Namespace) -> int:
    from modal_jobs.costs import cost_table, job_cost, measured_costs, modal_billing_report, reconcile
    from modal_jobs.settings import ModalSettings
    from producer.connections import reach_mongo, reach_redis
    from producer.jobs import JobRecords

    db = reach_mongo(settings)
    if args.reconcile:
        check = reconcile(db, ModalSettings.from_env().app_name, modal_billing_report)
        if args.json:
            _print_json(check.to_dict())
            return 0
        print(f"{check.start:%Y-%m-%d %H:%M} to {check.end:%Y-%m-%d %H:%M} UTC, app {check.app}: "
              f"{check.containers} containers billed ${check.our_billed_usd:.4f} by our clock; Modal's report "
              f"${check.modal_usd:.4f} ({', '.join(f'{k} ${v:.4f}' for k, v in check.modal_by_resource.items())}); "
              f"difference ${check.difference_usd:+.4f}")
        return 0
    if args.job_id:
        records = JobRecords(reach_redis(settings), db, settings.result_ttl)
        records.status(args.job_id)  # an unknown job is an error (exit 2)
        cost = job_cost(db, args.job_id, records.batch_ids(args.job_id))
        if args.json:
            _print_json(cost.to_dict())
            return 0
        print(f"job {cost.job_id}: {cost.batches} batches, busy {cost.busy_seconds:.2f} GPU-s "
              f"(${cost.busy_usd:.6f}); share of billed {cost.billed_seconds:.2f} s (${cost.billed_usd:.6f}); "
              f"busy/billed {cost.busy_share:.0%}")
        if cost.unaccounted_busy_seconds:
            print(f"{cost.unaccounted_busy_seconds:.2f} busy s ran on workers with no billing record (local workers)")
        return 0
    rows = measured_costs(db, heartbeat_interval=settings.heartbeat_interval)
    if args.json:
        _print_json([r.to_dict() for r in rows])
    elif not rows:
        print("no measurements yet: MongoDB `workers` has no container (drain on Modal first)")
    else:
        print(cost_table(rows))
        for r in rows:
            if r.lost:
                print(f"{r.lost} {r.gpu} container(s) never recorded an exit: billed to their last heartbeat",
                      file=sys.stderr)
    return 0


def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    from worker.doctor import failed, run_checks

    checks = run_checks(settings)
    if args.json:
        _print_json([c.to_dict() for c in checks])
    else:
        for check in checks:
            print(check.line())
    return EXIT_ERROR if failed(checks) else 0


def _watch(records: JobRecords, job_id: str, interval: float) -> JobStatus:
    """Redraw one progress line on a terminal's stderr every `interval` seconds until the job ends;
    elsewhere (a file, a pipe) write a plain line each time the progress changes."""
    terminal = sys.stderr.isatty()
    began = time.monotonic()
    status = records.status(job_id)
    first = _done(status)
    shown = None
    while True:
        done = _done(status)
        elapsed = time.monotonic() - began
        rate = (done - first) / elapsed if elapsed > 0 else 0.0
        if terminal:
            sys.stderr.write(f"\r{_progress_line(status, done, rate)}\x1b[K")
        elif (done, status.state) != shown:
            sys.stderr.write(_progress_line(status, done, rate) + "\n")
            shown = (done, status.state)
        sys.stderr.flush()
        if status.ended:
            break
        time.sleep(interval)
        status = records.status(job_id)
    if terminal:
        sys.stderr.write("\n")
    return status


def _without_progress_bars() -> None:
    """No "Loading weights" bar from transformers (nor download bars) over a command's output or a worker's log."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _show_progress(done: int, total: int, what: str) -> None:
    """One line on a terminal's stderr, redrawn per file or episode: `[3/120] chunking E03.vtt`."""
    sys.stderr.write(f"\r[{done + 1}/{total}] {what}\x1b[K")
    sys.stderr.flush()


def _done(status: JobStatus) -> int:
    """Chunks counted, and those that running batches have embedded so far (they move within a batch)."""
    return status.chunks.total - status.chunks.pending + status.chunks.in_progress


def _ended_status(records: JobRecords, job_id: str, down: QueueError) -> JobStatus:
    """With Redis away, the status MongoDB `jobs` kept, if the job had ended (its counts no longer change)."""
    status, note = records.ended_status(job_id, down)
    _error(note)
    return status


def _progress_line(status: JobStatus, done: int, rate: float) -> str:
    total, pending = status.chunks.total, status.chunks.pending - status.chunks.in_progress
    width = 30
    filled = width * done // total if total else width
    eta = str(timedelta(seconds=round(pending / rate))) if rate > 0 and pending else "-"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} chunks  {rate:.1f} chunks/s  ETA {eta}  "
            f"${status.cost_usd:.4f}  {status.state}")


def _count(n: int, noun: str) -> str:
    """`1 batch`, `2 batches`: a count and its noun, singular or plural."""
    if n == 1:
        return f"{n} {noun}"
    if noun.endswith("y"):
        return f"{n} {noun[:-1]}ies"
    return f"{n} {noun}es" if noun.endswith(("ch", "s", "x")) else f"{n} {noun}s"


def _listed(names: list[str], at_most: int = 10) -> str:
    """Names, comma-separated, the first `at_most` of them."""
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


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


def _print_json(doc: object) -> None:
    json.dump(doc, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _error(message: str) -> None:
    over_progress = "\r\x1b[K" if sys.stderr.isatty() else ""  # on a terminal, over a progress line
    print(f"{over_progress}podembed: {escape_controls(redact_url(message))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
