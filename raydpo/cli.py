"""The `raydpo` command: parse flags into a stage config, call the stage, print its summary.

raydpo precompute --model MODEL --dataset data.json --output cache/
raydpo train --model MODEL --data cache/ --output run/
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import shlex
import sys
import typing
from collections.abc import Sequence
from typing import Any

from raydpo.config import PrecomputeConfig, TrainConfig, from_mapping, load, load_yaml, missing_required
from raydpo.console import keep_log_in, run_command
from raydpo.errors import RaydpoError

PRECOMPUTE_SHORT_HELP = "compute the reference log-probs once and cache them as Parquet"
TRAIN_SHORT_HELP = "train the policy with DPO on a precompute output (Ray Train + DeepSpeed ZeRO-3)"


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field, typed from its annotation, with the help and choices of its metadata
    (the config checks the choices, so a wrong value gets the same one-line error from flags and YAML)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, kind, help_text = _flag(f.name), _base_type(hints[f.name]), f.metadata["help"]
        help_text += " (required)" if f.default is dataclasses.MISSING else f" (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        choices, metavar = f.metadata.get("choices"), None
        if typing.get_origin(kind) is list:  # comma-separated values
            metavar = f"{f.name.upper()}[,...]"
            help_text += f" One or more of: {', '.join(choices)}." if choices else ""
        elif choices:
            metavar = "{" + ",".join(map(str, choices)) + "}"
        parser.add_argument(
            flag, dest=f.name, type=_parser_for(kind), default=None, metavar=metavar, help=help_text
        )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _parser_for(kind: Any):
    if typing.get_origin(kind) is list:  # comma-separated: --loss-type sigmoid,sft --loss-weights 1,0.2
        item = _parser_for(typing.get_args(kind)[0])

        def parse_list(text: str):
            return [item(part.strip()) for part in text.split(",") if part.strip()]

        parse_list.__name__ = "list"
        return parse_list
    if kind in (int, float):

        def parse(text: str):
            return None if text.lower() in ("none", "null") else kind(text)

        parse.__name__ = kind.__name__
        return parse
    return str


def _config(cls: type, args: argparse.Namespace, section: str):
    """YAML (a `section:` mapping or flat) < --set overrides (`section.key=v` or `key=v`) < flags; for
    `train`, a job config's `precompute:` section first, as the job reads it."""
    values = load(args.config, args.set or [], section)
    if section == "train" and args.config:
        from raydpo.job import train_defaults

        precompute = load_yaml(args.config).get("precompute")
        if isinstance(precompute, dict):
            precompute = {key.replace("-", "_"): value for key, value in precompute.items()}
            values = {**train_defaults(precompute), **values}
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    values.update({name: value for name, value in flags.items() if value is not None})
    missing = missing_required(cls, values)
    if missing:
        raise RaydpoError(f"{_flag(missing[0])} is required")
    return from_mapping(cls, values)


def train_command(precompute: PrecomputeConfig) -> str:
    """`raydpo train` on this precompute's output, with the settings training takes from it (as the job
    does: `job.TRAIN_FROM_PRECOMPUTE`) where they differ from training's defaults."""
    from raydpo.job import TRAIN_FROM_PRECOMPUTE

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    words = ["raydpo", "train"]
    for ours, theirs in TRAIN_FROM_PRECOMPUTE.items():
        value = getattr(precompute, theirs)
        if ours in ("model", "data") or value != defaults[ours]:
            words += [_flag(ours)] if value is True else [_flag(ours), shlex.quote(str(value))]
    return " ".join(words)


def config_reference() -> str:
    """The configuration reference in the README: one table per stage, generated from the dataclasses."""
    blocks = []
    for name, cls in (("precompute", PrecomputeConfig), ("train", TrainConfig)):
        rows = [
            f"### `raydpo {name}` / `{cls.__name__}`",
            "",
            "| key / flag | default | meaning |",
            "| --- | --- | --- |",
        ]
        for f in dataclasses.fields(cls):
            default = "required" if f.default is dataclasses.MISSING else repr(f.default)
            meaning = f.metadata["help"].replace("|", "\\|")
            if "choices" in f.metadata:
                meaning += " Choices: " + ", ".join(f"`{choice}`" for choice in f.metadata["choices"]) + "."
            rows.append(f"| `{f.name}` / `{_flag(f.name)}` | `{default}` | {meaning} |")
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydpo",
        description="Preference tuning (DPO) at cluster scale on Ray: precompute reference log-probs once, "
        "then train the policy alone.",
    )
    from raydpo import __version__

    parser.add_argument("--version", action="version", version=f"raydpo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cls, short_help in (
        ("precompute", PrecomputeConfig, PRECOMPUTE_SHORT_HELP),
        ("train", TrainConfig, TRAIN_SHORT_HELP),
    ):
        sub = commands.add_parser(name, help=short_help, description=short_help)
        sub.add_argument(
            "--config", help=f"YAML file whose keys mirror these flags (a `{name}:` section or flat)"
        )
        sub.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)"
        )
        _add_config_flags(sub, cls)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return commands.choices[command]


def _unknown_flags(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """`unrecognized arguments: --modle x (did you mean --model?)`."""
    known = [option for action in parser._actions for option in action.option_strings]
    close = [
        match
        for word in unknown
        if word.startswith("--")
        for match in difflib.get_close_matches(word.split("=")[0], known, n=1)
    ]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unrecognized arguments: {' '.join(unknown)}{hint}"


REFERENCE_START, REFERENCE_END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def write_config_reference(path: str) -> None:
    """Replace the generated section of a Markdown file (between the markers) with `config_reference()`."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    start, end = text.index(REFERENCE_START) + len(REFERENCE_START), text.index(REFERENCE_END)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text[:start] + config_reference() + text[end:])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--write-config-reference"] and len(argv) == 2:
        write_config_reference(argv[1])
        return 0
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # answered by the subcommand, whose usage lists its flags
        _subparser(parser, args.command).error(_unknown_flags(unknown, _subparser(parser, args.command)))

    def command() -> None:
        if args.command == "precompute":
            from raydpo.precompute_stage import precompute

            config = _config(PrecomputeConfig, args, "precompute")
            keep_log_in(config.output)
            print(precompute(config).summary())
            print(f"next: {train_command(config)}")
        else:
            from raydpo.train_stage import train

            config = _config(TrainConfig, args, "train")
            keep_log_in(config.output)
            print(train(config).summary())

    return run_command(f"raydpo {args.command}", command, log=args.command)


if __name__ == "__main__":
    sys.exit(main())
