"""The ``mtl`` command.

    mtl train  --config configs/NAME.py[:arg] --workdir DIR [--overwrite|--resume] [--config.key=value ...]
    mtl eval   --workdir DIR [--which best|last|STEP] [--split val|test]
    mtl export --workdir DIR --out ARTIFACT [--which best|last|STEP] [--overwrite]
    mtl info   ARTIFACT            (verifies the artifact's file digests)
    mtl plot   --workdir RUN [RUN ...] [--out curves.png]
    mtl merge  --config configs/merge_NAME.py --workdir DIR [--overwrite] [--config.key=value ...]
    mtl merge-files --method NAME --base CKPT --models CKPT [CKPT ...] --out OUT [--kw key=value ...]
                    [--exclude PATTERN ...] [--max-shard-size 5GB] [--format safetensors|artifact|orbax]
                    [--map-hf encoder/] [--chunk-size auto|512MB|none] [--sequential] [--overwrite]
    mtl generate --workdir DIR --prompt TEXT [--max-new N] [--temperature T] [--batch B] [--which best|last|STEP]
    mtl slim   --workdir DIR|ARTIFACT (--budget 12MFLOPs --preference depth=2,seg=1 | --build-table)
    mtl slim   --workdir DIR [DIR ...] --build-table      # several runs of one config, measured together
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _split_config_overrides(argv):
    rest, overrides = [], []
    for a in argv:
        if a.startswith("--config."):
            overrides.append(a[len("--config."):])
        else:
            rest.append(a)
    return rest, overrides


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtl", description="Multi-task learning and model merging in JAX.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from a config file (resumes when the workdir holds the same run)")
    t.add_argument("--config", required=True, help="configs/NAME.py or configs/NAME.py:arg")
    t.add_argument("--workdir", required=True)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="delete a different run in --workdir first")
    g.add_argument("--resume", action="store_true", help="continue the run in --workdir even if the config changed")
    e = sub.add_parser("eval", help="evaluate a run's checkpoint on a split")
    e.add_argument("--workdir", required=True)
    e.add_argument("--which", default="best", help="best | last | a step number")
    e.add_argument("--split", default="test", choices=("val", "test"))
    e.add_argument("--widths", default="", help="slimmable runs: evaluate at these widths, e.g. 0.5 or "
                   "encoder=0.5,seg=1,depth=0.25 (unlisted parts 1.0)")
    x = sub.add_parser("export", help="write a shareable artifact (parameters + metadata)")
    x.add_argument("--workdir", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--which", default="best", help="best | last | a step number")
    x.add_argument("--overwrite", action="store_true")
    i = sub.add_parser("info", help="print an artifact's metadata after verifying its file digests")
    i.add_argument("artifact")
    pl = sub.add_parser("plot", help="overlay the training curves of one or more runs into a PNG")
    pl.add_argument("--workdir", required=True, nargs="+", help="one or more `mtl train` workdirs")
    pl.add_argument("--out", default=None, help="PNG to write (default: curves.png in the first workdir "
                                                "for one run, ./curves_overlay.png for several)")
    m = sub.add_parser("merge", help="merge fine-tuned artifacts (mtl.merging), evaluate per task, write the result")
    m.add_argument("--config", required=True, help="configs/merge_NAME.py or configs/merge_NAME.py:arg")
    m.add_argument("--workdir", required=True)
    m.add_argument("--overwrite", action="store_true", help="replace earlier merge results in --workdir")
    f = sub.add_parser("merge-files", help="merge checkpoint files out of core (safetensors, artifacts, orbax)")
    f.add_argument("--method", required=True, help="a merge_stream method: average, task_arithmetic, ties, dare, ...")
    f.add_argument("--base", required=True, help="the pretrained checkpoint")
    f.add_argument("--models", required=True, nargs="+", help="the fine-tuned checkpoints")
    f.add_argument("--out", required=True, help="DIR or *.safetensors (safetensors), *.mtl (artifact)")
    f.add_argument("--format", choices=("safetensors", "artifact", "orbax"), default=None)
    f.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE", help="a method hyper-parameter")
    f.add_argument("--include", action="append", default=None, metavar="PATTERN")
    f.add_argument("--exclude", action="append", default=None, metavar="PATTERN")
    f.add_argument("--max-shard-size", default=None, help="split safetensors output into shards, e.g. 5GB")
    f.add_argument("--map-hf", default=None, metavar="PREFIX",
                   help="read Hugging Face ViT/CLIP/GPT-2 inputs in mtl names under PREFIX (e.g. encoder/)")
    f.add_argument("--chunk-size", default="auto", metavar="SIZE",
                   help="merge a tensor whose K+1 copies exceed SIZE in row chunks, read and written in place"
                        " (default auto: 1GiB; none: never)")
    f.add_argument("--sequential", action="store_true", help="no read-ahead / write-behind threads (less memory)")
    f.add_argument("--overwrite", action="store_true")
    gen = sub.add_parser("generate", help="decode from a causal LM run with a KV cache; prints the text, "
                                          "decode latency per token and KV cache memory at batch 1 and --batch")
    gen.add_argument("--workdir", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--batch", type=int, default=8, help="the larger batch measured besides batch 1")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--which", default="best", help="best | last | a step number")
    _add_slim_parser(sub)
    return p


def _add_slim_parser(sub) -> None:
    s = sub.add_parser("slim", help="slimmable runs: the width configuration for a FLOP budget and task preference")
    s.add_argument("--workdir", required=True, nargs="+", help="a slimmable run, or an artifact exported from one "
                   "(answered from the lookup table it carries: no data needed); with --build-table, several runs "
                   "of one model config (seeds, variants) have their tables built together, each configuration "
                   "compiled once for all")
    s.add_argument("--budget", default="", help="FLOPs per example, e.g. 12MFLOPs")
    s.add_argument("--preference", default="", help="task weights, e.g. depth=2,seg=1 (unlisted tasks 0)")
    s.add_argument("--build-table", action="store_true", help="(re)build RUN/slim_table.json from validation data")
    s.add_argument("--which", default="best", help="best | last | a step number")


def _slim(args) -> None:
    from mtl.nn.slimmable import runs

    workdirs = list(args.workdir)
    if len(workdirs) > 1 and (args.budget or args.preference or not args.build_table):
        raise ValueError(f"mtl slim answers a query for one --workdir (got {len(workdirs)}); several workdirs "
                         "are for --build-table alone")
    if args.build_table:
        for wd in workdirs:
            if runs.is_artifact(wd):
                raise ValueError(f"{wd} is an artifact: its lookup table was stored at export; "
                                 "--build-table needs the run's workdir (and its validation data)")
        for wd, table in zip(workdirs, runs.build_tables(workdirs, args.which)):
            print(f"wrote {os.path.join(wd, 'slim_table.json')} ({len(table.entries)} configurations, "
                  f"{len(table.grid)} budget x preference entries)")
        if not args.budget:
            return
    if not args.budget or not args.preference:
        raise ValueError("mtl slim needs --budget (e.g. 12MFLOPs) and --preference (e.g. depth=2,seg=1), "
                         "or --build-table")
    print(json.dumps(runs.slim(workdirs[0], args.budget, args.preference, args.which), indent=2))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = _split_config_overrides(argv)
    args = _parser().parse_args(argv)
    if overrides and args.cmd not in ("train", "merge"):
        print(f"mtl {args.cmd}: --config.* overrides only apply to `mtl train` and `mtl merge`", file=sys.stderr)
        return 2
    from mtl import distributed

    distributed.initialize()
    try:
        if args.cmd == "train":
            from mtl import config as config_lib
            from mtl.train.baselines import run_experiment

            cfg = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
            run_experiment(cfg, args.workdir, overwrite=args.overwrite, resume=args.resume)
        elif args.cmd == "eval":
            _eval(args)
        elif args.cmd == "export":
            from mtl.artifact import export_run

            path = export_run(args.workdir, args.out, which=args.which, overwrite=args.overwrite)
            print(f"wrote {path}")
        elif args.cmd == "merge":
            _merge(args, overrides)
        elif args.cmd == "merge-files":
            _merge_files(args)
        elif args.cmd == "generate":
            _generate(args)
        elif args.cmd == "slim":
            _slim(args)
        elif args.cmd == "info":
            _info(args)
        elif args.cmd == "plot":
            from mtl.train.curves import plot_runs

            out = args.out or (os.path.join(args.workdir[0], "curves.png") if len(args.workdir) == 1
                               else "curves_overlay.png")
            print(f"wrote {plot_runs(args.workdir, out)}")
    except KeyboardInterrupt as e:
        msg = getattr(e, "message", None) or ("interrupted; the checkpoints already saved are intact"
                                              + (": run the same command again to resume" if args.cmd == "train" else ""))
        print(f"mtl {args.cmd}: {msg}", file=sys.stderr)
        return 130
    except (KeyError, ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError,
            FloatingPointError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mtl {args.cmd}: error: {msg}", file=sys.stderr)
        return 1
    return 0


def _info(args) -> None:
    from mtl.checkpoint import read_artifact_metadata, verify_artifact

    meta = read_artifact_metadata(args.artifact)
    n = verify_artifact(args.artifact, meta)
    meta.pop("params", None)
    meta.pop("digests", None)
    meta["verified"] = (f"{n} files of params/ match their sha256 digests" if n is not None
                        else "not verified: written before artifacts carried digests")
    print(json.dumps(meta, indent=2))


def _merge(args, overrides) -> None:
    from mtl import config as config_lib
    from mtl.merging.run import run_merge

    cfg = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    out = run_merge(cfg, args.workdir, overwrite=args.overwrite)
    print(json.dumps({k: out[k] for k in ("method", "metrics", "avg_accuracy", "accuracy")}, indent=2))


def _merge_files(args) -> None:
    import ast

    from mtl.merging.files import merge_files

    kw = {}
    for item in args.kw:
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"--kw {item!r}: expected KEY=VALUE, e.g. --kw k=20")
        try:
            kw[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            kw[key] = val
    out = merge_files(args.method, args.base, args.models, args.out, format=args.format, include=args.include,
                      exclude=args.exclude, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                      prefetch=not args.sequential, write_behind=not args.sequential, progress=True,
                      map_hf=args.map_hf, chunk_bytes=None if args.chunk_size.lower() == "none" else args.chunk_size,
                      **kw)
    print(f"wrote {out}")


def _generate(args) -> None:
    from mtl.artifact import restore_run
    from mtl.nn.parscale import generate

    steps, params, step, cfg, _ = restore_run(args.workdir, args.which)
    model = steps.model(params)
    runs = []
    for b in sorted({1, int(args.batch)}):
        with steps.activate():
            g = generate(model, args.prompt, args.max_new, temperature=args.temperature, batch=b, seed=args.seed)
        runs.append(g.summary())
    print(runs[0]["text"])
    print(json.dumps({"workdir": os.path.abspath(args.workdir), "step": step, "runs": runs}, indent=2))


def _eval(args) -> None:
    from mtl.artifact import restore_run
    from mtl.data.pipeline import eval_batches
    from mtl.train.loop import load_data

    if getattr(args, "widths", ""):
        return _eval_widths(args)
    steps, params, step, cfg, bundle = restore_run(args.workdir, args.which)
    src = load_data(cfg)[3] if args.split == "val" else bundle.test
    state = steps.init().replace(params=params)
    res = steps.evaluate(state, eval_batches(src, cfg.train.eval_batch_size, steps.batch_sharding))
    print(json.dumps({"workdir": os.path.abspath(args.workdir), "step": step, "split": args.split,
                      "metrics": res}, indent=2))


def _eval_widths(args) -> None:
    from mtl.nn.slimmable import runs
    from mtl.nn.slimmable.search import parse_widths
    from mtl.train.loop import load_data

    steps, model, cfg, bundle = runs.load_run(args.workdir, args.which)
    widths = parse_widths(args.widths, model.task_names, model.widths)
    src = load_data(cfg)[3] if args.split == "val" else bundle.test
    res = runs.evaluate_at(steps, model, src, int(cfg.train.eval_batch_size), widths)
    print(json.dumps({"workdir": os.path.abspath(args.workdir), "split": args.split, "widths": widths.to_json(),
                      "mflops": runs.cost.flops(model, widths, bundle.input_shape) / 1e6, "metrics": res}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
