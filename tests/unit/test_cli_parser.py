"""The README's commands parse with the CLI's own parser (torchrun's lines:
torchrun's parser, then the CLI's for the training script's arguments)."""

from __future__ import annotations

import shlex
from pathlib import Path

from torch.distributed.run import get_args_parser as torchrun_parser

from stream_rl.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[list[str]]:
    """The words of every `stream-rl` or `torchrun` line in the README's shell
    blocks (continuation lines joined, comments dropped)."""
    commands, fence = [], None
    for line in README.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence in ("bash", "sh") and line.lstrip().startswith(("stream-rl ", "torchrun ")):
            commands.append(shlex.split(line, comments=True))
    return commands


def test_the_readme_commands_parse() -> None:
    commands = readme_commands()
    # The by-hand roles of "Several hosts" are among them.
    assert {c[1] for c in commands if c[0] == "stream-rl"} >= {"generator", "controller", "train"}
    assert any(c[0] == "torchrun" for c in commands)
    for words in commands:
        argv = words[1:]
        if words[0] == "torchrun":
            launcher = torchrun_parser().parse_args(argv)
            assert launcher.module and launcher.training_script == "stream_rl", words
            argv = launcher.training_script_args
        args = build_parser().parse_args(argv)
        assert args.cmd == argv[0], words
