"""The command line: parse arguments, call one function, print the result.

Heavy libraries (torch, transformers, datasets) are imported inside the commands that need them,
so ``hellbender --help`` and ``hellbender validate`` answer in a fraction of a second.

Every command reports failures the same way (:func:`_reports_errors`):

* a :class:`~hellbender.errors.HellbenderError` (bad config, data, files, model choice, a missing
  package or GPU, a full disk) prints ``ERROR: <message>`` on stderr and exits 1 — and so does an
  ``OSError`` that is the machine's problem (no space, a quota, a permission, a read-only disk); a
  :class:`~hellbender.config.findings.ConfigError` prints its findings. With ``debug: true`` in the
  config the exception is raised instead, so its traceback shows;
* any other exception is a bug, in hellbender or in a library it uses: its traceback goes to a new
  ``hellbender-crash-<time>-<pid>.log`` (in ``output_dir`` when that folder exists, else in the
  system's temporary folder), one line names the exception and the file, and the exit code is 2;
* Ctrl-C exits 130, as interrupted programs do, without a crash file.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from hellbender import __version__
from hellbender.errors import HellbenderError

if TYPE_CHECKING:
    from hellbender.config.schema import ResolvedConfig

# No `exists=True`: a missing file is a config error (HB000, exit 1) like any other, not a usage error.
# Any path: a folder or a missing file is HB000 from load_config (exit 1, like every config
# mistake), not a click usage error (exit 2).
CONFIG = click.argument("config", type=click.Path())
OVERRIDES = click.argument("overrides", nargs=-1)
ALLOW_UNKNOWN = click.option(
    "--allow-unknown",
    is_flag=True,
    help="Unknown keys are warnings, not errors (as `strict: false` in the config; for migrating).",
)

EXIT_USER_ERROR = 1
EXIT_BUG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C
CRASH_FILE_PREFIX = "hellbender-crash-"
BUG_NOTICE = "this is a bug in hellbender or a library it uses"
# Keys of click's per-invocation ``ctx.meta``: what the error report knows of the loaded config.
_DEBUG = "hellbender.debug"
_OUTPUT_DIR = "hellbender.output_dir"


def _remember(cfg: Any) -> None:
    """Tell this command's error report whether to show tracebacks and where output_dir is."""
    meta = click.get_current_context().meta
    meta[_DEBUG] = bool(getattr(cfg, "debug", False))
    meta[_OUTPUT_DIR] = getattr(cfg, "output_dir", None)


def _crash_folders(output_dir: str | None) -> list[Path]:
    """Where a crash file may go, best first: an existing output_dir, then the temporary folder."""
    import tempfile

    folders = []
    if output_dir:
        try:
            out = Path(output_dir).expanduser()
            if out.is_dir():
                folders.append(out)
        except (OSError, RuntimeError):  # RuntimeError: "~user" with no such user
            pass
    folders.append(Path(tempfile.gettempdir()))
    return folders


def _write_crash_file(exc: BaseException, output_dir: str | None) -> Path | None:
    """Write the traceback of ``exc`` (with the command and versions) to a new crash file.

    Returns its path, or None when no folder would take it. The name holds the time and the process
    id, and the file is created exclusively, so a report never overwrites an earlier one.
    """
    import platform
    import time
    import traceback

    versions = [f"hellbender {__version__}", f"python {platform.python_version()}", platform.platform()]
    for name in ("torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes"):
        module = sys.modules.get(name)  # only what this run imported: a crash report imports nothing
        if module is not None:
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = f"command: {' '.join(sys.argv)}\nversions: {', '.join(versions)}\n\n{trace}"
    stem = f"{CRASH_FILE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for folder in _crash_folders(output_dir):
        for n in range(100):
            path = folder / (f"{stem}.log" if n == 0 else f"{stem}-{n}.log")
            try:
                with path.open("x", encoding="utf-8", errors="backslashreplace") as fh:
                    fh.write(text)
            except FileExistsError:
                continue
            except OSError:
                break  # not writable: try the next folder
            return path.resolve()
    return None


def _exception_name(exc: BaseException) -> str:
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _report_bug(exc: Exception, output_dir: str | None, debug: bool) -> NoReturn:
    """An exception no check of hellbender anticipated: keep its traceback, say where, exit 2."""
    import traceback

    message = " ".join(str(exc).split())
    if len(message) > 500:
        message = message[:499] + "…"
    what = f"{_exception_name(exc)}: {message}" if message else _exception_name(exc)
    path = _write_crash_file(exc, output_dir)
    if debug or path is None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    where = f"the traceback is in {path}" if path else "the traceback is above (no crash file was written)"
    click.echo(f"ERROR: {what} — {BUG_NOTICE}; {where}", err=True)
    sys.exit(EXIT_BUG)


def _machine_problem(exc: Exception) -> str | None:
    """The message of an OSError that is the machine's, not a bug: a full disk or quota, a
    permission, a read-only filesystem — raised where hellbender does not wrap it (a library's
    own write). None for any other exception (and for hellbender's own errors, already worded)."""
    import errno

    if isinstance(exc, HellbenderError) or not isinstance(exc, OSError):
        return None
    what = {
        errno.ENOSPC: "disk full (no space left on device)",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied (operation not permitted)",
        errno.EROFS: "read-only file system",
    }.get(exc.errno or 0)
    if what is None:
        return None
    where = " ".join(str(f) for f in (exc.filename, exc.filename2) if f) or "a file this command writes"
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = "free some space" if full else "check the path and its permissions"
    return f"{what}: {where} — {fix} (or use another folder) and run again"


def _reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` the one error path every command shares (see the module docstring)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own signals and usage errors: click reports them
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            import errno

            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # stdout closed by the reader (`| head`): click exits quietly
            meta = click.get_current_context().meta
            debug = bool(meta.get(_DEBUG))
            machine = _machine_problem(exc)
            if not isinstance(exc, HellbenderError) and machine is None:
                _report_bug(exc, meta.get(_OUTPUT_DIR), debug)
            if debug:
                raise
            from hellbender.config.findings import ConfigError

            if machine is not None:
                click.echo(f"ERROR: {machine}", err=True)
            elif isinstance(exc, ConfigError):
                for finding in exc.findings:
                    click.echo(finding.render(), err=True)
            else:
                who = f"rank {os.environ['RANK']}: " if _secondary_rank() else ""
                click.echo(f"ERROR: {who}{exc}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return run


def _load(
    config: str,
    overrides: tuple[str, ...],
    *,
    show_findings: bool = True,
    allow_unknown: bool = False,
    world_size: int | None = None,
) -> ResolvedConfig:
    """Load a config for a command that runs; print findings (exit 1 on errors); route hellbender's
    log lines to stderr at the config's verbosity. ``world_size``: the ranks about to be launched
    (default: this process's ``WORLD_SIZE``)."""
    from hellbender.config.findings import ConfigError
    from hellbender.config.load import load_config

    try:
        cfg, findings = load_config(
            config, list(overrides), allow_unknown=allow_unknown, world_size=world_size
        )
    except ConfigError as exc:
        for finding in exc.findings:
            click.echo(finding.render(), err=True)
        sys.exit(EXIT_USER_ERROR)
    _remember(cfg)
    # Under torchrun rank 0 speaks for all ranks (the others only when they fail).
    if show_findings and not _secondary_rank():
        for finding in findings:
            if finding.severity != "info" or finding.code == "HB190":
                click.echo(finding.render(), err=True)
    _log_to_stderr(cfg.debug)
    return cfg


def _secondary_rank() -> bool:
    """Every process but rank 0 of a torchrun launch (torchrun sets RANK; read here without
    importing torch, which the CLI's light paths avoid)."""
    return os.environ.get("RANK", "0").strip() not in ("", "0")


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
@click.option(
    "--world-size",
    type=click.IntRange(1, 65_536),
    default=None,
    metavar="N",
    help="Check the config for N processes (default: WORLD_SIZE, else 1), without launching any.",
)
@click.option(
    "--target",
    default=None,
    metavar="NAME",
    help="Check the config for another machine: cuda (any CUDA GPU), cpu, or a named GPU such as "
    "h100-80gb, a100-40gb, l4, t4 (default: this machine).",
)
@ALLOW_UNKNOWN
@_reports_errors
def validate(
    config: str,
    overrides: tuple[str, ...],
    resolved: bool,
    fix: bool,
    world_size: int | None,
    target: str | None,
    allow_unknown: bool,
) -> None:
    """Check CONFIG: print findings; exit 0 without errors, 1 with."""
    import yaml

    from hellbender.config.findings import ConfigError, has_errors, printable
    from hellbender.config.hardware import UnknownTarget, target_hardware
    from hellbender.config.load import check_rewritable, load_config

    hardware = None
    if target is not None:
        try:
            hardware = target_hardware(target)
        except UnknownTarget as exc:
            raise click.BadParameter(str(exc), param_hint="--target") from None
    options: dict[str, Any] = {
        "world_size": world_size,
        "strict": False,
        "hardware": hardware,
        "allow_unknown": allow_unknown,
    }

    if fix and overrides:
        # the fix would be computed from the overridden values and written into the file
        click.echo("ERROR: --fix rewrites the file itself and cannot be combined with key=value overrides.")
        sys.exit(EXIT_USER_ERROR)
    try:
        if fix:  # before reading: a pipe read once would look empty to the fix
            check_rewritable(config)
        cfg, findings = load_config(config, list(overrides), **options)
    except ConfigError as exc:
        for finding in exc.findings:
            click.echo(finding.render())
        sys.exit(EXIT_USER_ERROR)
    _remember(cfg)
    if fix:
        from hellbender.config.fix import fix_file
        from hellbender.config.load import read_config

        raw, _ = read_config(config, allow_unknown=allow_unknown)
        for change in fix_file(config, cfg, raw):
            click.echo(f"fixed: {change}")
        cfg, findings = load_config(config, list(overrides), **options)
    for finding in findings:
        click.echo(finding.render())
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    if resolved:
        click.echo("# resolved config")
        click.echo(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False))
    click.echo(f"{printable(config)}: {errors} error(s), {warnings} warning(s)")
    sys.exit(EXIT_USER_ERROR if has_errors(findings) else 0)


@main.command("config-schema")
@_reports_errors
def config_schema() -> None:
    """Print the JSON schema of the config."""
    from hellbender.config.schema import HellbenderConfig

    click.echo(json.dumps(HellbenderConfig.model_json_schema(), indent=2))


@main.command()
@CONFIG
@OVERRIDES
@click.option(
    "--debug",
    "debug_n",
    type=int,
    default=0,
    metavar="N",
    help="Print N examples, trained tokens highlighted.",
)
@click.option("--rebuild", is_flag=True, help="Prepare again even if a matching cache exists.")
@_reports_errors
def preprocess(config: str, overrides: tuple[str, ...], debug_n: int, rebuild: bool) -> None:
    """Tokenize and mask the datasets of CONFIG into the cache that `train` reuses."""
    from rich.console import Console
    from rich.text import Text

    from hellbender.data.prepare import prepare_datasets
    from hellbender.data.report import format_example
    from hellbender.models.load import load_tokenizer

    cfg = _load(config, overrides)
    console = Console()
    tokenizer = load_tokenizer(cfg)
    prepared = prepare_datasets(cfg, tokenizer, rebuild=rebuild)
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

    class CurrentStderr(logging.Handler):
        # Resolve sys.stderr at each write: a handler holding the stream of the moment breaks
        # once that stream is swapped and closed (click's test runner does exactly that).
        def emit(self, record: logging.LogRecord) -> None:
            try:
                sys.stderr.write(self.format(record) + "\n")
                sys.stderr.flush()
            except RecursionError:  # as logging.StreamHandler.emit
                raise
            except Exception:
                self.handleError(record)

    logger = logging.getLogger("hellbender")
    if not logger.handlers:
        handler = CurrentStderr()
        handler.setFormatter(
            logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s")
        )
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.ERROR if _secondary_rank() else logging.INFO)


@main.command()
@CONFIG
@OVERRIDES
@click.option(
    "--nproc-per-node",
    type=click.IntRange(1, 4096),
    default=None,
    help="Start torchrun with this many ranks per machine (DDP, or FSDP2 when the config shards).",
)
@click.option("--nnodes", default="1", show_default=True, help="Machines taking part (torchrun's --nnodes).")
@click.option("--node-rank", type=click.IntRange(0, 65535), default=None, help="This machine's index.")
@click.option("--rdzv-endpoint", default=None, help="HOST:PORT where the machines meet (several machines).")
@ALLOW_UNKNOWN
@_reports_errors
def train(
    config: str,
    overrides: tuple[str, ...],
    nproc_per_node: int | None,
    nnodes: str,
    node_rank: int | None,
    rdzv_endpoint: str | None,
    allow_unknown: bool,
) -> None:
    """Fine-tune as CONFIG says; outputs (adapter or model, tokenizer, metrics, loss.png) go to output_dir.

    One process by default. `--nproc-per-node N` runs N ranks through torchrun (the same as
    `torchrun --nproc-per-node N -m hellbender train CONFIG`).
    """
    if nproc_per_node is not None:
        from hellbender.distributed.launch import Launch, launch

        # errors once, here, for the ranks about to start (the fewest an elastic --nnodes allows);
        # rank 0 shows the rest
        world = nproc_per_node * int(nnodes.split(":")[0]) if nnodes.split(":")[0].isdigit() else None
        _load(config, overrides, show_findings=False, allow_unknown=allow_unknown, world_size=world)
        spec = Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
        launch(spec, ["train", *(["--allow-unknown"] if allow_unknown else []), config, *overrides])
        return
    from hellbender.commands.train import run_train

    cfg = _load(config, overrides, allow_unknown=allow_unknown)
    result = run_train(cfg)
    if _secondary_rank():
        return  # rank 0 says how the run went
    last = result.losses.get(result.global_step)
    summary = f"trained {result.global_step}/{result.total_steps} steps"
    if last is not None:
        summary += f", final loss {last:.4f}"
    if result.evals:
        summary += f", eval loss {result.evals[max(result.evals)]['eval_loss']:.4f}"
    diverged = f"; WARNING: the run diverged: {result.diverged}" if result.diverged else ""
    click.echo(f"{summary}; outputs in {cfg.output_dir}{diverged}")


@main.command()
@CONFIG
@OVERRIDES
@click.option(
    "--device",
    default=None,
    metavar="DEVICE",
    help="Plan for: cpu (this machine's RAM, the default), cuda, cuda:80GB, or a named GPU such as "
    "h100-80gb, a100-40gb, l4, t4.",
)
@click.option(
    "--world-size",
    "--nproc-per-node",
    "world_size",
    type=click.IntRange(1, 65_536),
    default=None,
    metavar="N",
    help="Plan for N ranks (sharding per the config's strategy); default WORLD_SIZE, else 1.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the breakdown as JSON (bytes).")
@click.option(
    "--fit", "budget", default=None, metavar="SIZE", help="The cheapest change that fits SIZE (e.g. 16GiB)."
)
@click.option("--write", is_flag=True, help="With --fit: apply the change to CONFIG (comments kept).")
@click.option(
    "--margin",
    type=click.FloatRange(0.0, 0.9),
    default=0.1,
    show_default=True,
    help="With --fit: keep this fraction of the budget free (the plan's measured error; docs/memory.md).",
)
@click.option(
    "--allow-quantized-base",
    is_flag=True,
    help="With --fit: may also propose LoRA on a 4-bit base (QLoRA), which changes what is learned.",
)
@ALLOW_UNKNOWN
@_reports_errors
def plan(
    config: str,
    overrides: tuple[str, ...],
    device: str | None,
    world_size: int | None,
    as_json: bool,
    budget: str | None,
    write: bool,
    margin: float,
    allow_quantized_base: bool,
    allow_unknown: bool,
) -> None:
    """Predict the peak memory per rank of training CONFIG, from its config and the model's
    config.json (or GGUF header) alone; with --fit, change the config until it fits."""
    import yaml

    from hellbender.commands.plan import device_target, parse_size, plan_for, render
    from hellbender.config.findings import ConfigError
    from hellbender.config.load import load_config
    from hellbender.plan.fit import fit

    if write and (budget is None or overrides):
        click.echo("ERROR: --write needs --fit, and cannot be combined with key=value overrides.", err=True)
        sys.exit(EXIT_USER_ERROR)
    target, hardware, memory = device_target(device)
    limit = parse_size(budget) if budget is not None else memory
    options: dict[str, Any] = {"world_size": world_size, "hardware": hardware, "allow_unknown": allow_unknown}
    try:
        cfg, _ = load_config(config, list(overrides), **options)
    except ConfigError as exc:
        for finding in exc.findings:
            click.echo(finding.render(), err=True)
        sys.exit(EXIT_USER_ERROR)
    shape, prediction = plan_for(cfg, target)
    if budget is None:
        if as_json:
            click.echo(json.dumps({**prediction.as_json(), "device_memory_bytes": memory}, indent=2))
        else:
            click.echo("\n".join(render(shape, prediction, cfg, memory)))
        return
    assert limit is not None
    planned_limit = int(limit * (1 - margin))
    found = fit(shape, cfg, planned_limit, target=target, allow_quantized_base=allow_quantized_base)
    if found is None:
        message = f"no combination of the memory options fits {budget} (the least predicted needs more)"
        click.echo(json.dumps({"fits": False, "budget_bytes": limit}) if as_json else f"ERROR: {message}")
        sys.exit(EXIT_USER_ERROR)
    # The winner goes through the ordinary loader: every rule sees the changed config.
    def flow(value: Any) -> str:  # one line of YAML, without the document-end marker of scalars
        return str(yaml.safe_dump(value, default_flow_style=True)).removesuffix("...\n").strip()

    changed = [f"{k}={flow(v)}" for k, v in found.changes.items()]
    try:
        checked, findings = load_config(config, [*overrides, *changed], **options)
    except ConfigError as exc:
        for finding in exc.findings:
            click.echo(finding.render(), err=True)
        sys.exit(EXIT_USER_ERROR)
    _, final = plan_for(checked, target)
    if as_json:
        click.echo(json.dumps({"fits": True, "budget_bytes": limit, "changes": found.changes,
                               "slowdown_factor": found.factor, "changes_learning": found.changes_learning,
                               "before": prediction.as_json(), "after": final.as_json()}, indent=2))
    else:
        click.echo(
            f"before: peak {prediction.peak_bytes / 2**30:.2f} GiB; budget {limit / 2**30:.2f} GiB "
            f"({margin:.0%} kept free: plan for {limit * (1 - margin) / 2**30:.2f} GiB)"
        )
        if not found.changes:
            click.echo("fits as it is: no change needed")
        for key, value in found.changes.items():
            old = getattr(cfg, key, None)
            click.echo(f"- {key}: {flow(old)}")
            click.echo(f"+ {key}: {flow(value)}")
        click.echo(f"after: peak {final.peak_bytes / 2**30:.2f} GiB in the {final.peak_phase} phase; "
                   f"predicted slowdown ×{found.factor:.2f}")
        if found.changes_learning:
            click.echo("NOTE: LoRA on a 4-bit base (QLoRA) changes what is learned (--allow-quantized-base).")
        for finding in findings:
            if finding.severity != "info":
                click.echo(finding.render())
    if write and found.changes:
        from hellbender.config.fix import set_keys

        set_keys(config, found.changes)
        click.echo(f"wrote {len(found.changes)} change(s) to {config}")


@main.command()
@CONFIG
@OVERRIDES
@_reports_errors
def evaluate(config: str, overrides: tuple[str, ...]) -> None:
    """Evaluate the trained model of CONFIG (or the base model before training) on the eval split."""
    from hellbender.commands.evaluate import run_evaluate

    cfg = _load(config, overrides)
    metrics = run_evaluate(cfg)
    click.echo(json.dumps(metrics, indent=2))


@main.command("merge-lora")
@CONFIG
@OVERRIDES
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Destination (default output_dir/merged).",
)
@_reports_errors
def merge_lora(config: str, overrides: tuple[str, ...], out_dir: str | None) -> None:
    """Fold the trained LoRA adapter into the base weights; write a plain Hugging Face model folder."""
    from hellbender.commands.merge_lora import run_merge_lora

    cfg = _load(config, overrides)
    path = run_merge_lora(cfg, out_dir)
    click.echo(f"merged model written to {path}")


@main.command()
@CONFIG
@OVERRIDES
@click.option(
    "--prompt", default=None, help="The user message; without it, every line of stdin is one prompt."
)
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy (reproducible).")
@_reports_errors
def inference(
    config: str, overrides: tuple[str, ...], prompt: str | None, max_new_tokens: int, temperature: float
) -> None:
    """Generate with the trained model of CONFIG through its chat template, streaming tokens."""
    from hellbender.commands.inference import run_inference

    cfg = _load(config, overrides)
    run_inference(cfg, prompt, max_new_tokens=max_new_tokens, temperature=temperature)


if __name__ == "__main__":  # pragma: no cover
    main()
