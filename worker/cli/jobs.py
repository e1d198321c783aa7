"""The job commands: ingest, nightly, backfill, status (and its --watch), jobs, retry, cancel."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from config.closest import no_such
from config.errors import ConfigError, PodembedError, QueueError, SelectionError
from config.settings import Settings
from producer.models import escape_controls
from worker.cli.console import EXIT_ERROR, count, error, print_json

if TYPE_CHECKING:
    from producer.enqueue import EnqueuedJob
    from producer.job_status import JobStatus
    from producer.jobs import JobRecords
    from producer.models import Episode


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
        error(f"refused {message}")
    if not job.episodes:
        raise PodembedError(f"nothing to ingest: {len(refused)} file(s) refused, none accepted")
    if args.json:
        print_json({"job_id": job.job_id, "episodes": job.episodes, "chunks": job.chunks, "batches": job.batches,
                     "tokens": job.tokens, "skipped": job.skipped, "resumed_from": job.resumed_from,
                     "refused": refused})
    else:
        of_podcast = "" if args.podcast is None else f" of podcast {args.podcast!r}"  # as given: --podcast assigns
        print(f"job {job.job_id}: {count(job.episodes, 'episode')}{of_podcast}, {count(job.chunks, 'chunk')} "
              f"({job.skipped} already embedded), {count(job.batches, 'batch')}, {count(job.tokens, 'token')}")
        if job.resumed_from:
            resumed_jobs = " ".join(sorted(set(job.resumed.values())))
            print(f"resumed: the {count(len(job.resumed), 'episode')} that job(s) {resumed_jobs} had enqueued are "
                  "left to them")
        if refused:
            print(f"{count(len(refused), 'file')} refused (see above)")
    return EXIT_ERROR if refused else 0


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
        print_json(status.to_dict())
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
        error(f"refused {message}")
    if args.json:
        print_json(run.to_dict())
    elif run.job_id:
        print(f"job {run.job_id}: {count(run.episodes, 'new or changed episode')} ({run.unchanged} unchanged), "
              f"{count(run.chunks, 'chunk')}, {count(run.batches, 'batch')}, {count(run.tokens, 'token')}")
    else:
        print(f"nothing new in {run.source} since the last run ({count(run.unchanged, 'episode')} unchanged)")
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
        error(f"refused {message}")
    for episode_id in run.not_found:
        error(no_such("episode", episode_id, known.episode_ids, f"among those selected from {args.source}"))
    if run.not_found and len(run.not_found) == len(selection.episode_ids):
        raise SelectionError(f"none of the {count(len(run.not_found), 'episode')} given with --episodes was found "
                             f"in {args.source}")
    if args.json:
        print_json(run.to_dict())
        return EXIT_ERROR if run.refused else 0
    # --podcast selects a show of MongoDB `transcripts`, or a folder of --source DIR: the output says which.
    of_podcast = "" if args.podcast is None else f" of podcast {args.podcast!r}" + (
        "" if args.source == MONGO else f" (the folder {Path(args.source) / args.podcast})")
    counts = (f"{count(run.episodes, 'episode')}{of_podcast}, {count(run.chunks, 'chunk')} "
              f"({run.already_embedded} already embedded, left out), {count(run.batches, 'batch')}, "
              f"{count(run.tokens, 'token')}")
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
    from producer.job_status import JobState
    from producer.jobs import JobRecords

    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    statuses = JobRecords(reach_redis(settings), reach_mongo(settings), settings.result_ttl).recent(args.limit)
    if args.json:
        print_json([s.to_dict() for s in statuses])
        return 0
    width = max(map(len, JobState))  # the state column: its longest state
    print(f"{'job':<12}  {'kind':<8}  {'state':<{width}}  {'created':<25}  {'chunks done':>13}  {'failed':>6}  "
          f"{'cancelled':>9}  {'cost':<9}  queue")
    for s in statuses:
        # Done is embedded or already there (skipped); failed and cancelled chunks are counted apart.
        done = f"{s.chunks.embedded + s.chunks.skipped}/{s.chunks.total}"
        cost = f"${s.cost_usd:.4f}"
        print(f"{s.job_id:<12}  {s.kind:<8}  {s.state:<{width}}  {s.created_at:<25}  {done:>13}  "
              f"{s.chunks.failed:>6}  {s.chunks.cancelled:>9}  {cost:<9}  {s.queue or '-'}")
    return 0


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo, reach_redis
    from producer.job_status import JobState
    from producer.operations import retry

    result = retry(settings, reach_redis(settings), reach_mongo(settings), args.job_id)
    if args.json:
        print_json(asdict(result))
    elif result.state is JobState.CANCELLED:
        print(f"job {result.job_id}: cancelled, nothing to retry")
    else:
        print(f"job {result.job_id}: {count(len(result.requeued), 'failed batch')} requeued; now {result.state}")
        if result.deleted:
            print(f"{count(len(result.deleted), 'failed batch')} deleted outside podembed cannot be requeued (their "
                  "chunk ids went with them): run the same ingest, nightly or backfill again to embed what they held")
    return 0


def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo, reach_redis
    from producer.operations import cancel

    result = cancel(settings, reach_redis(settings), reach_mongo(settings), args.job_id)
    if args.json:
        print_json(asdict(result))
    else:
        print(f"job {result.job_id}: {count(len(result.removed), 'queued batch')} removed; now {result.state}")
    return 0


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
    error(note)
    return status


def _progress_line(status: JobStatus, done: int, rate: float) -> str:
    total, pending = status.chunks.total, status.chunks.pending - status.chunks.in_progress
    width = 30
    filled = width * done // total if total else width
    eta = str(timedelta(seconds=round(pending / rate))) if rate > 0 and pending else "-"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} chunks  {rate:.1f} chunks/s  ETA {eta}  "
            f"${status.cost_usd:.4f}  {status.state}")

