"""The read side's commands: search, index, export, delete, storage."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from config.errors import ConfigError
from config.settings import Settings
from producer.models import escape_controls
from worker.cli.console import clock, count, print_json, without_progress_bars


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
    without_progress_bars()
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
        print_json({"query": args.query, "engine": searcher.engine.name, "hybrid": hybrid,
                     "model": searcher.spec.model, "vector_key": searcher.spec.key, "k": args.k,
                     "hits": [h.to_dict() for h in hits]})
        return 0
    mode = f"{searcher.engine.name}{' + BM25' if hybrid else ''}"
    print(f"{len(hits)} chunks for {args.query!r} ({mode} search, {searcher.spec.model})")
    for rank, hit in enumerate(hits, 1):
        where = f"{hit.podcast or '-'} / {hit.episode_id} {clock(hit.start)}-{clock(hit.end)}"
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
        print_json(definition)
        return 0
    outcome = create_index(db, definition)
    print(f"search index {definition['name']!r} {outcome} on {db.name}.embeddings; Atlas builds it in the "
          f"background, and podembed search uses it once it is queryable")
    return 0


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo
    from worker.read.catalog import Selection, export_vectors

    selection = Selection(args.podcast, args.episode, args.model or settings.model)
    result = export_vectors(reach_mongo(settings), selection, args.format, args.out, sys.stdout.buffer)
    summary = (f"exported {count(result.vectors, 'vector')} of {count(result.episodes, 'episode')} of "
               f"{selection.describe()}"
               f"{f' to {result.out}' if result.out else ''}")
    if args.json and result.out:
        print_json(asdict(result))
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
        print_json(asdict(result))
    else:
        verb = "would delete" if result.dry_run else "deleted"
        episodes = (f"episode {result.episodes[0]!r}" if len(result.episodes) == 1 else
                    count(len(result.episodes), "episode") + (f" ({_listed(result.episodes)})" if result.episodes
                                                               else ""))
        show = "no podcast" if selection.podcast is None else f"podcast {selection.podcast!r}"
        print(escape_controls(
            f"{verb} {count(result.vectors, 'vector')} and {count(result.chunks, 'chunk text')} of {episodes} of "
            f"{show}, {count(result.cached_rows, 'search-cache row')}; "
            f"{count(result.watermark_entries, 'watermark entry')} {'would go' if result.dry_run else 'gone'} "
            "(the ledger keeps its batches)"))
    return 0


def cmd_storage(settings: Settings, args: argparse.Namespace) -> int:
    from producer.connections import reach_mongo
    from producer.enqueue import vector_spec
    from worker.storage import PROJECT_CHUNKS, storage_report

    spec = vector_spec(settings)
    report = storage_report(reach_mongo(settings), spec.key, spec.dtype, chunks=tuple(args.chunks or PROJECT_CHUNKS),
                            dims=args.dims)
    if args.json:
        print_json(asdict(report))
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


def _listed(names: list[str], at_most: int = 10) -> str:
    """Names, comma-separated, the first `at_most` of them."""
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more

