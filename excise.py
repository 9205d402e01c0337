"""Cut layers out of a checkpoint: drop them, renumber the rest, write a smaller HF-layout checkpoint.

    python excise.py --ckpt smollm2-135m --layers 17-22 --out runs/smollm2-pruned
    python excise.py --ckpt smollm2-135m --search-report runs/clp-20/report.json --out runs/smollm2-pruned

The output loads in our loader and in any HF-compatible tool: config.json with the new
num_hidden_layers (and per-layer lists such as layer_types trimmed), safetensors in the source's
dtype (sharded with an index when large), tied embeddings still tied, tokenizer and generation
config copied, plus pruning.json saying what was removed, from what, by which method and why.
The write is atomic: the directory appears complete or not at all. The cut itself (renumbering, trimming,
pruning.json) is save_weights.write_pruned, which search.py --excise shares; this file is the command.
"""
import argparse
from pathlib import Path

import load_weights
from gates import check_layers, spec_indices
from machinery import atomic, placement
from machinery.devices import stored_dtype
from machinery.errors import UserError, cli, old_spelling, parses, read_json
from save_weights import info_from_report, write_pruned


def parse_layers(spec, num_layers):
    """'17-22' or '3,5,10-12' (inclusive, original indices) -> sorted list; clear errors for bad input."""
    return check_layers(spec_indices(spec), num_layers)


@parses("search report")
def layers_from_report(path, model):
    """The removed layers of a search report, after checking that it was made on this very model."""
    report = read_json(path, "report")
    if not isinstance(report, dict) or "removed_layers" not in report:
        raise UserError(f"{path} has no 'removed_layers': not a search report")
    layers = report["removed_layers"]
    if not (isinstance(layers, list) and all(type(i) is int for i in layers)):
        raise UserError(f"{path}: removed_layers must be a list of layer indices, not {layers!r}")
    theirs, ours = report.get("model", {}).get("fingerprint", {}), load_weights.fingerprint(model)
    for key, value in ours.items():
        if theirs.get(key) != value:
            raise UserError(f"{path} was made on another model ({report.get('model', {}).get('ckpt', '?')}): "
                             f"its {key} is {theirs.get(key)!r}, this checkpoint's is {value!r}")
    return check_layers(report["removed_layers"], model.cfg.num_layers), report


def run(ckpt, out, layers=None, search_report=None):
    """Load `ckpt`, remove `layers` (a spec like '17-22', original indices) or the removed_layers of the
    search.py / baselines.py report.json at `search_report`, write `out`."""
    placement.refuse_random(ckpt, "--ckpt", "there is nothing to excise")
    source = load_weights.resolve(ckpt)
    atomic.check_out(out, {"--ckpt": source})
    config = load_weights.read_config_dict(source)
    if search_report is None:  # the layer spec needs no weights: check it first
        removed, info = parse_layers(layers, placement.config(source).num_layers), {}
    # load in the stored dtype: no up-cast copy of a large bf16 checkpoint
    model, _ = load_weights.load(source, dtype=stored_dtype(config))
    if search_report is not None:
        removed, rep = layers_from_report(search_report, model)
        info = info_from_report(rep, search_report)
    pruning = write_pruned(model, source, removed, out, info)
    print(f"removed layers {removed} of {model.cfg.num_layers}; wrote {pruning['num_layers']}-layer checkpoint to {out}")
    return pruning


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description="Remove layers from a checkpoint and write the smaller HF-layout checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=load_weights.DEFAULT, help="checkpoint directory or short name to prune")
    p.add_argument("--layers", default=None, help="layers to remove, original inclusive indices, e.g. 17-22 or 3,5,10-12")
    p.add_argument("--search-report", type=Path, default=None,
                   help="a search.py or baselines.py report.json whose removed_layers to cut")
    old_spelling(p, "--report", "--search-report")
    p.add_argument("--out", type=Path, required=True, help="directory to write the pruned checkpoint to")
    return p


@cli()
def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if (a.layers is None) == (a.search_report is None):
        p.error("give exactly one of --layers and --search-report")
    run(a.ckpt, a.out, layers=a.layers, search_report=a.search_report)


if __name__ == "__main__":
    main()
