"""`stream-rl` command line."""

from __future__ import annotations

import argparse
import json
import os

import msgspec
import logging
import sys


def _cores(text: str) -> list[int]:
    from stream_rl.placement import PlacementError, parse_cores

    try:
        return parse_cores(text)
    except PlacementError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _ints(flag: str, text: str) -> list[int]:
    """A comma-separated list of integers for `flag`, or a BenchSetupError naming it."""
    from benchmarks.common import BenchSetupError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchSetupError(f"{flag} must be comma-separated integers (got {text!r})") from None
    if not values:
        raise BenchSetupError(f"{flag} names no value")
    return values


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")


def _add_export_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export-rollouts", default=None, metavar="DIR",
                   help="write every trained batch as Parquet, DIR/step_NNNNNN.parquet (sets run.export_rollouts; "
                        "relative to the current directory)")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and its options (tests parse rendered launch commands with it)."""
    parser = argparse.ArgumentParser(prog="stream-rl", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare-tiny", help="build the tiny tokenizer, model, task and warm start (cached)")
    p.add_argument("--out", default=".cache/tiny")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--rebuild", action="store_true",
                   help="train the warm start here instead of loading the shipped one (~4 min on 2 cores)")

    p = sub.add_parser("train", help="train a policy with streamed rollouts")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="run directory (default: run.out_dir)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--launcher", choices=["local", "ray"], default=None,
                   help="where the roles start: this host, or actors on a running Ray cluster (default: the "
                        "config's `launch`; docs/cluster.md)")
    p.add_argument("--external-learner", action="store_true",
                   help="start no learner: serve the one at learner.addr (a `RolloutSource` of your own "
                        "loop; docs/own-learner.md)")
    _add_export_arg(p)

    p = sub.add_parser("generator", help="run a generator service (vLLM engine behind ZMQ)")
    _add_config_args(p)
    p.add_argument("--index", type=int, default=0, help="which of generator.count (its addresses follow)")
    p.add_argument("--engine-cpus", type=_cores, default=None,
                   help="cores for the vLLM engine's own processes, e.g. 0-3 (CPU engines; see generator.engine_cpus)")
    p.add_argument("--front-cpus", type=_cores, default=None,
                   help="cores for this process once its engine has started")

    p = sub.add_parser("learner", help="run the learner (under torchrun for several ranks)")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="run directory (default: run.out_dir)")
    p.add_argument("--resume", default=None, help="checkpoint directory to start from")

    p = sub.add_parser("controller", help="run the controller (pruner, buffer, the job) against running "
                                          "generators and learner")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="run directory (default: run.out_dir)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT "
                                                          "(start the learner with --resume OUT/checkpoint)")
    _add_export_arg(p)

    p = sub.add_parser("plot", help="PNG charts of a run's metrics (OUT/plots)")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="where to write the charts (default: RUN_DIR/plots)")

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    p.add_argument("what", choices=["generation", "pruning", "learner", "weight-sync", "e2e", "correction",
                                     "pruning-bound", "profile", "controller", "own-learner", "sparsity"])
    _add_config_args(p)
    p.add_argument("--json", dest="out_json", default=None, help="also write the JSON result here")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per mode (generation: timed steps, default 10; pruning: training steps, default 40; "
                        "learner: timed repeats per configuration after 1 warm-up, default 3; "
                        "weight-sync: timed syncs per backend after 1 warm-up, default 5; "
                        "e2e: training steps per system, default 40; profile: training steps, default 40; "
                        "correction: pruning draws, default 2000; sparsity: training steps per system, default 40)")
    p.add_argument("--warmup-steps", type=int, default=2, help="generation: untimed steps per mode first")
    p.add_argument("--modes", default="random,arrol", help="pruning: pruner modes to train, in order")
    p.add_argument("--systems", default="sync,stream,stream_nopruning,trl", help="e2e: systems to train, in order")
    p.add_argument("--keep", default=None, help="e2e, own-learner: keep each run's directory under this one")
    p.add_argument("--pairs", type=int, default=1, help="own-learner: interleaved pairs of runs")
    p.add_argument("--eval-every", type=int, default=10,
                   help="e2e: snapshot every N steps and score each on the held-out prompts; time to reward "
                        "is measured on that curve (0: on the training reward)")
    p.add_argument("--eval-samples", type=int, default=4, help="e2e: sampled responses per held-out prompt")
    p.add_argument("--no-capacity", dest="capacity", action="store_false",
                   help="e2e, generation: skip measuring the raw engine's capacity beside the systems")
    p.add_argument("--seeds", default=None,
                   help="e2e: comma-separated run.seed values; the comparison runs once per seed and is pooled "
                        "over them (default: one run at the config's seed)")

    p.add_argument("--windows", default="256,64,16",
                   help="sparsity: attention windows to time on the long-context workload (0: dense)")
    p.add_argument("--fixed-window", type=int, default=None,
                   help="sparsity: the fixed (high-sparsity) system's window (default: the smallest of --windows)")
    p.add_argument("--tail-target", type=float, default=None,
                   help="sparsity: the schedule's target for the tail quantile, nats (default: sparsity.target)")
    p.add_argument("--settle-steps", type=int, default=5,
                   help="sparsity: steps after the schedule's warm-up left out of its tracking error")
    p.add_argument("--requests", type=int, default=128, help="sparsity: rollouts per long-context batch")
    p.add_argument("--tokens", type=int, default=None,
                   help="sparsity: tokens per long-context rollout (default: up to model.max_model_len)")
    p.add_argument("--rounds", type=int, default=2, help="sparsity: interleaved rounds over the windows")
    p.add_argument("--no-train", dest="train", action="store_false",
                   help="sparsity: the long-context workload only")

    p.add_argument("--models", default=None,
                   help="pruning-bound: comma-separated model directories (default: model.path)")
    p.add_argument("--samples", type=int, default=None,
                   help="pruning-bound: sampled rollouts per held-out prompt (default: generator.group_size)")

    p.add_argument("--connections", default="1,8,32,64",
                   help="controller: generator connection counts to ramp, in order")
    p.add_argument("--wire", default="batch",
                   help="controller: wire formats to measure, interleaved: batch (a TokenBatch per engine step, as the "
                        "generator sends), chunk (one message per chunk, as before)")
    p.add_argument("--load-procs", type=int, default=1, help="controller: load-generator processes")
    p.add_argument("--request-rate", type=float, default=60.0,
                   help="controller: tokens/s of one running request; a connection runs offered rate / this many")
    p.add_argument("--quick", action="store_true", help="controller: short trials and one bisection (tests)")

    p = sub.add_parser("simulate", help="the real schedulers on a virtual clock, engines and learner replaced by "
                                        "cost models (JSON; docs/simulator.md)")
    _add_config_args(p)
    p.add_argument("--mode", default=None, help="comma-separated modes to simulate (default: the config's)")
    p.add_argument("--engines", type=int, default=None, help="simulated engines (default: generator.count)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--costs", default=None,
                   help="cost model: 'h100' (the H100-class preset) or a bench e2e --keep DIR to fit "
                        "(default: a small CPU-like model)")
    p.add_argument("--validate", default=None, metavar="RUN_DIR_OR_JSON",
                   help="fit the costs to a real `bench e2e --keep DIR --json FILE` run and compare sync and "
                        "stream with it (max_rel_error)")
    p.add_argument("--contention-from", default=None, metavar="OTHER_RUN",
                   help="--validate: fit the engine's slowdown while the learner trains (the CPU box's shared "
                        "core) on another run's stream system, and validate with it")
    p.add_argument("--drift", action="store_true",
                   help="--validate: scale the engine fitted on sync by sync's capacity probe over the validated "
                        "system's (the machine's drift between them)")
    p.add_argument("--reproduce", action="store_true",
                   help="APRIL's rollout-throughput gain and the async-vs-sync speedup, H100-class costs")
    p.add_argument("--project", action="store_true",
                   help="stream vs sync (with and without ARRoL) on 8, 64 and 256 engines, H100-class costs")
    p.add_argument("--json", dest="out_json", default=None, help="also write the JSON result here")

    p = sub.add_parser("eval", help="k samples per question: pass@1, pass@k, majority, quality-head and "
                                    "DeepConf votes (JSON)")
    p.add_argument("--checkpoint", required=True,
                   help="a learner checkpoint (OUT/checkpoint) or a model directory (OUT/final_model)")
    p.add_argument("--config", default=None, help="YAML config (default: the run's config.json beside --checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--data", default=None, help="questions (JSONL, parquet, datasets; default: eval.jsonl beside "
                                                "data.path)")
    p.add_argument("--k", type=int, default=None, help="candidates per question (default: eval.k)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--json", dest="out_json", default=None, help="also write the JSON result here")
    p.add_argument("--details", action="store_true", help="per-question candidates and votes in the JSON")

    p = sub.add_parser("check-config", help="validate a config, its model, tokenizer and data as a job would "
                                             "before starting; print the config resolved and what was found")
    _add_config_args(p)
    p.add_argument("--config-only", action="store_true",
                   help="only the config file: do not load the model's config, tokenizer or data")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.cmd == "eval" and args.config is None:
        from stream_rl.eval.checkpoint import CheckpointError, default_config

        try:
            args.config = str(default_config(args.checkpoint))
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    from stream_rl.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides) if hasattr(args, "config") else None
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    if args.cmd in ("train", "controller", "generator", "learner"):
        from stream_rl.roles import exit_on_sigterm

        exit_on_sigterm(args.cmd)
    if args.cmd == "prepare-tiny":
        from stream_rl.tiny.prepare import prepare_tiny

        prepare_tiny(args.out, force=args.force, rebuild=args.rebuild)
    elif args.cmd == "check-config":
        from stream_rl.config import config_to_dict

        print(json.dumps(config_to_dict(cfg), indent=2))
        if not args.config_only:
            from stream_rl.data import DataError
            from stream_rl.preflight import check_engine, check_job, summary

            try:
                job = check_job(cfg)
                problem = check_engine(job)
            except (ConfigError, DataError) as err:
                print(f"config error: {err}", file=sys.stderr)
                return 2
            if problem:
                print(f"config error: {problem}", file=sys.stderr)
                return 2
            print(json.dumps({"checked": summary(job)}, indent=2))
    elif args.cmd == "generator":
        from stream_rl.generator.service import serve

        if not 0 <= args.index < cfg.generator.count:
            print(f"config error: --index {args.index} is not below generator.count={cfg.generator.count}",
                  file=sys.stderr)
            return 2
        serve(cfg, args.index, args.engine_cpus, args.front_cpus)
    elif args.cmd == "learner":
        from stream_rl.learner.service import serve as serve_learner

        serve_learner(cfg, args.out or cfg.run.out_dir, args.resume)
    elif args.cmd == "plot":
        from stream_rl.plot import plot_run

        try:
            paths = plot_run(args.run_dir, args.out)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print("\n".join(str(p) for p in paths))
    elif args.cmd == "bench":
        steps = args.steps if args.steps is not None else {"generation": 10, "pruning": 40, "learner": 3,
                                                              "weight-sync": 5, "e2e": 40,
                                                              "correction": 2000, "pruning-bound": 1, "profile": 40,
                                                              "controller": 1, "own-learner": 40,
                                                              "sparsity": 40}[args.what]
        if steps < 1 or args.warmup_steps < 0:
            print("config error: --steps must be >= 1 and --warmup-steps >= 0", file=sys.stderr)
            return 2
        from benchmarks.common import BenchSetupError

        try:
            if args.what == "generation":
                from benchmarks.generation import main as bench_generation

                bench_generation(cfg, args.out_json, steps, args.warmup_steps, args.capacity)
            elif args.what == "learner":
                from benchmarks.learner import main as bench_learner

                bench_learner(cfg, args.out_json, steps)
            elif args.what == "e2e":
                from benchmarks.e2e import main as bench_e2e

                seeds = _ints("--seeds", args.seeds) if args.seeds is not None else None
                bench_e2e(cfg, args.out_json, steps, [s.strip() for s in args.systems.split(",") if s.strip()],
                          args.keep, args.eval_every, args.eval_samples, seeds, args.capacity)
            elif args.what == "correction":
                from benchmarks.correction import main as bench_correction

                bench_correction(cfg, args.out_json, steps)
            elif args.what == "profile":
                from benchmarks.profile import main as bench_profile

                bench_profile(args.config, args.overrides, args.out_json, steps)
            elif args.what == "pruning-bound":
                from benchmarks.pruning_bound import main as bench_pruning_bound

                if args.samples is not None and args.samples < 1:
                    raise BenchSetupError(f"--samples must be >= 1 (got {args.samples})")
                models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
                bench_pruning_bound(cfg, args.out_json, models, args.samples)
            elif args.what == "controller":
                from benchmarks.controller import main as bench_controller
                from benchmarks.controller import options

                bench_controller(cfg, args.out_json, options(args.connections, args.wire, args.load_procs,
                                                             args.request_rate, args.quick))
            elif args.what == "own-learner":
                from benchmarks.own_learner import main as bench_own_learner

                bench_own_learner(cfg, args.out_json, steps, args.pairs, args.keep)
            elif args.what == "sparsity":
                from benchmarks.sparsity import main as bench_sparsity

                seeds = _ints("--seeds", args.seeds) if args.seeds is not None else [cfg.run.seed]
                bench_sparsity(cfg, args.out_json, steps, _ints("--windows", args.windows), args.fixed_window,
                               args.tail_target, seeds, args.eval_samples, args.settle_steps, args.requests,
                               args.tokens, args.rounds, args.keep, args.train)
            elif args.what == "weight-sync":
                from benchmarks.weight_sync import main as bench_weight_sync

                bench_weight_sync(cfg, args.out_json, steps)
            else:
                from benchmarks.pruning import main as bench_pruning

                modes = [m.strip() for m in args.modes.split(",") if m.strip()]
                bench_pruning(cfg, args.out_json, steps, modes)
        except BenchSetupError as err:
            print(f"config error: {err}", file=sys.stderr)
            return 2
    elif args.cmd == "simulate":
        from benchmarks.simulate.cli import main as simulate_main

        if args.steps < 1 or (args.engines is not None and args.engines < 1):
            print("config error: --steps and --engines must be >= 1", file=sys.stderr)
            return 2
        simulate_main(cfg, args.out_json, args.mode, args.engines, args.steps, args.validate, args.reproduce,
                      args.project, args.costs, contention_from=args.contention_from, drift=args.drift)
    elif args.cmd == "eval":
        from stream_rl.data import DataError
        from stream_rl.eval.checkpoint import CheckpointError
        from stream_rl.eval.run import evaluate, print_table

        if (args.k is not None and args.k < 1) or (args.limit is not None and args.limit < 1):
            print("config error: --k and --limit must be >= 1", file=sys.stderr)
            return 2
        try:
            summary = evaluate(cfg, args.checkpoint, args.data, args.k, args.limit, args.out_json,
                               details=args.details)
        except (CheckpointError, ConfigError, DataError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print_table(summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "per_question"}, indent=2))
    elif args.cmd in ("train", "controller"):
        from stream_rl.controller.launch import connect, train

        if args.max_steps is not None and args.max_steps < 1:
            print("config error: --max-steps must be >= 1", file=sys.stderr)
            return 2
        from stream_rl.data import DataError
        from stream_rl.generator.client import GeneratorError
        from stream_rl.learner.client import LearnerError

        from stream_rl.cluster.ray_job import RayError, train_on_ray

        if args.cmd == "train" and args.launcher:
            cfg = msgspec.structs.replace(cfg, launch=args.launcher)
        if args.export_rollouts:
            cfg = msgspec.structs.replace(cfg, run=msgspec.structs.replace(
                cfg.run, export_rollouts=os.path.abspath(args.export_rollouts)))
        run = connect if args.cmd == "controller" else train_on_ray if cfg.launch == "ray" else train
        external = {"external_learner": True} if getattr(args, "external_learner", False) else {}
        if external and run is not train:
            print("error: --external-learner starts the roles on this host (launch: local)", file=sys.stderr)
            return 2
        try:
            summary = run(cfg, args.out, args.max_steps, resume=args.resume, **external)
        except (ConfigError, DataError, FileNotFoundError, RayError) as err:  # found before anything ran
            print(f"error: {err}", file=sys.stderr)
            return 2
        except (GeneratorError, LearnerError) as err:  # a role failed while the job ran
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
