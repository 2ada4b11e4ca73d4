"""Zero-shot lm-eval accuracy of SmolLM2-135M before and after healing: the 7 tasks on their first
500 documents, for the conversion a heal run starts from and the model it ends with.

Start: `CACHE/heal/mla{budget}[-flags]` (benchmarks/heal.py's default calibrated conversion, with the
convert flags the run named); end: `CACHE/heal/healed{budget}[-flags]-{tokens}` (saved by
`benchmarks/heal.py --tokens {tokens}`). The source row is the one in eval_smollm2.json, measured on the
same protocol (tasks, documents, data, batch size); perplexities are the reference protocol's, from the
heal run's results JSON, since the heal run measured them.

    python benchmarks/heal_lmeval.py --budget 96 --tokens 1048576    # about 20 minutes on 2 cores
    python benchmarks/heal_lmeval.py --budget 96 --query-fit-sequences 16 --name heal96_qfit_1m

Writes `heal_lmeval.{md,json}` (for `--name heal`, the default) or `{name}_lmeval.{md,json}` into
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import logging

from heal import (
    DEFAULT_METHOD,
    EVALDATA,
    MODELS,
    RESULTS,
    cache_dir,
    convert_flags,
    folder_name,
    healed_name,
    row_slot,
)

from mlaify.eval import EvalOptions, evaluate_model, write_report
from mlaify.fetch import fetch_model
from mlaify.loading import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=1_048_576)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--name", default="heal", help="the heal run's results file stem")
    parser.add_argument(
        "--query-fit-sequences",
        type=int,
        default=0,
        help="the run's start: `mlaify convert --query-fit-sequences N`",
    )
    parser.set_defaults(keep_sliding=False)  # SmolLM2 has no sliding window; heal.convert_flags reads it
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source = json.loads((RESULTS / "eval_smollm2.json").read_text())["source"]
    if source["protocol"]["limit"] != args.limit:
        raise SystemExit(
            f"eval_smollm2.json's source row read {source['protocol']['limit']} documents per task"
        )
    tasks = source["protocol"]["tasks"]  # the 7 tasks of the issue, as the source row has them
    options = EvalOptions(windows=0, tasks=tasks, limit=args.limit, data_dir=str(EVALDATA), batch_size=8)
    flags = convert_flags(args)
    finished = [
        r
        for r in json.loads((RESULTS / f"{args.name}.json").read_text())["rows"]
        if row_slot(r) == (args.budget, DEFAULT_METHOD, args.tokens, flags)
        and "wall_s" in r  # a stopped row has no healed model to score
    ]
    if not finished:
        raise SystemExit(
            f"{args.name}.json has no finished default-method row at budget {args.budget}, "
            f"{args.tokens} tokens, convert flags {' '.join(flags) or '(none)'}: run benchmarks/heal.py first"
        )
    heal = finished[0]
    tokenizer = load_tokenizer(fetch_model("smollm2-135m"))
    model = MODELS["smollm2-135m"]
    start = " ".join(("calibrated conversion", *flags))
    models = {
        f"start: mla{args.budget} ({start})": (
            cache_dir(model, folder_name(f"mla{args.budget}", *flags)),
            heal["curve"][0][1],
        ),
        f"end: healed on {args.tokens:,} tokens": (
            cache_dir(model, healed_name(args.budget, flags, DEFAULT_METHOD, args.tokens)),
            heal["curve"][-1][1],
        ),
    }
    results = []
    for name, (path, ppl) in models.items():
        result = evaluate_model(path, options, tokenizer, name=name)
        result["perplexity"] = {
            "perplexity": ppl,
            "windows": 32,
            "seq_len": 2048,
            "from": f"{args.name}.json",
        }
        results.append(result)
    notes = [
        "Source row: eval_smollm2.json (same protocol).",
        "Perplexity: the reference protocol (WikiText-2 test, 32 x 2048, float32), as "
        f"{args.name}.json has it.",
        f"Healing: benchmarks/heal.py defaults (kd+lm, attention weights, lr 1e-4, cosine) on "
        f"{args.tokens:,} tokens of ../shared/traindata/.",
    ]
    prefix = "heal_lmeval" if args.name == "heal" else f"{args.name}_lmeval"
    write_report(source, results, RESULTS, prefix=prefix, notes=notes)
    print((RESULTS / f"{prefix}.md").read_text())


if __name__ == "__main__":
    main()
