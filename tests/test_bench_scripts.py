"""The benchmark scripts still run (smoke sizes); their figures come from `make bench` and a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.bench.corpus import seenunseen_titles
from tests.conftest import ROOT


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
        [sys.executable, "tests/bench/eval.py", "--episodes", "E01-E02", "--scale", "1500"],
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
