"""`talkinghead <command>`: dispatch to the module that implements each command.

Only the chosen command's module is imported, so `talkinghead serve` never loads torch or the
training code, and the client commands (avatar, animate, bench: client/) never load the server.
Each command module exposes `add_arguments(parser)` and `run(args) -> int`, and its docstring
(what it does, with an example) is the command's --help text.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "landmarks": ("facekit.landmarks_command", "detect 68 landmarks in images or a video"),
    "preprocess": ("training.preprocess", "videos -> face crops + landmarks for training"),
    "train": ("training.train", "meta-learn E, G, D over many people's videos"),
    "finetune": ("training.finetune", "personalise the model on T images of one person"),
    "evaluate": ("training.evaluation.command", "score a model against the classical warp on unseen people"),
    "export": ("export.command", "checkpoint -> ONNX -> Triton model repository (+ parity report)"),
    "audit": ("service.audit_command", "export the audit log: who made, animated, deleted which avatar"),
    "keys": ("service.keys_command", "issue/revoke API keys, bind client certificates, set tenant quotas"),
    "worker": ("worker.command", "personalise avatars: take jobs, fine-tune, export, load in Triton"),
    "serve": ("service.serve_command", "run the gRPC service (avatars, animation streams, metrics)"),
    "avatar": ("client.avatar_command", "create/list/get/delete/personalise avatars on a running service"),
    "operation": ("client.operation_command", "list/get/watch/cancel personalisation operations"),
    "animate": ("client.animate_command", "drive an avatar with a video or landmark file -> video"),
    "bench": ("client.bench", "benchmark the generator and the service; writes JSON figures"),
    "verify": ("client.verify_command", "is the watermark in an image or video; its C2PA credentials"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return (
        "usage: talkinghead <command> [options]\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n`talkinghead <command> --help` describes a command, with an example."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_usage())
        return 0
    if not argv:  # a command is missing: usage on stderr, status 2, as for any other wrong call
        print(f"talkinghead: a command is needed\n\n{_usage()}", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"talkinghead: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_module(COMMANDS[name][0], rest, prog=f"talkinghead {name}")


def run_module(module_name: str, argv: list[str], *, prog: str) -> int:
    """Parse `argv` with the module's own arguments and run it (also `python -m` entry points).
    Ctrl-C ends it with one line and exit status 130 (128 + SIGINT), as a shell reports it (a
    command that turns SIGTERM into an exception: 143); a reader that went away (`| head -1`)
    ends it quietly with 141 (128 + SIGPIPE)."""
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as missing:  # the service image has no training, export or torch
            print(
                f"{prog}: not available here: it needs {missing.name}, which this installation lacks "
                "(the service image carries the server and the client commands only)",
                file=sys.stderr,
            )
            return 2
        parser = argparse.ArgumentParser(
            prog=prog, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(parser)
        _describe_subcommands(parser)
        status = int(module.run(parser.parse_args(argv)) or 0)
        sys.stdout.flush()  # here, not at exit, where a reader gone would be "Exception ignored"
        return status
    except KeyboardInterrupt as interrupt:  # or a subclass saying otherwise (client.outputs.Terminated)
        print(f"{prog}: {getattr(interrupt, 'what', 'interrupted')}", file=sys.stderr)
        return int(getattr(interrupt, "exit_status", 130))
    except BrokenPipeError:
        _stdout_gone()
        return 141


def _describe_subcommands(parser: argparse.ArgumentParser) -> None:
    """A subcommand's own --help (`talkinghead keys issue --help`) opens with the one line its
    parent lists it with: argparse gives `help=` to the parent's list only, and left the page bare."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                if not subparser.description and summaries.get(name):
                    subparser.description = summaries[name]


def _stdout_gone() -> None:
    """Standard output's reader has gone: point it at /dev/null, so that the interpreter's own
    flush at exit does not fail with a second BrokenPipeError (Python's documented recipe)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    raise SystemExit(main())
