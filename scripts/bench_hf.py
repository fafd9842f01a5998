"""Measure Hugging Face Reformer training and inference speed on the CPU.

This is the PyTorch side of a side-by-side speed benchmark. The Rust side is
`reformer-bench speed`, which is meant to write records with the same JSON Lines fields.

Protocol, after the fixed-token speed plot of Figure 5 in Kitaev et al. (2020), "Reformer:
The Efficient Transformer": every step processes the same number of tokens, so the batch
size is `tokens_per_step // seq_len`. A length longer than `tokens_per_step` runs with
batch size 1. For every sequence length and mode:

1. A fresh child process builds `ReformerModelWithLMHead` from `--config`, with
   `max_position_embeddings = seq_len` and the axial shape from `axial_shape(seq_len)`.
   Weights are random (seed 0); nothing is downloaded.
2. The child draws random token ids (seed 1) and runs `--warmup` untimed steps, then
   `--repeats` timed steps.
   - train: the model is in training mode with the config's dropout. A step is forward
     with `labels = input_ids` (transformers shifts them for the causal loss),
     `loss.backward()` through transformers' reversible backward, one
     `torch.optim.Adam(lr=1e-4)` step and `zero_grad()`.
   - infer: `model.eval()` and one forward pass under `torch.no_grad()` that returns
     the logits.
3. The result is the median seconds per step, tokens per second
   (`batch * seq_len / median`) and the child's peak resident set size
   (`ru_maxrss`, which includes roughly 0.7 GiB for the interpreter, torch and
   transformers).

Before a length runs, `estimate_bytes` estimates its memory. If the estimate exceeds
`--max-memory-gib`, the length is recorded as "does not fit" and not run. A child that
runs past `--timeout-s` or fails is recorded with that status, and the next length runs.

Run it by hand from the repository root. CI never runs it, because it needs torch and
transformers and takes minutes to hours:

    /work/venv-hf/bin/python scripts/bench_hf.py \\
        --config assets/presets/bench-speed.json --out bench-results/hf.jsonl

Linux only: the memory limit default reads /proc/meminfo, and `ru_maxrss` is read in KiB.
"""

import argparse
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import time

IMPLEMENTATION = "hf-pytorch"
MODES = ("train", "infer")
GIB = 1024**3

# Peak RSS of a child before it builds the model: the interpreter plus torch and
# transformers (measured at about 0.7 GiB with torch 2.15 and transformers 5.25).
BASELINE_BYTES = int(0.75 * GIB)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="model config JSON with ReformerConfig field names")
    parser.add_argument(
        "--lengths",
        default="1024,4096,16384,65536",
        help="comma-separated sequence lengths in tokens, each a power of two",
    )
    parser.add_argument(
        "--tokens-per-step",
        type=int,
        default=32768,
        help="tokens per step, which divided by the sequence length gives the batch size",
    )
    parser.add_argument(
        "--mode",
        default="train,infer",
        help="comma-separated modes to measure: train, infer or both",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed steps, whose median is reported"
    )
    parser.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="skip a run whose memory estimate exceeds this many GiB "
        "(default: 80%% of MemTotal in /proc/meminfo)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=1800.0,
        help="wall-clock limit in seconds for one (length, mode) child process",
    )
    parser.add_argument(
        "--out", help="write one JSON Lines record per (mode, length) to this file, replacing it"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        return args
    if args.config is None:
        parser.error("--config is required")

    try:
        args.lengths = [int(text) for text in args.lengths.split(",") if text.strip()]
    except ValueError:
        parser.error(f"--lengths {args.lengths!r} must be comma-separated integers")
    if not args.lengths:
        parser.error("--lengths is empty")
    for seq_len in args.lengths:
        if seq_len <= 0 or seq_len & (seq_len - 1) != 0:
            parser.error(
                f"--lengths: {seq_len} is not a power of two; use lengths like 1024 or 4096"
            )

    if args.tokens_per_step <= 0:
        parser.error(f"--tokens-per-step must be positive, not {args.tokens_per_step}")
    for seq_len in args.lengths:
        # A length above tokens_per_step runs with batch size 1 and must be a multiple of it.
        if args.tokens_per_step % seq_len != 0 and seq_len % args.tokens_per_step != 0:
            parser.error(
                f"--tokens-per-step {args.tokens_per_step} and length {seq_len} do not divide "
                "one another; use a power of two"
            )

    args.modes = [text.strip() for text in args.mode.split(",") if text.strip()]
    unknown_modes = [mode for mode in args.modes if mode not in MODES]
    if unknown_modes or not args.modes:
        parser.error(f"--mode {args.mode!r} is invalid; use train, infer or train,infer")

    if args.threads <= 0:
        parser.error(f"--threads must be positive, not {args.threads}")
    if args.warmup < 0:
        parser.error(f"--warmup must not be negative, not {args.warmup}")
    if args.repeats <= 0:
        parser.error(f"--repeats must be positive, not {args.repeats}")
    if args.timeout_s <= 0:
        parser.error(f"--timeout-s must be positive, not {args.timeout_s}")
    if args.max_memory_gib is None:
        args.max_memory_gib = default_memory_limit_gib(parser)
    return args


def default_memory_limit_gib(parser):
    """Return 80% of MemTotal from /proc/meminfo, in GiB."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return 0.8 * int(line.split()[1]) * 1024 / GIB
    except OSError as error:
        parser.error(f"cannot read /proc/meminfo ({error}); pass --max-memory-gib")
    parser.error("MemTotal is missing from /proc/meminfo; pass --max-memory-gib")


def axial_shape(seq_len):
    """Return the axial position shape [a, b] used for `seq_len` tokens.

    The rule, shared with the Rust benchmark: `a` is the largest power of two with
    `a * a <= seq_len`, and `b = seq_len // a`, so `a * b == seq_len` and `b` is `a` or
    `2 * a`. For example 1024 gives [32, 32] and 2048 gives [32, 64]. Raises
    `ValueError` unless `seq_len` is a power of two.
    """
    if seq_len <= 0 or seq_len & (seq_len - 1) != 0:
        raise ValueError(f"sequence length {seq_len} is not a power of two")
    exponent = seq_len.bit_length() - 1
    a = 1 << (exponent // 2)
    return [a, seq_len // a]


def load_config_fields(path):
    """Read a JSON model config and split it into ReformerConfig fields and unknown keys."""
    from transformers import ReformerConfig

    with open(path) as file:
        fields = json.load(file)
    accepted_keys = set(inspect.signature(ReformerConfig.__init__).parameters) - {"self"}
    dropped = sorted(key for key in fields if key not in accepted_keys)
    accepted = {key: value for key, value in fields.items() if key in accepted_keys}
    return accepted, dropped


def fields_for_length(fields, seq_len):
    """Return a copy of `fields` set up for `seq_len` tokens (positions and axial shape)."""
    fields = dict(fields)
    fields["max_position_embeddings"] = seq_len
    fields["axial_pos_shape"] = axial_shape(seq_len)
    return fields


def count_parameters(config):
    """Count the parameters of ReformerModelWithLMHead, building it on the meta device."""
    import torch
    from transformers import ReformerModelWithLMHead

    with torch.device("meta"):
        model = ReformerModelWithLMHead(config)
    return sum(parameter.numel() for parameter in model.parameters())


def attention_scores_per_token(config):
    """Return the largest per-query count of attention scores over all layers."""
    largest = 0
    for kind in config.attn_layers:
        if kind == "lsh":
            chunks = 1 + config.lsh_num_chunks_before + config.lsh_num_chunks_after
            scores = config.num_hashes * chunks * config.lsh_attn_chunk_length
        else:
            chunks = 1 + config.local_num_chunks_before + config.local_num_chunks_after
            scores = chunks * config.local_attn_chunk_length
        largest = max(largest, config.num_attention_heads * scores)
    return largest


def estimate_bytes(config, mode, tokens, parameters):
    """Estimate the peak resident memory of one child process, in bytes.

    An estimate, not a bound. With T = batch * seq_len tokens and float32 (4 bytes):

        train: baseline + 16 * parameters + 4 * T * (3 * vocab + 24 * hidden + 4 * d_ff + 4 * S)
        infer: baseline +  4 * parameters + 4 * T * (2 * vocab +  8 * hidden + 1 * d_ff + 3 * S)

    `S` is the largest number of attention scores per query in any layer (heads times
    window, times hash rounds for LSH). The reversible layers keep no per-layer
    activations, so the layer count does not appear. In training the vocabulary term
    covers the logits, the cross-entropy's log-softmax and the logits' gradient, and
    16 bytes per parameter cover weights, gradients and Adam's two moments. The other
    coefficients were fitted to one measurement: 2 layers (lsh, local), hidden 256, d_ff
    512, vocab 258, S = 512 and T = 32768 peaked at 2.03 GiB in training (estimate 2.11)
    and 1.21 to 1.25 GiB in inference (estimate 1.31), with torch 2.15 and transformers
    5.25. `benchmark` scales later estimates up when a measurement exceeds its estimate.
    """
    vocab = config.vocab_size
    hidden = config.hidden_size
    feed_forward = config.feed_forward_size
    scores = attention_scores_per_token(config)
    if mode == "train":
        per_token = 3 * vocab + 24 * hidden + 4 * feed_forward + 4 * scores
        parameter_bytes = 16 * parameters
    else:
        per_token = 2 * vocab + 8 * hidden + feed_forward + 3 * scores
        parameter_bytes = 4 * parameters
    return BASELINE_BYTES + parameter_bytes + 4 * tokens * per_token


def run_child(request):
    """Build the model, time its steps and return the measurements (runs in the child)."""
    import resource

    import torch
    import transformers
    from transformers import ReformerConfig, ReformerModelWithLMHead
    from transformers.models.reformer import modeling_reformer

    torch.set_num_threads(request["threads"])
    torch.set_num_interop_threads(1)
    transformers.logging.set_verbosity_error()

    torch.manual_seed(0)
    config = ReformerConfig(**request["fields"])
    model = ReformerModelWithLMHead(config)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(
        0, config.vocab_size, (request["batch_size"], request["seq_len"]), generator=generator
    )

    # Count calls of the reversible per-layer backward, to confirm that training used it.
    backward_calls = 0
    original_backward_pass = modeling_reformer.ReformerLayer.backward_pass

    def counting_backward_pass(self, *args, **kwargs):
        nonlocal backward_calls
        backward_calls += 1
        return original_backward_pass(self, *args, **kwargs)

    modeling_reformer.ReformerLayer.backward_pass = counting_backward_pass

    if request["mode"] == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            # The bucket cache serves only incremental decoding, so it stays off.
            loss = model(input_ids, labels=input_ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(input_ids, use_cache=False).logits

    for _ in range(request["warmup"]):
        step()
    durations = []
    for _ in range(request["repeats"]):
        start = time.perf_counter()
        step()
        durations.append(time.perf_counter() - start)

    if request["mode"] == "train":
        expected_calls = config.num_hidden_layers * (request["warmup"] + request["repeats"])
        if backward_calls != expected_calls:
            raise RuntimeError(
                f"reversible backward ran {backward_calls} layer passes, expected {expected_calls}"
            )

    return {
        "seconds_per_step": statistics.median(durations),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "num_buckets": config.num_buckets,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def launch_child(request, timeout_s):
    """Run one (length, mode) in a child process.

    Returns the child's measurements (None unless it succeeded) and the status string.
    """
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(request)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, "timeout"

    if completed.returncode != 0:
        error_lines = completed.stderr.strip().splitlines()
        sys.stderr.write(completed.stderr)
        if completed.returncode < 0:
            reason = f"killed by signal {-completed.returncode}"
        else:
            reason = f"exit status {completed.returncode}"
        last_line = error_lines[-1] if error_lines else "no output on stderr"
        return None, f"error: {reason}: {last_line}"

    output_lines = completed.stdout.strip().splitlines()
    try:
        return json.loads(output_lines[-1]), "ok"
    except (IndexError, json.JSONDecodeError):
        return None, f"error: child printed no JSON result: {completed.stdout[-200:]!r}"


def format_number(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(records):
    header = (
        f"{'mode':<6} {'seq_len':>8} {'batch':>6} {'s/step':>10} {'tokens/s':>10} "
        f"{'ms/token':>9} {'peak MiB':>9} {'est GiB':>8}  status"
    )
    print(header)
    print("-" * len(header))
    for record in records:
        print(
            f"{record['mode']:<6} {record['seq_len']:>8} {record['batch_size']:>6} "
            f"{format_number(record['seconds_per_step'], '.3f'):>10} "
            f"{format_number(record['tokens_per_second'], '.0f'):>10} "
            f"{format_number(record['ms_per_token'], '.4f'):>9} "
            f"{format_number(record['peak_rss_mib'], '.0f'):>9} "
            f"{format_number(record['estimate_gib'], '.2f'):>8}  {record['status']}"
        )


def benchmark(args):
    """Run every (mode, length) pair and return one record per pair."""
    import torch
    import transformers
    from transformers import ReformerConfig

    fields, dropped = load_config_fields(args.config)
    if dropped:
        print(
            f"{args.config}: ignoring keys ReformerConfig does not accept: {', '.join(dropped)}",
            file=sys.stderr,
        )

    # transformers pads an eval input but rejects a training input whose length is not a
    # multiple of the chunk lengths of the attention kinds the layers use.
    base_config = ReformerConfig(**fields)
    chunk_lengths = []
    if "lsh" in base_config.attn_layers:
        chunk_lengths.append(base_config.lsh_attn_chunk_length)
    if "local" in base_config.attn_layers:
        chunk_lengths.append(base_config.local_attn_chunk_length)
    chunk_multiple = math.lcm(*chunk_lengths)
    for seq_len in args.lengths:
        if seq_len % chunk_multiple != 0:
            sys.exit(
                f"length {seq_len} is not a multiple of {chunk_multiple}, the least common "
                "multiple of the chunk lengths"
            )

    records = []
    # Ratio of measured to estimated peak per mode, which only ever scales estimates up.
    estimate_scale = {mode: 1.0 for mode in args.modes}
    for seq_len in args.lengths:
        batch_size = max(1, args.tokens_per_step // seq_len)
        tokens = batch_size * seq_len
        length_fields = fields_for_length(fields, seq_len)
        try:
            config = ReformerConfig(**length_fields)
            parameters = count_parameters(config)
        except ValueError as error:
            sys.exit(f"{args.config}: invalid for transformers at length {seq_len}: {error}")
        for mode in args.modes:
            estimate = estimate_bytes(config, mode, tokens, parameters) * estimate_scale[mode]
            record = {
                "implementation": IMPLEMENTATION,
                "mode": mode,
                "seq_len": seq_len,
                "batch_size": batch_size,
                "seconds_per_step": None,
                "tokens_per_second": None,
                "ms_per_token": None,
                "peak_rss_mib": None,
                "status": "ok",
                "estimate_gib": round(estimate / GIB, 3),
                "threads": args.threads,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
            print(
                f"{mode} seq_len={seq_len} batch={batch_size} "
                f"axial_pos_shape={length_fields['axial_pos_shape']} "
                f"estimate={estimate / GIB:.2f} GiB ...",
                file=sys.stderr,
                flush=True,
            )

            if estimate > args.max_memory_gib * GIB:
                record["status"] = "does not fit"
            else:
                request = {
                    "fields": length_fields,
                    "mode": mode,
                    "seq_len": seq_len,
                    "batch_size": batch_size,
                    "threads": args.threads,
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                }
                measured, record["status"] = launch_child(request, args.timeout_s)
                if measured is not None:
                    seconds = measured["seconds_per_step"]
                    record["seconds_per_step"] = seconds
                    record["tokens_per_second"] = tokens / seconds
                    record["ms_per_token"] = 1000 * seconds / tokens
                    record["peak_rss_mib"] = measured["peak_rss_mib"]
                    peak_bytes = measured["peak_rss_mib"] * 1024**2
                    measured_scale = estimate_scale[mode] * peak_bytes / estimate
                    estimate_scale[mode] = max(estimate_scale[mode], measured_scale)
                    print(f"  num_buckets={measured['num_buckets']}", file=sys.stderr)

            print(f"  status: {record['status']}", file=sys.stderr, flush=True)
            records.append(record)
            if args.out:
                with open(args.out, "a") as out:
                    out.write(json.dumps(record) + "\n")
    return records


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    if args.out:
        # Empty the file now, because each record is appended as soon as it is measured.
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        open(args.out, "w").close()
    records = benchmark(args)
    print_table(records)


if __name__ == "__main__":
    main()
