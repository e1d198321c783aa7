"""GPU readiness: instructor-xl's encoder (T5-XL, from its config, random weights) in bf16.

Measures tokens/s and chunks/s for several micro-batch sizes and lengths, the
model FLOP utilisation against the GPU's peak, and projects the A10G cost per
million 256-token chunks from the FLOP ratio (same MFU assumed). Prints JSON.

    python tests/bench/gpu_t5.py            # on a GPU
    python tests/bench/gpu_t5.py --smoke    # a tiny config on CPU, to check the script runs
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import T5Config, T5EncoderModel

# hkunlp/instructor-xl: the GTR-T5-XL encoder (T5 v1.1 XL) and a 2048 -> 768 dense layer.
INSTRUCTOR_XL = {"d_model": 2048, "d_ff": 5120, "d_kv": 64, "num_heads": 32, "num_layers": 24,
                 "vocab_size": 32128, "feed_forward_proj": "gated-gelu"}
OUTPUT_DIM = 768
SMOKE = {"d_model": 128, "d_ff": 256, "d_kv": 32, "num_heads": 4, "num_layers": 2,
         "vocab_size": 32128, "feed_forward_proj": "gated-gelu"}
# Dense bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets. The A10G (a cloud
# variant of the A10, lower clocks) has no public data sheet: 70 is an assumption, see --a10g-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0}
A10G_PRICE_PER_HOUR = 1.10


def flops_per_token(cfg: dict, seq_len: int) -> float:
    """Forward FLOPs per token: projections, gated FFN, attention scores and values, output dense."""
    inner = cfg["num_heads"] * cfg["d_kv"]
    per_layer = 2 * (4 * cfg["d_model"] * inner) + 2 * (3 * cfg["d_model"] * cfg["d_ff"]) + 2 * 2 * seq_len * inner
    return cfg["num_layers"] * per_layer + 2 * cfg["d_model"] * OUTPUT_DIM / seq_len


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def measure(model: T5EncoderModel, device: str, batch: int, seq_len: int, repeats: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, attention_mask=mask)
        if device == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config, any device")
    parser.add_argument("--batches", default="16,32,64,128")
    parser.add_argument("--lengths", default="128,256,512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--a10g-tflops", type=float, default=PEAK_TFLOPS["A10G"], help="A10G peak for the projection")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = SMOKE if args.smoke else INSTRUCTOR_XL
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = T5EncoderModel(T5Config(**cfg)).to(device=device, dtype=dtype).eval()
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(gpu)

    rows = []
    for seq_len in (int(x) for x in args.lengths.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            try:
                seconds = measure(model, device, batch, seq_len, args.repeats)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({"batch": batch, "seq_len": seq_len, "oom": True})
                continue
            tokens_per_s = batch * seq_len / seconds
            achieved = tokens_per_s * flops_per_token(cfg, seq_len)
            rows.append({
                "batch": batch, "seq_len": seq_len, "seconds": round(seconds, 5),
                "tokens_per_s": round(tokens_per_s), "chunks_per_s": round(batch / seconds, 1),
                "tflops": round(achieved / 1e12, 2),
                "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
            })

    at_256 = [r for r in rows if r.get("seq_len") == 256 and not r.get("oom")]
    best = max(at_256, key=lambda r: r["tokens_per_s"]) if at_256 else None
    projection = None
    if best and best["mfu"]:
        # Same MFU on an A10G: its tokens/s scale with its peak.
        a10g_tokens_per_s = best["tokens_per_s"] * args.a10g_tflops / peak
        seconds_per_million = 1e6 * 256 / a10g_tokens_per_s
        projection = {
            "assumed_mfu": best["mfu"],
            "assumed_a10g_peak_tflops": args.a10g_tflops,
            "a10g_tokens_per_s": round(a10g_tokens_per_s),
            "a10g_chunks_per_s": round(a10g_tokens_per_s / 256, 1),
            "a10g_usd_per_million_256_token_chunks": round(seconds_per_million / 3600 * A10G_PRICE_PER_HOUR, 3),
        }
    print(json.dumps({
        "device": gpu, "dtype": str(dtype), "config": "smoke" if args.smoke else "instructor-xl (T5-XL encoder)",
        "parameters": sum(p.numel() for p in model.parameters()), "peak_tflops": peak,
        "rows": rows, "best_at_256": best, "a10g_projection": projection,
    }, indent=2))


if __name__ == "__main__":
    main()
