"""The benchmark scripts still run (smoke sizes); their figures come from `make bench` and a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bson.binary import Binary
from pymongo.database import Database

from config.settings import Settings
from producer.enqueue import parse_files
from tests.bench.corpus import seenunseen_titles
from tests.conftest import DATA, EXAMPLES, ROOT


def test_gpu_script_runs_in_smoke_mode() -> None:
    out = subprocess.run(
        [sys.executable, "tests/bench/gpu_t5.py", "--smoke", "--batches", "2,4", "--lengths", "32,256",
         "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    report = json.loads(out.stdout)
    assert [(r["batch"], r["seq_len"]) for r in report["rows"]] == [(2, 32), (4, 32), (2, 256), (4, 256)]
    assert all(r["tokens_per_s"] > 0 and r["chunks_per_s"] > 0 for r in report["rows"])
    assert report["best_at_256"]["seq_len"] == 256


def test_t5_xl_flop_count_matches_its_parameters() -> None:
    sys.path.insert(0, str(ROOT / "tests" / "bench"))
    from gpu_t5 import INSTRUCTOR_XL, flops_per_token

    # Encoder weights outside the embedding: 24 x (4 x 2048 x 2048 + 3 x 2048 x 5120) = 1.16e9;
    # a forward pass costs about 2 FLOPs per weight per token, plus attention.
    weights = 24 * (4 * 2048 * 2048 + 3 * 2048 * 5120)
    assert 2 * weights < flops_per_token(INSTRUCTOR_XL, 256) < 2 * weights * 1.1


def test_eval_runs_from_the_vendored_corpus() -> None:
    out = subprocess.run(
        [sys.executable, "tests/bench/eval.py", "--episodes", "E01-E02", "--scale", "1500", "--scan-queries", "40"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )
    report = json.loads(out.stdout)
    titles = sum(bool(t["title"].strip()) for n in (1, 2)
                 for t in json.loads((seenunseen_titles() / f"E0{n}_titles.json").read_text()))
    assert (report["episodes"], report["queries"], report["chunk_tokens"]) == ("E01-E02", titles, 256)
    for figures in (report["bm25"], *report["search (query instruction '')"].values()):
        assert 0 < figures["recall@1"] <= figures["recall@5"] <= figures["recall@10"] <= 1
    forms = report["dtypes"]
    assert list(forms) == ["float32", "int8", "binary", "binary_rescored"]
    for figures in forms.values():
        assert 0 < figures["recall_at_1"] <= figures["recall_at_5"] <= figures["recall_at_10"] <= 1
        assert 0 < figures["mrr"] <= 1 and figures["scan_queries_per_s"] > 0
    # int8 holds a byte a dimension, packed bits one bit: a quarter and a 32nd of the float32 cache.
    assert forms["float32"]["cache_bytes"] == 4 * forms["int8"]["cache_bytes"] == 32 * forms["binary"]["cache_bytes"]
    assert forms["int8"]["recall_at_5"] >= forms["float32"]["recall_at_5"] - 0.01
    scan = report["exact_scan"]
    assert (scan["engine"], scan["vectors"], scan["vector_hits_per_query"], scan["hybrid_hits_per_query"]) == (
        "exact", 1500, 10, 10)
    assert set(scan["refresh_milliseconds"]) == {"with_token", "without_token"}
    assert scan["http_one_query_milliseconds"]["vector"] > 0 and scan["http_one_query_milliseconds"]["hybrid"] > 0


def test_fleet_drains_a_backlog_with_two_stand_in_drains_through_a_kill(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """`make fleet`'s code at N = 2: a real backlog, the real drains with the stand-in model, one drain
    SIGKILLed and replaced, an ingest job enqueued mid-run; every chunk one vector, every batch one entry."""
    from tests.bench.fleet import DIM, STAND_IN_DEVICE, run_fleet, unit_vector

    settings = settings.replace(batch_max_chunks=2, heartbeat_interval=1, maintenance_interval=1)
    backlog, _ = parse_files([EXAMPLES / "E01.vtt", EXAMPLES / "E05.vtt", EXAMPLES / "E06.json"])
    extra, _ = parse_files([DATA / "E03.srt"])
    report = run_fleet(settings, 2, backlog, seconds_per_token=2e-3, work=tmp_path, extra=extra, kill=1,
                       timeout=300)

    assert report["n"] == 2 and report["batches"] >= 8 and report["window_batches"] >= 1
    assert report["batches_per_s"] > 0 and report["redis_commands_per_batch"] > 0
    assert report["mongo_ops_per_batch"] > 0 and report["mongo_bytes_per_batch"] > 0
    faults = report["faults"]
    assert (faults["killed"], faults["lost"], faults["duplicated"], faults["ledger_missing"],
            faults["ledger_duplicated"], faults["counters_add_up"]) == (1, 0, 0, 0, 0, True)
    # It held a batch or two (one on the model, one fetched ahead): taken again once their beats lapsed.
    assert faults["held_by_killed"] >= 1 and faults["recovered_s"] > 0
    priority = report["priority"]
    assert priority["ingest_batches"] >= 1 and 0 <= priority["advanced"] <= priority["bound"] == 2 * (1 + 3)
    # Every chunk of both jobs has its vector (and its claim check was consumed): the stand-in's unit vector
    # of its text, on the stand-in device.
    assert db.embeddings.count_documents({}) > report["chunks"] and db.chunks.count_documents({}) == 0
    doc = db.embeddings.find_one({})
    assert doc["dim"] == DIM
    assert Binary(doc["embedding"], 9).as_vector().data == pytest.approx(unit_vector(doc["text"], DIM).tolist())
    assert {e["device"] for e in db.batches.find({}, {"device": 1})} == {STAND_IN_DEVICE}
