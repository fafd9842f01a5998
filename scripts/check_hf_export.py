"""Check that transformers loads a checkpoint written by `reformer-infer export`.

Loads the exported folder with transformers: every parameter must be found, none left over.
When `--reference` names the checkpoint the run came from, it also compares the two models'
logits on random ids. Both run under the same torch seed, so they draw the same rotations.

Run by hand, never by CI: it needs torch and transformers (see assets/hf-fixtures/README.md).

    python scripts/check_hf_export.py EXPORTED [--reference ORIGINAL]
"""

import argparse
import sys

import torch
from transformers import AutoConfig, ReformerForMaskedLM, ReformerModelWithLMHead


def load(folder):
    config = AutoConfig.from_pretrained(folder)
    cls = ReformerModelWithLMHead if config.is_decoder else ReformerForMaskedLM
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        sys.exit(f"{folder}: transformers reported {problems}")
    return model.eval()


def logits(model, ids):
    torch.manual_seed(0)
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exported")
    parser.add_argument("--reference")
    args = parser.parse_args()

    exported = load(args.exported)
    print(f"{args.exported}: {type(exported).__name__} loaded with every parameter")
    if args.reference is None:
        return
    reference = load(args.reference)
    generator = torch.Generator().manual_seed(1)
    length = min(exported.config.max_position_embeddings, 64)
    ids = torch.randint(0, exported.config.vocab_size, (2, length), generator=generator)
    difference = (logits(exported, ids) - logits(reference, ids)).abs().max().item()
    print(f"max |logit difference| against {args.reference}: {difference:.3e}")
    if difference > 0:
        sys.exit("the exported model computes different logits")


if __name__ == "__main__":
    main()
