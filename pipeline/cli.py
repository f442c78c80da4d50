"""`python -m pipeline ...`: the command line of docs/contracts.md."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from pipeline import console, ray_session
from core.config import DEFAULT_CONFIG
from core.errors import PipelineError, Terminated


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (argparse's, for those that have one)."""


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("larpo-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that owns unrecognized arguments: a mistyped flag gets that
    subcommand's usage, not the top-level one."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if hasattr(namespace, "overrides"):
            wrong = [item for item in extra if "=" not in item or item.startswith("-")]
            if wrong:
                self.error(f"unrecognized arguments: {' '.join(wrong)}")
            namespace.overrides = list(namespace.overrides) + extra
            extra = []
        return namespace, extra


def build_parser() -> argparse.ArgumentParser:
    # `larpo` (the console script of pyproject.toml) and `python -m pipeline` are the same command.
    prog = "larpo" if Path(sys.argv[0]).name == "larpo" else "python -m pipeline"
    parser = argparse.ArgumentParser(prog=prog, description="LarPO iterative alignment rounds",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    for name, help_text in (("round", "run round N (round N-1 must be finished)"),
                            ("rounds", "run rounds 1..N, skipping finished ones")):
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        sub.add_argument("number", type=int, help="the round to run (round) or the last round to run (rounds)")
        sub.add_argument("--config", default=str(DEFAULT_CONFIG),
                         help="the run's YAML config; its relative paths are read from its own directory (the "
                              "project's for the bundled configs), those of key=value overrides from here")
        sub.add_argument("--run", default="default", help="run name: the directory under the output root")
        sub.add_argument("--output", help="output root (overrides the config's `output`)")
        sub.add_argument("--verbose", action="store_true",
                         help="also show vLLM's, Ray's and the workers' output live (always in runs/<run>/logs/)")
        sub.add_argument("--dry-run", action="store_true",
                         help="show the plan (resolved config, prompts, stages to run or skip, estimated work) "
                              "and write nothing")
        sub.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                         help="config overrides, e.g. train.beta=0.2 (`larpo config` lists every key)")

    sub = commands.add_parser("config", help="every config key with its default and help, or the resolved config "
                              "of a file plus overrides", formatter_class=HelpFormatter)
    sub.add_argument("--config", help="a YAML config to resolve (default: list every key instead)")
    sub.add_argument("overrides", nargs="*", metavar="key=value", default=[], help="config overrides")

    commands.add_parser("prepare-models", help="convert the embedded default model and build the tiny test model")

    sub = commands.add_parser("inspect", help="what the reranker did in one round: counts, rewards, example lists",
                              formatter_class=HelpFormatter)
    sub.add_argument("round_dir", help="a round directory, e.g. runs/default/round_001")
    sub.add_argument("--examples", type=int, default=3, help="prompts shown with their positives and negatives")

    sub = commands.add_parser("diff", help="the held-out answers that lost against round 0, with their constraints",
                              formatter_class=HelpFormatter)
    sub.add_argument("round_dir", help="a round directory, e.g. runs/default/round_003")
    sub.add_argument("--limit", type=int, default=10, help="how many of the worst losses to show")

    sub = commands.add_parser("sample", help="what a round's policy answers now: sample a prompt with vLLM",
                              formatter_class=HelpFormatter)
    sub.add_argument("round_dir", help="a round directory whose policy/ is finished, e.g. runs/default/round_001")
    sub.add_argument("prompt", help="the user message")
    sub.add_argument("-n", "--samples", type=int, default=1, help="answers to draw")
    sub.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the evaluate stage answers")
    sub.add_argument("--max-tokens", type=int, default=256, help="longest answer, in tokens")

    sub = commands.add_parser("report", help="a table and a PNG plot of every round of a run",
                              formatter_class=HelpFormatter)
    sub.add_argument("run_dir", help="a run directory, e.g. runs/default")

    sub = commands.add_parser("export", help="ranked lists as a preference dataset (prompt, chosen, rejected) "
                              "for TRL and other trainers", formatter_class=HelpFormatter)
    sub.add_argument("source", help="a round directory (runs/<run>/round_001) or a run directory (every round)")
    sub.add_argument("--format", choices=("trl", "hf"), default="trl",
                     help="trl: one Parquet file in TRL's conversational format; hf: a datasets save_to_disk directory")
    sub.add_argument("--pairs", choices=("best-worst", "all"), default="best-worst",
                     help="best-worst: each list's best positive against its worst negative; all: every "
                          "positive against every negative")
    sub.add_argument("--out", help="where to write (default: <source>/export/preferences-<pairs>[.parquet]); "
                     "an existing path is replaced only if an earlier export of the same format wrote it")
    sub.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out that is not an earlier export (never a run or the source)")
    return parser


def run_command(args: argparse.Namespace) -> int:
    # Imported when used, so that `inspect` or `report` does not pay for Ray and vLLM.
    if args.command == "prepare-models":
        from core.models import prepare_embedded_models

        prepare_embedded_models()
        return 0
    if args.command == "inspect":
        from pipeline.inspect_round import main as inspect_main

        return inspect_main(args)
    if args.command == "export":
        from pipeline.export import main as export_main

        return export_main(args)
    if args.command == "report":
        from pipeline.report import main as report_main

        return report_main(args)
    if args.command == "diff":
        from pipeline.diff_round import main as diff_main

        return diff_main(args)
    if args.command == "sample":
        from pipeline.sample_policy import main as sample_main

        return sample_main(args)
    if args.command == "config":
        from pipeline.plan_view import config_main

        return config_main(args)
    return run_rounds(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`--run x train.beta=0.2`), which argparse leaves
    # unparsed: CommandParser takes them, and refuses anything else left over.
    args = parser.parse_args(argv)
    if args.command in ("round", "rounds"):
        console.configure(verbose=args.verbose)
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run_command(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# Whether this process was connected to Ray before the command began (a notebook's, a test's): then
# that Ray is not the command's to shut down.
_ray_was_up: list[bool] = []


# The SIGTERM received, if one was: Ray's blocking calls (ray.get, ray.wait) turn any
# KeyboardInterrupt raised inside them into a plain one, so the exception may not carry it.
_terminated: list[int] = []


def _terminate(signum, frame) -> None:
    _terminated.append(signum)
    raise Terminated(signum)


def stop_ray(log_file: Path | None = None) -> None:
    """Shut down the Ray this command started or joined, then end any process the command started
    that is still running: actors, Ray Train workers, and Ray's agents orphaned by a lost raylet.

    Ray's last words (the workers' output it forwards while stopping) go to `log_file`, not the terminal.
    """
    import ray

    ray_session.stop_watching()
    if ray.is_initialized() and not _ray_was_up:
        with console.capture(log_file) if log_file else nullcontext():
            ray.shutdown()
    ray_session.stop_descendants()


def interrupted(signum: int, log_file: Path) -> int:
    from pipeline import driver  # loaded already: a round was running

    stop_ray(log_file)
    name = signal.Signals(signum).name
    print(f"error: interrupted ({name}) during {driver.activity}; run the same command to resume", file=sys.stderr)
    return 128 + signum


def ray_lost(run_dir: Path):
    """What the command does when its Ray loses its GCS or raylet: one line, nothing left running, exit 2.

    Called from the watching thread, while the main thread may be stuck in a Ray call that
    would only return (or end the process with status 1, saying nothing) a minute later."""
    def end_command(lost) -> None:
        from pipeline import driver  # loaded already: this runs only once a round has started Ray

        line = (f"error: Ray's {lost.name} (pid {lost.pid}) died during {driver.activity}; its logs are in "
                f"{lost.logs}; run the same command to resume")
        try:
            try:
                with (run_dir / "pipeline.log").open("a") as f:
                    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR pipeline: {line[len('error: '):]}\n")
                print(line, file=console.TERMINAL, flush=True)
            finally:  # a closed terminal or a full disk must not keep the command from ending
                ray_session.stop_descendants()
        finally:
            os._exit(2)

    return end_command


def run_rounds(args: argparse.Namespace) -> int:
    # Here, as in run_command: the driver, the engines and the trackers bring Ray, vLLM and torch.
    from core.layout import RunLayout
    from pipeline.driver import plan_round, run_round
    from pipeline.lock import run_lock
    from pipeline.plan_view import summary_line
    from pipeline.settings import load_config
    from pipeline.tracking import Tracking
    from pools.vllm_engines import EnginePool

    overrides = list(args.overrides) + ([f"output={args.output}"] if args.output else [])
    config = load_config(args.config, overrides)
    if args.dry_run:
        from pipeline.plan_view import dry_run_main

        return dry_run_main(args, config)
    first = 1 if args.command == "rounds" else args.number
    run = RunLayout.at(config.output, args.run)
    run.ensure_writable()
    signal.signal(signal.SIGTERM, _terminate)
    # Ray's processes, and what Ray Train and vLLM start, are this command's to stop (stop_ray).
    import ray

    if ray.is_initialized():
        _ray_was_up.append(True)
    ray_session.adopt_orphans()
    ray_session.watch_ray(ray_lost(run.dir))
    # Log-file writes that fail (a full disk) must not print tracebacks over the one-line error.
    logging.raiseExceptions = False
    tracking = Tracking(run, config.tracking, config.to_dict()) if config.tracking else None
    # One set of vLLM engines for every round of the command (generate.keep_engines).
    engines = EnginePool(config)
    shutdown_log = run.dir / "logs" / "ray-shutdown.log"
    try:
        with run_lock(run.dir):
            for number in range(first, args.number + 1):
                plan = plan_round(config, args.run, number, engines)
                metrics = run_round(plan, tracking)
                print(summary_line(metrics, plan.round.dir))
    except KeyboardInterrupt:  # Terminated (SIGTERM) included
        return interrupted(_terminated[0] if _terminated else signal.SIGINT, shutdown_log)
    finally:
        with console.capture(shutdown_log) if ray.is_initialized() else nullcontext():
            engines.close()
        if tracking:
            with console.capture(run.dir / "logs" / "tracking.log"):
                tracking.close()
        stop_ray(shutdown_log)
    return 0
