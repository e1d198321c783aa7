"""The commands that run and deploy the drain: services, work, migrate, launch, costs, doctor."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from config.settings import Settings, redact_url
from worker.cli.console import EXIT_ERROR, clock, print_json, without_progress_bars


def cmd_work(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo, reach_redis
    from worker.loop import run_worker

    redis = reach_redis(settings)
    reach_mongo(settings).client.close()  # the worker opens its own; this one only checked it answers
    without_progress_bars()
    share = "strict priority" if settings.backfill_share is None else f"backfill share {settings.backfill_share}"
    print(f"worker on {redact_url(settings.redis_url)} queues {', '.join(settings.queue_names())} (in this order, "
          f"{share}), model {settings.model}", file=sys.stderr)
    run_worker(settings, burst=args.burst, redis=redis)
    return 0


def cmd_services(settings: Settings, args: argparse.Namespace) -> int:
    from config.services import services_down, services_status, services_up

    action = {"up": services_up, "down": services_down, "status": services_status}[args.action]
    states = action(settings)
    if args.json:
        print_json([asdict(state) for state in states])
        return 0
    for state in states:
        # `down` stops only what `up` started: one that still answers was started otherwise.
        print(state.line() + (", left running" if args.action == "down" and state.answering else ""))
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo
    from worker.migration import migrate_ids

    result = migrate_ids(reach_mongo(settings))
    if args.json:
        print_json(asdict(result))
    else:
        print(f"{result.moved} of {result.examined} vector documents and {result.chunks_moved} of "
              f"{result.chunks_examined} chunks moved to their current ids; {result.watermark_entries} watermark "
              "entries given their current key")
    return 0


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
                f"about {clock(plan.first_clear_s)} with {plan.running + plan.cold + plan.drains} container(s)"
            print(f"highest-priority backlog: queue {plan.first_queue}, clears in {clears} (cold starts not counted)")
        if b.retries_later:
            print(f"{b.retries_later} retries wait out their back-off (the first in {b.next_retry_in_s:.0f} s): "
                  f"the deployed launcher spawns for them every {on_modal.launcher_period_s} s")
        print(f"{plan.drains} drain(s) of up to {plan.drain_budget_s:.0f} s to spawn on {on_modal.gpu} "
              f"({plan.running} worker(s) already on the queue, {plan.cold} spawned and not started yet, "
              f"at most {plan.max_containers} containers)")
    calls = [] if args.dry_run else launch(plan, remote_spawner(on_modal), SpawnLedger(redis, settings.queue_name))
    if args.json:
        print_json({**plan.to_dict(), "dry_run": args.dry_run, "calls": calls})
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
            print_json(check.to_dict())
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
            print_json(cost.to_dict())
            return 0
        print(f"job {cost.job_id}: {cost.batches} batches, busy {cost.busy_seconds:.2f} GPU-s "
              f"(${cost.busy_usd:.6f}); share of billed {cost.billed_seconds:.2f} s (${cost.billed_usd:.6f}); "
              f"busy/billed {cost.busy_share:.0%}")
        if cost.unaccounted_busy_seconds:
            print(f"{cost.unaccounted_busy_seconds:.2f} busy s ran on workers with no billing record (local workers)")
        return 0
    rows = measured_costs(db, heartbeat_interval=settings.heartbeat_interval)
    if args.json:
        print_json([r.to_dict() for r in rows])
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
        print_json([c.to_dict() for c in checks])
    else:
        for check in checks:
            print(check.line())
    return EXIT_ERROR if failed(checks) else 0

