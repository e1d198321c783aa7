"""`podembed`: the command line. The only place that turns errors into exit codes.

Commands that do not embed never import torch: `work` imports the worker loop
only when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from config.errors import ConfigError, JobNotFoundError, PodembedError
from config.settings import Settings, redact_url

EXIT_ERROR = 1
EXIT_NOT_FOUND = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO if args.command == "work" else
                        logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = Settings.from_env()
        return args.handler(settings, args)
    except JobNotFoundError as exc:
        _error(str(exc))
        return EXIT_NOT_FOUND
    except PodembedError as exc:
        _error(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="podembed", description="Batch embedding of podcast transcripts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable[[Settings, argparse.Namespace], int], help_: str):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    p = command("services", cmd_services, "start, stop or show the local Redis and MongoDB-compatible server")
    p.add_argument("action", choices=["up", "down", "status"])

    p = command("ingest", cmd_ingest, "parse, chunk and enqueue transcript files; prints the job id")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="transcript files or directories")
    p.add_argument("--podcast", help="name of the show")
    p.add_argument("--instruction", help="instruction for this job (default: PODEMBED_INSTRUCTION)")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command("work", cmd_work, "run a local worker; the model is loaded once")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")

    p = command("status", cmd_status, "show a job's status by its id")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    return parser


def cmd_services(settings: Settings, args: argparse.Namespace) -> int:
    from config.services import services_down, services_status, services_up

    action = {"up": services_up, "down": services_down, "status": services_status}[args.action]
    for state in action(settings):
        print(state.line())
    return 0


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import mongo_database, redis_client
    from producer.enqueue import ingest, parse_files

    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise ConfigError(f"no such file or directory: {', '.join(missing)}")
    episodes, refused = parse_files(args.paths, podcast=args.podcast)
    for message in refused:
        _error(f"refused {message}")
    if not episodes:
        raise PodembedError(f"nothing to ingest: {len(refused)} file(s) refused, none accepted")
    job = ingest(settings, redis_client(settings), mongo_database(settings), episodes, kind="ingest",
                 instruction=args.instruction)
    if args.json:
        _print_json({"job_id": job.job_id, "episodes": job.episodes, "chunks": job.chunks, "batches": job.batches,
                     "tokens": job.tokens, "refused": refused})
    else:
        print(f"job {job.job_id}: {job.episodes} episodes, {job.chunks} chunks, {job.batches} batches, "
              f"{job.tokens} tokens")
        if refused:
            print(f"{len(refused)} file(s) refused (see above)")
    return EXIT_ERROR if refused else 0


def cmd_work(settings: Settings, args: argparse.Namespace) -> int:
    from worker.loop import run_worker

    print(f"worker on {redact_url(settings.redis_url)} queue {settings.queue_name!r}, model {settings.model}",
          file=sys.stderr)
    run_worker(settings, burst=args.burst)
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import mongo_database, redis_client
    from producer.jobs import JobRecords

    status = JobRecords(redis_client(settings), mongo_database(settings), settings.result_ttl).status(args.job_id)
    if args.json:
        _print_json(status.to_dict())
        return 0
    c, b = status.chunks, status.batches
    rows = [
        ("job", f"{status.job_id} ({status.kind})"),
        ("state", status.state),
        ("created", status.created_at),
        ("finished", status.finished_at or "-"),
        ("model", status.model),
        ("episodes", str(status.episodes)),
        ("chunks", f"{c.total} total: {c.embedded} embedded, {c.skipped} skipped, {c.failed} failed, "
                   f"{c.pending} pending"),
        ("batches", f"{b.total} total: {b.queued} queued, {b.running} running, {b.finished} finished, "
                    f"{b.failed} failed"),
        ("compute", f"{status.gpu_seconds:.2f} s on {status.device or '-'}"),
        ("cost", f"${status.cost_usd:.6f}"),
    ]
    rows += [(f"error {batch}", reason) for batch, reason in status.errors.items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _print_json(doc: object) -> None:
    json.dump(doc, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _error(message: str) -> None:
    print(f"podembed: {redact_url(message)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
