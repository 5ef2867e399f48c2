"""`unirank` command line: train, consolidate, evaluate, benchmark, alignment-tax, cold-start, export, serve,
quickstart.

Configs: `--config FILE|NAME` (a YAML file or a packaged config: quickstart, default) plus
`key=value` overrides, e.g. `unirank train --config default data.path=/data/Sports train.lr=0.002`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ERRORS = (ValueError, FileNotFoundError, RuntimeError)  # our errors subclass these; the message names the culprit


def _config(args):
    from unirank.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    if args.nproc_per_node is not None and "LOCAL_RANK" not in os.environ:
        return launch_ranks(args)
    from unirank.training.train import train

    cfg = _config(args)
    result = train(cfg, quiet=args.quiet)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"checkpoint": str(result.checkpoint), "best_epoch": result.best_epoch,
                          "validation": result.best_validation, "seconds": round(result.seconds, 1)}))
    return 0


def launch_ranks(args) -> int:
    """`unirank train --nproc-per-node N ...`: torchrun's elastic launcher on this machine runs N
    ranks of the same command (the config is checked once here, before any rank starts)."""
    from torch.distributed.run import main as torchrun

    if args.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    _config(args)
    argv = [a for a in sys.argv[1:]]
    flag = argv.index("--nproc-per-node") if "--nproc-per-node" in argv else None
    if flag is not None:
        del argv[flag: flag + 2]
    else:
        argv = [a for a in argv if not a.startswith("--nproc-per-node=")]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc_per_node)))
    try:
        torchrun(["--standalone", f"--nproc-per-node={args.nproc_per_node}", "-m", "unirank.cli.main", *argv])
    except SystemExit as exc:  # torchrun exits non-zero when a rank failed (its error is printed above)
        return int(exc.code or 0)
    except Exception as err:  # ChildFailedError: the ranks printed their own errors
        print(f"unirank train: a rank failed: {type(err).__name__}", file=sys.stderr)
        return 1
    return 0


def cmd_consolidate(args) -> int:
    from unirank.training import sharded_checkpoint as sc

    path = Path(args.checkpoint)
    if (path / sc.LATEST).is_file():  # a checkpoint root: its latest checkpoint
        path = sc.latest(path)
    print(json.dumps({"checkpoint": str(sc.consolidate(path, args.out))}))
    return 0


def cmd_evaluate(args) -> int:
    from unirank.experiments.report import evaluate_checkpoint, markdown_table, run_metadata, write_report

    cfg = _config(args)
    checkpoint = cfg.eval.checkpoint or str(Path(cfg.train.out_dir) / "best.pt")
    report = evaluate_checkpoint(cfg, checkpoint, baselines=cfg.eval.baselines, split=args.split)
    report["run"] = run_metadata(" ".join(["unirank"] + sys.argv[1:]))
    paths = write_report(report, args.out or cfg.train.out_dir, name=f"eval_{args.split}")
    print(markdown_table(report["results"]))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_benchmark(args) -> int:
    from unirank.experiments.benchmark import run_benchmark, write_benchmark
    from unirank.experiments.peers import PeerSettings, parse_peers

    report = run_benchmark(args.data, args.config or "fast", args.seeds, args.out, args.overrides,
                           eval_every=args.eval_every, quiet=args.quiet,
                           command=" ".join(["unirank"] + sys.argv[1:]), with_twins=args.twins,
                           peers=parse_peers(args.peers), peer_settings=PeerSettings(minutes=args.peer_minutes),
                           peer_python=args.peers_python)
    paths = write_benchmark(report, args.report or Path(args.out) / "benchmark")
    print(Path(paths["markdown"]).read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_alignment_tax(args) -> int:
    from unirank.experiments.alignment import alignment_tax, markdown
    from unirank.experiments.report import run_metadata

    cfg = _config(args)
    bad = [pair for pair in args.single if "=" not in pair]
    if bad:
        raise ValueError(f"--single takes TASK=CHECKPOINT, got {bad}")
    single = dict(pair.split("=", 1) for pair in args.single)
    report = alignment_tax(cfg, quiet=args.quiet, unified=args.unified, single=single)
    report["run"] = run_metadata(" ".join(["unirank"] + sys.argv[1:]))
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "alignment_tax.json").write_text(json.dumps(report, indent=1))
    (out / "alignment_tax.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


def cmd_cold_start(args) -> int:
    from unirank.experiments.cold_start import run_cold_start
    from unirank.experiments.report import run_metadata

    cfg = _config(args)
    run = run_metadata(" ".join(["unirank"] + sys.argv[1:]))  # the tree that runs, before a later commit moves HEAD
    report = run_cold_start(cfg, fraction=args.fraction, split_seed=args.split_seed, quiet=args.quiet)
    report["run"] = run
    out = Path(cfg.train.out_dir)
    (out / "cold_start.json").write_text(json.dumps(report, indent=1))
    for task, by_method in report["metrics"].items():
        for method, m in by_method.items():
            print(f"{task:9s} {method:12s} R@10 {m['recall@10']['mean']:.4f}  N@10 {m['ndcg@10']['mean']:.4f}")
    print(f"wrote {out / 'cold_start.json'}")
    return 0


def cmd_export(args) -> int:
    from unirank.serving.export import staged_directory

    index = None
    if args.index:
        from unirank.serving.item_index import IndexOptions

        index = IndexOptions(args.index, ef_search=args.ef_search, nprobe=args.nprobe, refine=args.refine, nlist=args.nlist)
    if args.new_items is None:
        report, repos = _export(args, args.out, index)
    else:  # built aside and renamed into place: bad metadata or a failed check leaves nothing behind
        with staged_directory(args.out) as staged:
            report, staged_repos = _export(args, staged, index)
        repos = {flavour: Path(args.out) / "repository" / flavour for flavour in staged_repos}
    out = {"onnx": str(Path(args.out) / "model.onnx"), "parity_max_abs_diff": report.max_abs_diff,
           "repositories": {k: str(v) for k, v in repos.items()}}
    if report.new_items is not None:
        added = report.new_items
        out["new_items"] = {"added": len(added.items), "item_ids": [added.trained_items + 1, added.trained_items + len(added.items)],
                            "unknown_attributes": added.unknown_attributes}
        if added.unknown_attributes:
            print(f"unirank export: {sum(added.unknown_attributes.values())} attribute names unknown to the training "
                  f"vocabulary were left out ({len(added.unknown_attributes)} distinct): "
                  f"{', '.join(sorted(added.unknown_attributes)[:10])}", file=sys.stderr)
    print(json.dumps(out))
    return 0


def _export(args, out_dir, index):
    from unirank.serving.export import export_model
    from unirank.serving.model_repository import build_model_repository

    settings = {k: v for k, v in (("fresh_boost", args.fresh_boost), ("fresh_max_count", args.fresh_max_count),
                                  ("fresh_neighbours", args.fresh_neighbours)) if v is not None}
    report = export_model(args.checkpoint, out_dir, top_k=args.top_k, index=index, new_items=args.new_items,
                          inference_settings=settings)
    repos = build_model_repository(out_dir, Path(out_dir) / "repository", max_batch_size=args.max_batch_size,
                                   instance_count=args.instances, device=args.device, ort_threads=args.ort_threads,
                                   preferred_batch_sizes=tuple(args.preferred_batch_sizes),
                                   graph_optimization=args.graph_optimization)
    return report, repos


def cmd_serve(args) -> int:
    from unirank.serving.supervisor import serve

    return serve(args.repository, grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port)


def cmd_quickstart(args) -> int:
    from unirank.cli.quickstart import quickstart

    return quickstart(args.config or "quickstart", args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unirank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p, default=None):
        p.add_argument("--config", default=default, help="YAML file or packaged config name")
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
        p.add_argument("--quiet", action="store_true")
        return p

    p = with_config(sub.add_parser("train", help="train the unified ranker (one process, or N ranks)"))
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="run N ranks on this machine (torchrun, sharded tables); several machines: "
                        "torchrun ... -m unirank.cli.main train ...")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("consolidate", help="resumable (sharded) checkpoint -> single-file checkpoint (from its own "
                       "config and catalogue files)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory, or the checkpoints/ root")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_consolidate)
    p = with_config(sub.add_parser("evaluate", help="per-task test metrics beside the baselines"))
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--out", default=None, help="report directory (default: train.out_dir)")
    p.set_defaults(func=cmd_evaluate)
    p = with_config(sub.add_parser("benchmark", help="a recipe over seeds, validation-selected, beside the baselines"))
    p.add_argument("--data", required=True, help="dataset directory (or `synthetic`)")
    p.add_argument("--seeds", type=int, default=3, help="runs, seeds train.seed .. train.seed + N - 1")
    p.add_argument("--out", default="runs/benchmark", help="run directories (one per seed, must be new)")
    p.add_argument("--report", default=None, help="path prefix of the JSON/Markdown/plots (default OUT/benchmark)")
    p.add_argument("--eval-every", type=int, default=None, help="epochs between validation rounds (default: the config's)")
    p.add_argument("--twins", action="store_true",
                   help="also train the single-task twins per seed (leaderboard rows + alignment tax)")
    p.add_argument("--peers", default="", metavar="sasrec[,bert4rec]",
                   help="also train these rectools peers once per seed on the same split (needs `make peers`)")
    p.add_argument("--peer-minutes", type=float, default=15.0, help="wall-clock cap per peer run")
    p.add_argument("--peers-python", default=None,
                   help="python of the peers' virtualenv (default: $UNIRANK_PEERS_PYTHON, else .venv-peers)")
    p.set_defaults(func=cmd_benchmark)
    p = with_config(sub.add_parser("alignment-tax", help="unified vs one model per task"))
    p.add_argument("--unified", default=None, help="checkpoint of the unified model (else trained)")
    p.add_argument("--single", action="append", default=[], metavar="TASK=CHECKPOINT",
                   help="checkpoint of a single-task model (else trained); repeatable")
    p.set_defaults(func=cmd_alignment_tax)
    p = with_config(sub.add_parser("cold-start", help="train without a held-out set of items, rank them"))
    p.add_argument("--fraction", type=float, default=0.05, help="share of the items held out as new")
    p.add_argument("--split-seed", type=int, default=0)
    p.set_defaults(func=cmd_cold_start)
    p = sub.add_parser("export", help="checkpoint -> ONNX + Triton model repositories")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--new-items", default=None, metavar="FILE",
                   help="JSONL/CSV of items the model never saw (id, title, attributes): served through the content "
                        "path, listed in OUT/new_items.json (docs/SERVING.md)")
    p.add_argument("--fresh-boost", type=float, default=None, metavar="B",
                   help="model.fresh_boost: add B to the score of fresh items (new items, items with at most "
                        "model.fresh_max_count training interactions); default: the checkpoint's (docs/SERVING.md)")
    p.add_argument("--fresh-max-count", type=int, default=None, metavar="N", help="model.fresh_max_count")
    p.add_argument("--fresh-neighbours", type=int, default=None, metavar="M",
                   help="model.fresh_neighbours: the boost only on the M fresh items nearest the row's anchor by "
                        "text (0: every fresh item); default: the checkpoint's")
    p.add_argument("--index", choices=("flat", "hnsw", "ivfpq"), default=None,
                   help="two-stage serving: context graph + this item index (docs/SERVING.md); default: exact graph")
    p.add_argument("--ef-search", type=int, default=128, help="hnsw search breadth")
    p.add_argument("--nprobe", type=int, default=32, help="ivfpq lists searched")
    p.add_argument("--nlist", type=int, default=0, help="ivfpq lists (0: 4 sqrt(num_items))")
    p.add_argument("--refine", type=int, default=0,
                   help="ivfpq: re-score refine x k PQ hits exactly (keeps the full vectors; 0: PQ scores only)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="instance kind of the onnxruntime flavour (KIND_GPU: CUDA execution provider); python flavour: CPU")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--instances", type=int, default=1, help="model instances per device")
    p.add_argument("--preferred-batch-sizes", type=int, nargs="*", default=[], help="dynamic batcher targets")
    p.add_argument("--ort-threads", type=int, default=1, help="ONNX Runtime intra-op threads per instance")
    p.add_argument("--graph-optimization", default="ORT_ENABLE_ALL",
                   choices=("ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC", "ORT_DISABLE_ALL"))
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("serve", help="run tritonserver on a model repository")
    p.add_argument("--repository", required=True)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.set_defaults(func=cmd_serve)
    with_config(sub.add_parser("quickstart", help="train -> eval -> export -> serve -> gRPC queries")).set_defaults(
        func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("unirank").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ERRORS as err:
        print(f"unirank {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
