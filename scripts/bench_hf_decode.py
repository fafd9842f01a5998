#!/usr/bin/env python3
"""Time Hugging Face's cached generation per token, beside `reformer-bench decode`.

Run by hand, never by CI (it needs torch and transformers):

    /work/venv-hf/bin/python scripts/bench_hf_decode.py --out hf-decode.jsonl

For each layer stack (the config's own and every layer local, named by their layers) and
each prompt length, a random prompt runs through `ReformerModelWithLMHead` with
`use_cache=True`. After one untimed token, `--tokens` tokens are fed one at a time with
`past_buckets_states`, as `generate()` does, and the median time per token is reported. The
config, the maximum length (the smallest power of two not below the longest prompt plus the
new tokens, axial shape [a, max_len / a]) and the thread count are those of
`reformer-bench decode`, so the two tables line up.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import ReformerConfig, ReformerModelWithLMHead

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "assets" / "presets" / "bench-speed.json"

# Keys of our config files that ReformerConfig does not take.
OUR_ONLY_KEYS = {"chunk_size_feed_forward"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config JSON (ReformerConfig field names)")
    parser.add_argument("--prefixes", default="1024,8192,32768", help="prompt lengths, comma-separated")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated after each prompt")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", help="also write the results as JSON Lines to this file")
    args = parser.parse_args(argv)
    try:
        args.prefixes = [int(value) for value in args.prefixes.split(",")]
    except ValueError:
        parser.error(f"invalid --prefixes {args.prefixes!r}: give comma-separated positive integers")
    if not args.prefixes or min(args.prefixes) <= 0:
        parser.error(f"invalid --prefixes {args.prefixes}: give positive lengths")
    if args.tokens <= 0:
        parser.error(f"invalid --tokens {args.tokens}: generate at least one token")
    return args


def axial_rows(length):
    """Return the largest divisor of `length` not above its square root, as reformer-bench does."""
    for rows in range(math.isqrt(length), 0, -1):
        if length % rows == 0:
            return rows
    return 1


def build_config(path, attn_layers, max_len):
    fields = {key: value for key, value in json.loads(Path(path).read_text()).items() if key not in OUR_ONLY_KEYS}
    rows = axial_rows(max_len)
    fields.update(
        attn_layers=attn_layers,
        max_position_embeddings=max_len,
        axial_pos_shape=[rows, max_len // rows],
    )
    return ReformerConfig(**fields)


def measure(model, prefix, tokens, vocab_size):
    generator = torch.Generator().manual_seed(prefix)
    prompt = torch.randint(0, vocab_size, (1, prefix), generator=generator)
    with torch.no_grad():
        start = time.perf_counter()
        output = model(prompt, use_cache=True)
        prefill_seconds = time.perf_counter() - start
        cache = output.past_buckets_states
        # One untimed token first, as reformer-bench decode does.
        token = torch.randint(0, vocab_size, (1, 1), generator=generator)
        cache = model(token, past_buckets_states=cache, use_cache=True).past_buckets_states
        times = []
        for _ in range(tokens):
            token = torch.randint(0, vocab_size, (1, 1), generator=generator)
            start = time.perf_counter()
            output = model(token, past_buckets_states=cache, use_cache=True)
            times.append((time.perf_counter() - start) * 1e3)
            cache = output.past_buckets_states
    return prefill_seconds, statistics.median(times)


def main(argv):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    max_len = 1 << (max(args.prefixes) + 1 + args.tokens - 1).bit_length()
    base = json.loads(Path(args.config).read_text())
    layer_stacks = [base["attn_layers"], ["local"] * len(base["attn_layers"])]
    stacks = {"+".join(layers): layers for layers in layer_stacks}
    out = open(args.out, "w") if args.out else None
    print("| stack | prefix | prefill (s) | cached ms/token |")
    print("|---|---:|---:|---:|")
    for stack, attn_layers in stacks.items():
        config = build_config(args.config, attn_layers, max_len)
        model = ReformerModelWithLMHead(config).eval()
        for prefix in args.prefixes:
            prefill_seconds, ms_per_token = measure(model, prefix, args.tokens, config.vocab_size)
            print(f"| {stack} | {prefix} | {prefill_seconds:.2f} | {ms_per_token:.2f} |", flush=True)
            if out:
                record = {
                    "implementation": "huggingface",
                    "stack": stack,
                    "prefix": prefix,
                    "prefill_seconds": prefill_seconds,
                    "cached_ms_per_token": ms_per_token,
                    "threads": args.threads,
                    "torch": torch.__version__,
                }
                out.write(json.dumps(record) + "\n")
    if out:
        out.close()


if __name__ == "__main__":
    main(sys.argv[1:])
