"""The command line: parse arguments, call one function, print the result.

Heavy libraries (torch, transformers, datasets) are imported inside the commands that need them,
so ``hellbender --help`` and ``hellbender validate`` answer in a fraction of a second.
"""

from __future__ import annotations

import json
import sys

import click

from hellbender import __version__

# No `exists=True`: a missing file is a config error (HB000, exit 1) like any other, not a usage error.
CONFIG = click.argument("config", type=click.Path(dir_okay=False))
OVERRIDES = click.argument("overrides", nargs=-1)


def _load(config: str, overrides: tuple[str, ...]):
    """Load a config for a command that runs; print findings; exit 1 on errors."""
    from hellbender.config.findings import ConfigError
    from hellbender.config.load import load_config

    try:
        cfg, findings = load_config(config, list(overrides))
    except ConfigError as exc:
        for finding in exc.findings:
            click.echo(finding.render(), err=True)
        sys.exit(1)
    for finding in findings:
        if finding.severity != "info" or finding.code == "HB190":
            click.echo(finding.render(), err=True)
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hellbender")
def main() -> None:
    """Fine-tune open LLMs from one YAML file (Axolotl-compatible keys).

    Every command takes a CONFIG file and optional key=value overrides (dotted paths for nested
    keys, values parsed as YAML), e.g. `hellbender train cfg.yaml lora_r=16 datasets.0.path=x.jsonl`.
    """
    # Must happen before torch is imported anywhere in this process. Imported here, not at the
    # top: the config modules build the pydantic schema (~0.15 s), which `--help` never needs.
    from hellbender.config.normalize import configure_allocator_env

    configure_allocator_env()


@main.command()
@CONFIG
@OVERRIDES
@click.option("--resolved", is_flag=True, help="Also print the fully resolved config as YAML.")
@click.option("--fix", is_flag=True, help="Rewrite the YAML in place for findings with a mechanical fix.")
def validate(config: str, overrides: tuple[str, ...], resolved: bool, fix: bool) -> None:
    """Check CONFIG: print findings; exit 0 without errors, 1 with."""
    import yaml

    from hellbender.config.findings import ConfigError, has_errors
    from hellbender.config.load import load_config

    if fix and overrides:
        # the fix would be computed from the overridden values and written into the file
        click.echo("ERROR: --fix rewrites the file itself and cannot be combined with key=value overrides.")
        sys.exit(1)
    try:
        cfg, findings = load_config(config, list(overrides), strict=False)
    except ConfigError as exc:
        for finding in exc.findings:
            click.echo(finding.render())
        sys.exit(1)
    if fix:
        from hellbender.config.fix import fix_file
        from hellbender.config.load import read_config

        raw, _ = read_config(config)
        for change in fix_file(config, cfg, raw):
            click.echo(f"fixed: {change}")
        cfg, findings = load_config(config, list(overrides), strict=False)
    for finding in findings:
        click.echo(finding.render())
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    if resolved:
        click.echo("# resolved config")
        click.echo(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False))
    click.echo(f"{config}: {errors} error(s), {warnings} warning(s)")
    sys.exit(1 if has_errors(findings) else 0)


@main.command("config-schema")
def config_schema() -> None:
    """Print the JSON schema of the config."""
    from hellbender.config.schema import HellbenderConfig

    click.echo(json.dumps(HellbenderConfig.model_json_schema(), indent=2))


@main.command()
@CONFIG
@OVERRIDES
@click.option("--debug", "debug_n", type=int, default=0, metavar="N", help="Print N examples, trained tokens highlighted.")
@click.option("--rebuild", is_flag=True, help="Prepare again even if a matching cache exists.")
def preprocess(config: str, overrides: tuple[str, ...], debug_n: int, rebuild: bool) -> None:
    """Tokenize and mask the datasets of CONFIG into the cache that `train` reuses."""
    from rich.console import Console
    from rich.text import Text

    from hellbender.data.errors import DataError
    from hellbender.data.prepare import prepare_datasets
    from hellbender.data.report import format_example
    from hellbender.models.load import load_tokenizer

    cfg = _load(config, overrides)
    console = Console()
    tokenizer = load_tokenizer(cfg)
    try:
        prepared = prepare_datasets(cfg, tokenizer, rebuild=rebuild)
    except DataError as exc:
        click.echo(f"ERROR: {exc}", err=True)
        sys.exit(1)
    prepared.report.print(console)
    color = console.is_terminal and not console.no_color
    for i in range(min(debug_n, len(prepared.train))):
        row = prepared.train[i]
        title = f"example {i} ({row['length']} tokens)" + ("" if color else "; trained text in [brackets]")
        console.rule(Text(title))  # a Text, so the brackets are not read as rich markup
        shown = format_example(row["input_ids"], row["labels"], tokenizer, color=color)
        if color:
            console.print(shown)
        else:
            click.echo(shown)


def _log_to_stderr(debug: bool) -> None:
    """Show hellbender's own log lines (resume, pad token, adapter size) on stderr."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        # Resolve sys.stderr at each write: a handler holding the stream of the moment breaks
        # once that stream is swapped and closed (click's test runner does exactly that).
        @property
        def stream(self):  # type: ignore[override]
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    logger = logging.getLogger("hellbender")
    if not logger.handlers:
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        # bitsandbytes announces at import that an optional accelerated CPU kernel package is
        # missing; nothing we run uses it, and in a normal run it reads like an error.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _run_or_exit(cfg, fn, *args, **kwargs):
    """Run a command; expected failures (bad data, a stopped run, missing files) print one clear
    message and exit 1 instead of a traceback (``debug: true`` shows the traceback)."""
    from hellbender.data.errors import DataError
    from hellbender.train.loop import TrainingStopped

    _log_to_stderr(cfg.debug)
    try:
        return fn(*args, **kwargs)
    except (TrainingStopped, DataError, FileNotFoundError, ValueError) as exc:
        if cfg.debug:
            raise
        click.echo(f"ERROR: {exc}", err=True)
        sys.exit(1)


@main.command()
@CONFIG
@OVERRIDES
def train(config: str, overrides: tuple[str, ...]) -> None:
    """Fine-tune as CONFIG says; outputs (adapter or model, tokenizer, metrics, loss.png) go to output_dir."""
    from hellbender.commands.train import run_train

    cfg = _load(config, overrides)
    result = _run_or_exit(cfg, run_train, cfg)
    last = result.losses.get(result.global_step)
    summary = f"trained {result.global_step}/{result.total_steps} steps"
    if last is not None:
        summary += f", final loss {last:.4f}"
    if result.evals:
        summary += f", eval loss {result.evals[max(result.evals)]['eval_loss']:.4f}"
    click.echo(f"{summary}; outputs in {cfg.output_dir}")


@main.command()
@CONFIG
@OVERRIDES
def evaluate(config: str, overrides: tuple[str, ...]) -> None:
    """Evaluate the trained model of CONFIG (or the base model before training) on the eval split."""
    from hellbender.commands.evaluate import run_evaluate

    cfg = _load(config, overrides)
    metrics = _run_or_exit(cfg, run_evaluate, cfg)
    click.echo(json.dumps(metrics, indent=2))


@main.command("merge-lora")
@CONFIG
@OVERRIDES
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Destination (default output_dir/merged).")
def merge_lora(config: str, overrides: tuple[str, ...], out_dir: str | None) -> None:
    """Fold the trained LoRA adapter into the base weights; write a plain Hugging Face model folder."""
    from hellbender.commands.merge_lora import run_merge_lora

    cfg = _load(config, overrides)
    path = _run_or_exit(cfg, run_merge_lora, cfg, out_dir)
    click.echo(f"merged model written to {path}")


@main.command()
@CONFIG
@OVERRIDES
@click.option("--prompt", default=None, help="The user message; without it, every line of stdin is one prompt.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy (reproducible).")
def inference(
    config: str, overrides: tuple[str, ...], prompt: str | None, max_new_tokens: int, temperature: float
) -> None:
    """Generate with the trained model of CONFIG through its chat template, streaming tokens."""
    from hellbender.commands.inference import run_inference

    cfg = _load(config, overrides)
    _run_or_exit(cfg, run_inference, cfg, prompt, max_new_tokens=max_new_tokens, temperature=temperature)


if __name__ == "__main__":  # pragma: no cover
    main()
