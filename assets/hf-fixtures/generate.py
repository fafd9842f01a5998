#!/usr/bin/env python3
"""Generate Hugging Face Reformer reference fixtures for the Rust parity tests.

Run by hand from the repository root, never from CI:

    /work/venv-hf/bin/python assets/hf-fixtures/generate.py

Every case gets a folder next to this script. It contains a checkpoint written by
`save_pretrained`, the eval-mode outputs with the LSH rotations HF drew, and for some
cases one training-mode pass with its loss and selected gradients. All models are
small, built from configs with random weights, so nothing is downloaded. Every random
draw is seeded, so a rerun writes byte-identical files. README.md next to this script
describes the file formats.
"""

import os

# Refuse any Hugging Face Hub traffic: every model here is built from a config.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import sys

import torch
import transformers

REQUIRED_TORCH_VERSION = "2.15.0"
REQUIRED_TRANSFORMERS_VERSION = "5.25.0"

if not torch.__version__.startswith(REQUIRED_TORCH_VERSION):
    sys.exit(
        f"error: torch {REQUIRED_TORCH_VERSION} is required, found {torch.__version__}. "
        "Run this script with /work/venv-hf/bin/python or install the pinned version."
    )
if transformers.__version__ != REQUIRED_TRANSFORMERS_VERSION:
    sys.exit(
        f"error: transformers {REQUIRED_TRANSFORMERS_VERSION} is required, found "
        f"{transformers.__version__}. Run this script with /work/venv-hf/bin/python or "
        "install the pinned version."
    )

import dataclasses
import io
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable

import sentencepiece
from safetensors.torch import save_file
from transformers import (
    ReformerConfig,
    ReformerForMaskedLM,
    ReformerModel,
    ReformerModelWithLMHead,
)
from transformers.models.reformer.modeling_reformer import LSHSelfAttention

LOG = logging.getLogger("hf-fixtures")
FIXTURE_ROOT = Path(__file__).resolve().parent

# Standard deviation for the query, key, value and shared query-key projections. With
# LayerNorm outputs of unit scale and d_head = 16 this gives attention scores with a
# spread of several units, so the softmax is peaked instead of nearly uniform.
ATTENTION_PROJECTION_STD = 0.4

# Queries whose log-sum-exp lies below this value saw only copies of themselves, whose
# scores HF replaces by -1e5. Real scores in these models stay far above it.
SELF_ONLY_LSE_THRESHOLD = -5.0e4

TOLERANCE = {
    "logits": "max|diff| <= 1e-5 * max(1, max|reference|), over the whole tensor",
    "last_hidden_state": "max|diff| <= 1e-5 * max(1, max|reference|), over the whole tensor",
    "loss": "|diff| <= 1e-5 * max(1, |reference|)",
    "gradients": "max|diff| <= 1e-4 * max|reference|, for each gradient tensor",
    "rotations": "exact: they are HF's own draws, to be fed to the port",
    "buckets": "exact",
}

# Fields shared by every case. Dropout is 0 unless a case sets it, because the training
# pass must be deterministic. Eval-only cases set some dropout to show it has no effect.
BASE_CONFIG = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "attention_head_size": 16,
    "feed_forward_size": 64,
    "initializer_range": 0.2,
    "axial_norm_std": 0.5,
    "hidden_dropout_prob": 0.0,
    "local_attention_probs_dropout_prob": 0.0,
    "lsh_attention_probs_dropout_prob": 0.0,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "eos_token_id": 2,
}

# Prose written for these fixtures. It is the enwik8-style byte input and the
# training text for the small SentencePiece model.
SAMPLE_PROSE = [
    "The harbour town woke slowly under a grey sky. Fishermen carried their nets down "
    "to the water, and the baker opened his shutters to let the smell of bread drift "
    "along the street.",
    "A young clerk hurried past the market with a bundle of letters. He had promised to "
    "deliver them before the bell rang at noon, and he was already late.",
    "At the corner he met an old sailor who asked him for the time. The clerk did not "
    "stop, but he shouted the hour over his shoulder and ran on.",
    "By evening the wind had turned, the boats were back in the harbour, and the lamps "
    "along the quay were lit one by one. The clerk sat by the window and counted the "
    "letters he had not delivered.",
]
SENTENCEPIECE_SAMPLE = "The old clerk counted the boats in the harbour at noon."


@dataclasses.dataclass
class Case:
    """One fixture folder: a model config, its inputs and what the case covers."""

    name: str
    model_class: type
    description: str
    config: dict
    seed: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    num_hashes: int | None = None
    train_input_ids: torch.Tensor | None = None
    edit_weights: Callable[[torch.nn.Module], dict] | None = None
    extra_files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    extra_meta: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Capturing what the LSH layers draw


def bucket_ids_from_rotations(vectors, rotations, factors):
    """Compute per-round bucket ids [B, n, R, S] from raw qk vectors and rotations.

    This restates the hashing rule independently of HF so the captured rotations can be
    checked against the buckets HF returned.
    """
    projected = torch.einsum("bhsd,hdrk->bhrsk", vectors, rotations)
    bucket_ids = torch.zeros(projected.shape[:-1], dtype=torch.long)
    column = 0
    stride = 1
    for factor in factors:
        block = projected[..., column : column + factor // 2]
        choice = torch.argmax(torch.cat([block, -block], dim=-1), dim=-1)
        bucket_ids += stride * choice
        column += factor // 2
        stride *= factor
    return bucket_ids


class HashRecorder:
    """Record, per LSH layer, the rotations HF draws and the buckets and LSEs it gets.

    Inside the `with` block, `LSHSelfAttention._hash_vectors` and `_attend` are wrapped.
    The hashing wrapper replaces `torch.randn` for the duration of the one call, so the
    recorded tensor is exactly the one HF multiplies with. Buckets are stored per round
    without HF's round offsets, shape [B, n, R, S].
    """

    def __init__(self):
        self.rotations: dict[int, torch.Tensor] = {}
        self.buckets: dict[int, torch.Tensor] = {}
        self.bucket_info: dict[int, dict] = {}
        self.self_only_queries: dict[int, int] = {}
        self.min_lse: dict[int, float] = {}

    def __enter__(self):
        self._original_hash_vectors = LSHSelfAttention._hash_vectors
        self._original_attend = LSHSelfAttention._attend
        recorder = self

        def hash_vectors(layer, vectors, num_hashes, attention_mask, increase_num_buckets=False):
            return recorder._record_hash(layer, vectors, num_hashes, attention_mask, increase_num_buckets)

        def attend(layer, *args, **kwargs):
            return recorder._record_attend(layer, *args, **kwargs)

        LSHSelfAttention._hash_vectors = hash_vectors
        LSHSelfAttention._attend = attend
        return self

    def __exit__(self, *exc_info):
        LSHSelfAttention._hash_vectors = self._original_hash_vectors
        LSHSelfAttention._attend = self._original_attend
        return False

    def _record_hash(self, layer, vectors, num_hashes, attention_mask, increase_num_buckets):
        layer_index = layer.layer_idx
        if layer_index in self.rotations:
            raise RuntimeError(f"LSH layer {layer_index} hashed twice in one recorded pass")
        if increase_num_buckets:
            raise RuntimeError("unexpected increase_num_buckets=True: it is only set with a generation cache, which these passes do not use")

        draws = []
        original_randn = torch.randn

        def recording_randn(*args, **kwargs):
            tensor = original_randn(*args, **kwargs)
            draws.append(tensor.detach().clone())
            return tensor

        torch.randn = recording_randn
        try:
            offset_buckets = self._original_hash_vectors(layer, vectors, num_hashes, attention_mask)
        finally:
            torch.randn = original_randn
        if len(draws) != 1:
            raise RuntimeError(f"LSH layer {layer_index} drew {len(draws)} tensors, expected 1")
        rotations = draws[0]

        factors = [layer.num_buckets] if isinstance(layer.num_buckets, int) else list(layer.num_buckets)
        total_buckets = math.prod(factors)
        has_padding = attention_mask is not None and bool((attention_mask == 0).any())
        round_stride = total_buckets + 1 if has_padding else total_buckets

        batch_size, num_heads, sequence_length, _ = vectors.shape
        round_offsets = (torch.arange(num_hashes) * round_stride).view(1, 1, num_hashes, 1)
        buckets = offset_buckets.view(batch_size, num_heads, num_hashes, sequence_length) - round_offsets

        expected = bucket_ids_from_rotations(vectors.detach(), rotations, factors)
        if has_padding:
            is_token = attention_mask.bool()[:, None, None, :]
            expected = torch.where(is_token, expected, torch.full_like(expected, total_buckets))
        if not torch.equal(buckets, expected):
            raise RuntimeError(f"LSH layer {layer_index}: buckets recomputed from the rotations differ from HF's")

        self.rotations[layer_index] = rotations
        self.buckets[layer_index] = buckets.clone()
        self.bucket_info[layer_index] = {
            "num_buckets": layer.num_buckets,
            "rotation_shape": list(rotations.shape),
            "pad_bucket": total_buckets if has_padding else None,
            "round_stride": round_stride,
        }
        return offset_buckets

    def _record_attend(self, layer, *args, **kwargs):
        out_vectors, lse, attention_probs = self._original_attend(layer, *args, **kwargs)
        layer_index = layer.layer_idx
        lse_values = lse.detach()
        self.self_only_queries[layer_index] = int((lse_values < SELF_ONLY_LSE_THRESHOLD).sum())
        self.min_lse[layer_index] = float(lse_values.min())
        return out_vectors, lse, attention_probs


class RotationReplay:
    """Make each LSH layer use given rotations in place of a fresh `torch.randn` draw.

    `run_eval` uses this to rerun the forward pass with the recorded rotations and a
    different global seed. Identical outputs show that the recorded rotations are the
    only random input of the pass.
    """

    def __init__(self, rotations: dict[int, torch.Tensor]):
        self.rotations = rotations

    def __enter__(self):
        self._original_hash_vectors = LSHSelfAttention._hash_vectors
        replay = self

        def hash_vectors(layer, vectors, num_hashes, attention_mask, increase_num_buckets=False):
            stored = replay.rotations[layer.layer_idx]
            original_randn = torch.randn

            def stored_randn(shape, **kwargs):
                if tuple(shape) != tuple(stored.shape):
                    raise RuntimeError(f"LSH layer {layer.layer_idx} asked for {tuple(shape)}, stored {tuple(stored.shape)}")
                return stored.clone()

            torch.randn = stored_randn
            try:
                return replay._original_hash_vectors(layer, vectors, num_hashes, attention_mask, increase_num_buckets)
            finally:
                torch.randn = original_randn

        LSHSelfAttention._hash_vectors = hash_vectors
        return self

    def __exit__(self, *exc_info):
        LSHSelfAttention._hash_vectors = self._original_hash_vectors
        return False


class DeterministicReseed:
    """Make HF's training-mode re-seeding repeatable.

    In training mode every ReformerLayer calls `torch.seed()` before its attention and
    its feed-forward, which seeds the global generator from OS entropy. This context
    replaces `torch.seed` with a counter, so the rotations drawn in a training pass are
    the same on every run. Dropout is 0 in the training cases, so the seeds affect only
    the rotations, and those are recorded.
    """

    def __init__(self, base_seed: int):
        self.next_seed = base_seed

    def __enter__(self):
        self._original_seed = torch.seed
        torch.seed = self._seed
        return self

    def __exit__(self, *exc_info):
        torch.seed = self._original_seed
        return False

    def _seed(self):
        seed = self.next_seed
        self.next_seed += 1
        torch.manual_seed(seed)
        return seed


# ---------------------------------------------------------------------------------------
# Model construction


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw the parameters whose HF init would make the fixture weak.

    HF's init leaves LayerNorm at (1, 0) and biases at 0, which would hide a bias bug,
    and its attention projections come from `initializer_range`. Word embeddings get
    std 1, absolute position embeddings 0.5, attention projections
    ATTENTION_PROJECTION_STD, LayerNorm weights 1 + N(0, 0.1), and LayerNorm, feed-forward
    and decoder biases N(0, 0.1). `lm_head.bias`, which v5 never reads, stays at HF's
    zeros. Other weights keep HF's init, which draws N(0, initializer_range).
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(shape, std, mean=0.0):
        return torch.randn(shape, generator=generator) * std + mean

    attention_projections = (".query.weight", ".key.weight", ".value.weight", ".query_key.weight")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("word_embeddings.weight"):
                parameter.copy_(draw(parameter.shape, 1.0))
            elif name.endswith("position_embeddings.embedding.weight"):
                parameter.copy_(draw(parameter.shape, 0.5))
            elif name.endswith(attention_projections):
                parameter.copy_(draw(parameter.shape, ATTENTION_PROJECTION_STD))
            elif name.endswith("layer_norm.weight"):
                parameter.copy_(draw(parameter.shape, 0.1, mean=1.0))
            elif name == "lm_head.bias":
                continue
            elif name.endswith(".bias"):
                parameter.copy_(draw(parameter.shape, 0.1))


def build_checkpoint(case: Case, folder: Path) -> dict:
    """Build the case's random model, save it with save_pretrained and return weight notes."""
    torch.manual_seed(case.seed)
    config = ReformerConfig(**{**BASE_CONFIG, **case.config})
    model = case.model_class(config)
    randomize_weights(model, case.seed + 1)
    weight_notes = case.edit_weights(model) if case.edit_weights else {}
    # transformers 5 always writes safetensors, and its save_pretrained no longer has
    # the safe_serialization parameter.
    model.save_pretrained(folder)
    return weight_notes


def load_checkpoint(case: Case, folder: Path) -> torch.nn.Module:
    """Load the saved checkpoint, so the reference comes from exactly what was written."""
    return case.model_class.from_pretrained(folder, local_files_only=True)


def first_layer_of_type(config: dict, kind: str) -> int | None:
    for index, layer_kind in enumerate(config["attn_layers"]):
        if layer_kind == kind:
            return index
    return None


# ---------------------------------------------------------------------------------------
# Reference passes


def run_eval(case: Case, folder: Path) -> tuple[dict, dict]:
    """Run the eval-mode forward pass and return its tensors and meta.json notes."""
    model = load_checkpoint(case, folder)
    model.eval()
    forward_kwargs = {"use_cache": False}
    if case.attention_mask is not None:
        forward_kwargs["attention_mask"] = case.attention_mask
    if case.num_hashes is not None:
        forward_kwargs["num_hashes"] = case.num_hashes

    torch.manual_seed(case.seed + 2)
    with torch.no_grad(), HashRecorder() as recorder:
        output = model(case.input_ids, **forward_kwargs)

    torch.manual_seed(case.seed + 4)
    with torch.no_grad(), RotationReplay(recorder.rotations):
        replayed = model(case.input_ids, **forward_kwargs)
    if not torch.equal(replayed[0], output[0]):
        raise RuntimeError(f"{case.name}: replaying the recorded rotations changed the output")

    tensors = {"input_ids": case.input_ids.to(torch.int64)}
    if case.attention_mask is not None:
        tensors["attention_mask"] = case.attention_mask.to(torch.int64)
    if isinstance(model, ReformerModel):
        output_name = "last_hidden_state"
        tensors[output_name] = output.last_hidden_state.float().contiguous()
    else:
        output_name = "logits"
        tensors[output_name] = output.logits.float().contiguous()
    for layer_index in sorted(recorder.rotations):
        tensors[f"layers.{layer_index}.rotations"] = recorder.rotations[layer_index].float().contiguous()
        tensors[f"layers.{layer_index}.buckets"] = recorder.buckets[layer_index].to(torch.int64).contiguous()

    notes = {
        "output": output_name,
        "input_shape": list(case.input_ids.shape),
        "padded_sequence_length": padded_length(model.config, case.input_ids.shape[1]),
        "forward_kwargs": {key: value for key, value in forward_kwargs.items() if key != "attention_mask"},
        "hashed_layers": {str(index): recorder.bucket_info[index] for index in sorted(recorder.bucket_info)},
        "self_only_queries": {str(index): count for index, count in sorted(recorder.self_only_queries.items())},
        "min_lse": {str(index): value for index, value in sorted(recorder.min_lse.items())},
        "max_abs_output": float(tensors[output_name].abs().max()),
    }
    return tensors, notes


def run_train(case: Case, folder: Path) -> tuple[dict, dict]:
    """Run one training-mode forward and backward pass and return its tensors and notes."""
    model = load_checkpoint(case, folder)
    model.train()
    input_ids = case.train_input_ids
    config = model.config
    gradient_names = ["reformer.embeddings.word_embeddings.weight"]
    lsh_layer = first_layer_of_type(case.config, "lsh")
    local_layer = first_layer_of_type(case.config, "local")
    if lsh_layer is not None:
        gradient_names.append(f"reformer.encoder.layers.{lsh_layer}.attention.self_attention.query_key.weight")
    if local_layer is not None:
        gradient_names.append(f"reformer.encoder.layers.{local_layer}.attention.self_attention.query.weight")
    gradient_names += [
        "reformer.encoder.layers.0.feed_forward.dense.dense.weight",
        "reformer.encoder.layer_norm.weight",
        "lm_head.decoder.weight",
    ]

    torch.manual_seed(case.seed + 3)
    with DeterministicReseed(case.seed * 1000), HashRecorder() as recorder:
        output = model(input_ids, labels=input_ids, use_cache=False)
    # The reversible backward pass reruns each LSH layer with the buckets saved in the
    # forward pass. This recorder fails the run if it draws new rotations anyway.
    with DeterministicReseed(case.seed * 1000 + 500), HashRecorder() as backward_recorder:
        output.loss.backward()
    if backward_recorder.rotations:
        raise RuntimeError(f"{case.name}: the backward pass drew new rotations")

    parameters = dict(model.named_parameters())
    tensors = {
        "input_ids": input_ids.to(torch.int64),
        "labels": input_ids.to(torch.int64).clone(),
        "loss": output.loss.detach().float().reshape(1),
    }
    for layer_index in sorted(recorder.rotations):
        tensors[f"layers.{layer_index}.rotations"] = recorder.rotations[layer_index].float().contiguous()
        tensors[f"layers.{layer_index}.buckets"] = recorder.buckets[layer_index].to(torch.int64).contiguous()
    for name in gradient_names:
        tensors[f"grad.{name}"] = parameters[name].grad.detach().float().contiguous()

    notes = {
        "input_shape": list(input_ids.shape),
        "forward_kwargs": {"use_cache": False, "labels": "input_ids"},
        "hashed_layers": {str(index): recorder.bucket_info[index] for index in sorted(recorder.bucket_info)},
        "gradients": gradient_names,
        "loss": float(output.loss.detach()),
        "config_num_buckets_after_pass": config.num_buckets,
    }
    return tensors, notes


def padded_length(config, length: int) -> int:
    """Return the length HF pads an eval input to (a multiple of the chunk lengths' lcm)."""
    chunk_lengths = []
    if "lsh" in config.attn_layers:
        chunk_lengths.append(config.lsh_attn_chunk_length)
    if "local" in config.attn_layers:
        chunk_lengths.append(config.local_attn_chunk_length)
    multiple = math.lcm(*chunk_lengths)
    if length % multiple != 0 and length > min(chunk_lengths):
        return length + multiple - length % multiple
    return length


def describe_tensors(tensors: dict) -> dict:
    return {
        name: {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        for name, tensor in tensors.items()
    }


def write_case(case: Case) -> None:
    folder = FIXTURE_ROOT / case.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    weight_notes = build_checkpoint(case, folder)
    for file_name, content in case.extra_files.items():
        (folder / file_name).write_bytes(content)

    eval_tensors, eval_notes = run_eval(case, folder)
    save_file(eval_tensors, folder / "case.safetensors")
    files = {"case.safetensors": describe_tensors(eval_tensors)}

    train_notes = None
    if case.train_input_ids is not None:
        train_tensors, train_notes = run_train(case, folder)
        save_file(train_tensors, folder / "train.safetensors")
        files["train.safetensors"] = describe_tensors(train_tensors)

    meta = {
        "case": case.name,
        "model_class": case.model_class.__name__,
        "description": case.description,
        "seed": case.seed,
        "attention_projection_std": ATTENTION_PROJECTION_STD,
        "weight_edits": weight_notes,
        "eval": eval_notes,
        "train": train_notes,
        "tolerance": TOLERANCE,
        "files": files,
        **case.extra_meta,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    LOG.info("wrote %s", folder)


# ---------------------------------------------------------------------------------------
# Cases


def random_ids(seed: int, shape: tuple[int, int], vocab_size: int) -> torch.Tensor:
    """Draw token ids in [3, vocab_size), so that no id is pad (0) or eos (2)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, shape, generator=generator)


def byte_ids(text: str) -> torch.Tensor:
    """Encode text as enwik8 models do: each UTF-8 byte b becomes id b + 2."""
    return torch.tensor([[byte + 2 for byte in text.encode("utf-8")]])


def padded_batch(ids: torch.Tensor, real_lengths: list[int], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a batch into a padded one: positions past each row's real length become pad id 0."""
    mask = torch.zeros_like(ids)
    length = ids.shape[1]
    for row, real_length in enumerate(real_lengths):
        if left:
            mask[row, length - real_length :] = 1
        else:
            mask[row, :real_length] = 1
    return ids * mask, mask


def enwik8_small() -> Case:
    text = " ".join(SAMPLE_PROSE)
    return Case(
        name="enwik8_small",
        model_class=ReformerModelWithLMHead,
        description=(
            "google/reformer-enwik8 layout scaled down: byte vocab 258, local/lsh alternating, "
            "axial positions, factorised buckets [2, 4], 2 hashes, relu, causal, no mask"
        ),
        config={
            "attn_layers": ["local", "lsh", "local", "lsh"],
            "vocab_size": 258,
            "axial_pos_embds": True,
            "axial_pos_shape": [8, 16],
            "axial_pos_embds_dim": [8, 24],
            "max_position_embeddings": 128,
            "lsh_attn_chunk_length": 32,
            "local_attn_chunk_length": 16,
            "num_buckets": [2, 4],
            "num_hashes": 2,
            "hidden_act": "relu",
            "is_decoder": True,
        },
        seed=101,
        input_ids=byte_ids(text[:128]),
        train_input_ids=byte_ids(text[128:256]),
    )


def train_sentencepiece() -> tuple[bytes, sentencepiece.SentencePieceProcessor]:
    """Train a small unigram SentencePiece model on SAMPLE_PROSE and return its bytes."""
    model_bytes = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SAMPLE_PROSE),
        model_writer=model_bytes,
        model_type="unigram",
        vocab_size=80,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=2,
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    proto = model_bytes.getvalue()
    return proto, sentencepiece.SentencePieceProcessor(model_proto=proto)


def crime_small() -> Case:
    proto, processor = train_sentencepiece()
    sample_ids = processor.encode(SENTENCEPIECE_SAMPLE, out_type=int)
    sample_pieces = processor.encode(SENTENCEPIECE_SAMPLE, out_type=str)
    corpus_ids = processor.encode(" ".join(SAMPLE_PROSE), out_type=int)
    if len(corpus_ids) < 64:
        raise RuntimeError(f"the prose encodes to {len(corpus_ids)} pieces, fewer than the 64 needed")
    return Case(
        name="crime_small",
        model_class=ReformerModelWithLMHead,
        description=(
            "google/reformer-crime-and-punishment layout scaled down: SentencePiece vocab, mostly "
            "local layers with lsh between, automatic num_buckets, gelu, causal, eval input padded by HF"
        ),
        config={
            "attn_layers": ["local", "lsh", "local", "local", "lsh", "local"],
            "vocab_size": processor.get_piece_size(),
            "axial_pos_embds": True,
            "axial_pos_shape": [8, 8],
            "axial_pos_embds_dim": [8, 24],
            "max_position_embeddings": 64,
            "lsh_attn_chunk_length": 16,
            "local_attn_chunk_length": 16,
            "num_buckets": None,
            "num_hashes": 1,
            "hidden_act": "gelu",
            "is_decoder": True,
        },
        seed=202,
        input_ids=torch.tensor([sample_ids]),
        train_input_ids=torch.tensor([corpus_ids[:64]]),
        extra_files={"spiece.model": proto},
        extra_meta={
            "sentencepiece": {
                "file": "spiece.model",
                "model_type": "unigram",
                "normalization_rule_name": "identity",
                "special_ids": {"pad": 0, "unk": 1, "eos": 2},
                "sample_text": SENTENCEPIECE_SAMPLE,
                "sample_ids": sample_ids,
                "sample_pieces": sample_pieces,
                "note": "input_ids in case.safetensors are sample_ids; train input_ids are the first 64 ids of the prose",
            }
        },
    )


def local_causal_padded() -> Case:
    ids = random_ids(303, (2, 21), 32)
    ids, mask = padded_batch(ids, [21, 15], left=False)
    return Case(
        name="local_causal_padded",
        model_class=ReformerModelWithLMHead,
        description=(
            "local layers only, causal, right-padded batch of 2 with a mask, S0 = 21 not a multiple "
            "of the chunk length 8 (HF pads to 24), gelu, nonzero dropout in the config"
        ),
        config={
            "attn_layers": ["local", "local"],
            "vocab_size": 32,
            "axial_pos_shape": [4, 8],
            "axial_pos_embds_dim": [16, 16],
            "max_position_embeddings": 32,
            "local_attn_chunk_length": 8,
            "lsh_attn_chunk_length": 8,
            "hidden_act": "gelu",
            "is_decoder": True,
            "hidden_dropout_prob": 0.1,
            "local_attention_probs_dropout_prob": 0.1,
        },
        seed=303,
        input_ids=ids,
        attention_mask=mask,
    )


def lsh_masked_lm() -> Case:
    ids = random_ids(404, (2, 64), 48)
    ids, mask = padded_batch(ids, [64, 55], left=True)
    return Case(
        name="lsh_masked_lm",
        model_class=ReformerForMaskedLM,
        description=(
            "ReformerForMaskedLM, bidirectional, lsh layers only, 4 hashes, automatic buckets that "
            "HF factorises to [4, 8], lsh_num_chunks_after 1, left-padded row (pad bucket), "
            "absolute position embeddings"
        ),
        config={
            "attn_layers": ["lsh", "lsh"],
            "vocab_size": 48,
            "axial_pos_embds": False,
            "max_position_embeddings": 64,
            "lsh_attn_chunk_length": 4,
            "local_attn_chunk_length": 4,
            "lsh_num_chunks_before": 1,
            "lsh_num_chunks_after": 1,
            "num_buckets": None,
            "num_hashes": 4,
            "hidden_act": "gelu",
            "is_decoder": False,
        },
        seed=404,
        input_ids=ids,
        attention_mask=mask,
    )


def short_sequence() -> Case:
    return Case(
        name="short_sequence",
        model_class=ReformerModelWithLMHead,
        description=(
            "mixed layers, S = 12 at most both chunk lengths' minimum, so no padding, full "
            "attention in both layer types and no hashing (no rotations), 1 hash"
        ),
        config={
            "attn_layers": ["local", "lsh"],
            "vocab_size": 24,
            "axial_pos_shape": [4, 8],
            "axial_pos_embds_dim": [16, 16],
            "max_position_embeddings": 32,
            "local_attn_chunk_length": 16,
            "lsh_attn_chunk_length": 32,
            "num_buckets": 4,
            "num_hashes": 1,
            "hidden_act": "relu",
            "is_decoder": True,
        },
        seed=505,
        input_ids=random_ids(505, (2, 12), 24),
    )


def factorised_uneven() -> Case:
    return Case(
        name="factorised_uneven",
        model_class=ReformerModelWithLMHead,
        description=(
            "lsh then local, factorised buckets [4, 2], 1 hash from the config, chunk lengths 8 "
            "and 12, S0 = 45 padded by HF to 48; HF's own padding mask activates the pad bucket"
        ),
        config={
            "attn_layers": ["lsh", "local"],
            "vocab_size": 40,
            "axial_pos_shape": [6, 8],
            "axial_pos_embds_dim": [16, 16],
            "max_position_embeddings": 48,
            "lsh_attn_chunk_length": 8,
            "local_attn_chunk_length": 12,
            "num_buckets": [4, 2],
            "num_hashes": 1,
            "hidden_act": "relu",
            "is_decoder": True,
        },
        seed=606,
        input_ids=random_ids(606, (1, 45), 40),
    )


def hashes_override() -> Case:
    return Case(
        name="hashes_override",
        model_class=ReformerModelWithLMHead,
        description="mixed layers, config num_hashes 1 but the forward is called with num_hashes=4",
        config={
            "attn_layers": ["local", "lsh"],
            "vocab_size": 32,
            "axial_pos_shape": [4, 8],
            "axial_pos_embds_dim": [16, 16],
            "max_position_embeddings": 32,
            "lsh_attn_chunk_length": 8,
            "local_attn_chunk_length": 8,
            "num_buckets": 4,
            "num_hashes": 1,
            "hidden_act": "gelu",
            "is_decoder": True,
        },
        seed=707,
        input_ids=random_ids(707, (2, 32), 32),
        num_hashes=4,
    )


def bare_model() -> Case:
    return Case(
        name="bare_model",
        model_class=ReformerModel,
        description=(
            "ReformerModel without a head (no 'reformer.' prefix), bidirectional, local/lsh/local, "
            "local chunks before 1 and after 1 so the first chunk sees the last one unmasked, 2 hashes"
        ),
        config={
            "attn_layers": ["local", "lsh", "local"],
            "vocab_size": 32,
            "axial_pos_shape": [4, 8],
            "axial_pos_embds_dim": [16, 16],
            "max_position_embeddings": 32,
            "lsh_attn_chunk_length": 8,
            "local_attn_chunk_length": 8,
            "local_num_chunks_before": 1,
            "local_num_chunks_after": 1,
            "num_buckets": 4,
            "num_hashes": 2,
            "hidden_act": "relu",
            "is_decoder": False,
            "hidden_dropout_prob": 0.05,
        },
        seed=808,
        input_ids=random_ids(808, (2, 32), 32),
    )


def self_only_rows() -> Case:
    return Case(
        name="self_only_rows",
        model_class=ReformerModelWithLMHead,
        description=(
            "causal lsh only, chunk length 4, 2 hashes: early queries see only their own copies, "
            "so their per-round lse is about -1e5 and the round weights rely on f32 rounding"
        ),
        config={
            "attn_layers": ["lsh", "lsh"],
            "vocab_size": 16,
            "axial_pos_shape": [4, 8],
            "axial_pos_embds_dim": [16, 16],
            "max_position_embeddings": 32,
            "lsh_attn_chunk_length": 4,
            "local_attn_chunk_length": 4,
            "num_buckets": 8,
            "num_hashes": 2,
            "hidden_act": "relu",
            "is_decoder": True,
        },
        seed=909,
        input_ids=random_ids(909, (1, 32), 16),
    )


TIED_TOKEN_IDS = [3, 4, 5]


def zero_for_bucket_ties(model: torch.nn.Module) -> dict:
    """Zero the inputs of layer 0's query-key projection for the tokens in TIED_TOKEN_IDS.

    The word-embedding rows, every position embedding and layer 0's attention LayerNorm
    bias are set to zero. The embedding of such a token is then exactly 0, and LayerNorm
    maps 0 to its bias, which is 0, so the token's qk vector is 0 in every head. Every
    rotated coordinate is +0 or -0, which compare equal, so argmax must return index 0
    in each factor.
    """
    with torch.no_grad():
        embeddings = model.reformer.embeddings
        embeddings.word_embeddings.weight[TIED_TOKEN_IDS] = 0.0
        for weight in embeddings.position_embeddings.weights:
            weight.zero_()
        model.reformer.encoder.layers[0].attention.layer_norm.bias.zero_()
    return {
        "zeroed_word_embedding_rows": TIED_TOKEN_IDS,
        "zeroed": [
            "reformer.embeddings.position_embeddings.weights.0",
            "reformer.embeddings.position_embeddings.weights.1",
            "reformer.encoder.layers.0.attention.layer_norm.bias",
        ],
        "effect": "tokens with these ids have qk = 0 in layer 0, so all their layer-0 buckets are 0",
    }


def bucket_ties() -> Case:
    ids = random_ids(1010, (1, 32), 16)
    ids[0, ::3] = torch.tensor(TIED_TOKEN_IDS * 4)[: ids[0, ::3].numel()]
    return Case(
        name="bucket_ties",
        model_class=ReformerModelWithLMHead,
        description=(
            "lsh/local/lsh where some tokens have qk exactly 0 in layer 0, so every rotated value "
            "ties and argmax must pick the first index (bucket 0 in every round and head)"
        ),
        config={
            "attn_layers": ["lsh", "local", "lsh"],
            "vocab_size": 16,
            "axial_pos_shape": [4, 8],
            "axial_pos_embds_dim": [16, 16],
            "max_position_embeddings": 32,
            "lsh_attn_chunk_length": 8,
            "local_attn_chunk_length": 8,
            "num_buckets": 8,
            "num_hashes": 2,
            "hidden_act": "gelu",
            "is_decoder": True,
        },
        seed=1010,
        input_ids=ids,
        edit_weights=zero_for_bucket_ties,
    )


def wrap_rounds() -> Case:
    return Case(
        name="wrap_rounds",
        model_class=ReformerModelWithLMHead,
        description=(
            "causal lsh only, S = 2 chunks of 16 and 3 hashes, so the first chunk of round k "
            "looks back into the last chunk of round k-1 (round 0 into the last round)"
        ),
        config={
            "attn_layers": ["lsh"],
            "vocab_size": 24,
            "axial_pos_shape": [4, 8],
            "axial_pos_embds_dim": [16, 16],
            "max_position_embeddings": 32,
            "lsh_attn_chunk_length": 16,
            "local_attn_chunk_length": 16,
            "num_buckets": 4,
            "num_hashes": 3,
            "hidden_act": "relu",
            "is_decoder": True,
        },
        seed=1111,
        input_ids=random_ids(1111, (2, 32), 24),
    )


CASE_BUILDERS = [
    enwik8_small,
    crime_small,
    local_causal_padded,
    lsh_masked_lm,
    short_sequence,
    factorised_uneven,
    hashes_override,
    bare_model,
    self_only_rows,
    bucket_ties,
    wrap_rounds,
]


# ---------------------------------------------------------------------------------------
# Cached generation (`past_buckets_states`)


@dataclasses.dataclass
class CachedCase:
    """A greedy generation with HF's cache: a prompt, then one token per step."""

    name: str
    description: str
    config: dict
    seed: int
    prompt_length: int
    steps: int


CACHED_CONFIG = {
    "attn_layers": ["local", "lsh", "local", "lsh"],
    "is_decoder": True,
    "vocab_size": 40,
    "lsh_attn_chunk_length": 8,
    "local_attn_chunk_length": 8,
    "lsh_num_chunks_before": 1,
    "lsh_num_chunks_after": 0,
    "local_num_chunks_before": 1,
    "local_num_chunks_after": 0,
    "num_hashes": 2,
    "axial_pos_embds": True,
    "axial_pos_shape": [8, 16],
    "axial_pos_embds_dim": [16, 16],
    "max_position_embeddings": 128,
}

CACHED_CASES = [
    CachedCase(
        name="cached_generation",
        description=(
            "Greedy generation with past_buckets_states after a 29-token prompt, which HF pads "
            "to 32 (so the cached buckets carry the pad bucket's round offsets), over 20 steps "
            "that cross three chunk boundaries. LSH layers hash each new token against the "
            "cached buckets."
        ),
        config={**CACHED_CONFIG, "num_buckets": 4},
        seed=71,
        prompt_length=29,
        steps=20,
    ),
    CachedCase(
        name="cached_generation_short_prompt",
        description=(
            "Greedy generation with past_buckets_states after a 5-token prompt, shorter than a "
            "chunk: LSH layers attend to every cached token until the cache holds a chunk, "
            "then hash all of it (factorised buckets [2, 4]) and continue with buckets."
        ),
        config={**CACHED_CONFIG, "num_buckets": [2, 4]},
        seed=72,
        prompt_length=5,
        steps=16,
    ),
]


def write_cached_case(case: CachedCase) -> None:
    """Save the model, run HF's cached greedy loop with fixed rotations, write the logits.

    The rotations of each LSH layer are drawn once and replayed at every hash call, the
    prompt's and each step's, as `hash_seed` would make them. `generate()` must pick the
    same tokens as the loop.
    """
    folder = FIXTURE_ROOT / case.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    torch.manual_seed(case.seed)
    config = ReformerConfig(**{**BASE_CONFIG, **case.config})
    model = ReformerModelWithLMHead(config)
    randomize_weights(model, case.seed + 1)
    model.save_pretrained(folder)
    model = ReformerModelWithLMHead.from_pretrained(folder, local_files_only=True)
    model.eval()

    generator = torch.Generator().manual_seed(case.seed + 2)
    buckets = config.num_buckets
    rotation_size = buckets if isinstance(buckets, int) else sum(buckets)
    shape = (config.num_attention_heads, config.attention_head_size, config.num_hashes, rotation_size // 2)
    rotations = {
        index: torch.randn(shape, generator=generator)
        for index, kind in enumerate(config.attn_layers)
        if kind == "lsh"
    }
    prompt = random_ids(case.seed + 3, (1, case.prompt_length), config.vocab_size)

    step_logits = []
    tokens = prompt
    with torch.no_grad(), RotationReplay(rotations):
        output = model(prompt, use_cache=True)
        step_logits.append(output.logits[:, -1])
        cache = output.past_buckets_states
        for _ in range(case.steps):
            next_token = step_logits[-1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            output = model(next_token, past_buckets_states=cache, use_cache=True)
            step_logits.append(output.logits[:, -1])
            cache = output.past_buckets_states
        generated = model.generate(
            prompt, max_new_tokens=case.steps, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0
        )
    if not torch.equal(generated, tokens):
        raise RuntimeError(f"{case.name}: generate() chose other tokens than the cached loop")

    lsh_layers = sorted(rotations)
    bucketed = [index for index in lsh_layers if cache.buckets_cache[index].numel() > 0]
    if bucketed != lsh_layers:
        raise RuntimeError(f"{case.name}: LSH layers {lsh_layers} but only {bucketed} ended with cached buckets")
    largest_id = {str(index): int(cache.buckets_cache[index].max()) for index in lsh_layers}
    total_buckets = math.prod(buckets) if isinstance(buckets, list) else buckets
    pad_offsets = any(value > config.num_hashes * total_buckets - 1 for value in largest_id.values())
    padded = case.prompt_length > 8 and case.prompt_length % 8 != 0
    if padded != pad_offsets:
        raise RuntimeError(f"{case.name}: pad bucket offsets in the cache: {pad_offsets}, expected the opposite")

    tensors = {
        "input_ids": tokens.to(torch.int64).contiguous(),
        "step_logits": torch.cat(step_logits).float().contiguous(),
    }
    for index in lsh_layers:
        tensors[f"layers.{index}.rotations"] = rotations[index].float().contiguous()
    save_file(tensors, folder / "case.safetensors")
    meta = {
        "case": case.name,
        "model_class": "ReformerModelWithLMHead",
        "description": case.description,
        "seed": case.seed,
        "prompt_length": case.prompt_length,
        "steps": case.steps,
        "largest_cached_bucket_id": largest_id,
        "pad_bucket_offsets_in_cache": pad_offsets,
        "tolerance": {
            "step_logits": "max|diff| <= 1e-4 * max(1, max|reference|), over each step",
        },
        "files": {"case.safetensors": describe_tensors(tensors)},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    LOG.info("wrote %s", folder)


# ---------------------------------------------------------------------------------------
# Checks of what each trap case is meant to show


def check_case(case: Case) -> None:
    """Fail the run when a case no longer shows the behaviour it exists for."""
    meta = json.loads((FIXTURE_ROOT / case.name / "meta.json").read_text())
    hashed = meta["eval"]["hashed_layers"]
    if case.name == "short_sequence" and hashed:
        raise RuntimeError("short_sequence hashed, but it must stay below the LSH chunk length")
    if case.name != "short_sequence" and "lsh" in case.config["attn_layers"] and not hashed:
        raise RuntimeError(f"{case.name}: no LSH layer hashed")
    if case.name == "self_only_rows" and sum(meta["eval"]["self_only_queries"].values()) == 0:
        raise RuntimeError("self_only_rows: no query had an lse near -1e5")
    if case.name == "factorised_uneven" and hashed["0"]["pad_bucket"] is None:
        raise RuntimeError("factorised_uneven: HF's padding did not activate the pad bucket")
    if case.name == "bucket_ties":
        check_bucket_ties(case)


def check_bucket_ties(case: Case) -> None:
    from safetensors.torch import load_file

    tensors = load_file(FIXTURE_ROOT / case.name / "case.safetensors")
    buckets = tensors["layers.0.buckets"][0]
    tied = torch.isin(tensors["input_ids"][0], torch.tensor(TIED_TOKEN_IDS))
    if not bool((buckets[:, :, tied] == 0).all()):
        raise RuntimeError("bucket_ties: a token with qk = 0 did not land in bucket 0")
    if bool((buckets[:, :, ~tied] == 0).all()):
        raise RuntimeError("bucket_ties: every other token is in bucket 0 too, so the case shows nothing")


def write_pytorch_copy(case_name: str) -> None:
    """Write `<case>_pytorch/`: the case's config and weights as `pytorch_model.bin`.

    Older checkpoints ship pickled weights instead of safetensors. The importer must read
    them to the same model, so the Rust tests compare this copy with the case's references.
    """
    source = FIXTURE_ROOT / case_name
    target = FIXTURE_ROOT / f"{case_name}_pytorch"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    model = ReformerModelWithLMHead.from_pretrained(source)
    torch.save(model.state_dict(), target / "pytorch_model.bin")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Reruns were checked to be byte-identical with one thread. More threads may split
    # float reductions differently.
    torch.set_num_threads(1)
    # `--only NAME...` rewrites the named cases and leaves the others as they are.
    only = set(sys.argv[sys.argv.index("--only") + 1 :]) if "--only" in sys.argv else None
    known = {build_case.__name__ for build_case in CASE_BUILDERS} | {case.name for case in CACHED_CASES}
    if only is not None and not only <= known:
        sys.exit(f"error: unknown case(s) {sorted(only - known)}; known cases: {sorted(known)}")
    for build_case in CASE_BUILDERS:
        if only is None or build_case.__name__ in only:
            case = build_case()
            write_case(case)
            check_case(case)
    if only is None or "enwik8_small" in only:
        write_pytorch_copy("enwik8_small")
    for cached_case in CACHED_CASES:
        if only is None or cached_case.name in only:
            write_cached_case(cached_case)
    total_bytes = sum(path.stat().st_size for path in FIXTURE_ROOT.rglob("*") if path.is_file())
    LOG.info("total size of %s: %d bytes", FIXTURE_ROOT, total_bytes)


if __name__ == "__main__":
    main()
