"""Reading an argparse parser's structure, for the man pages and the shell completion.

argparse keeps its actions in private attributes; this is the one place that looks at them.
"""

from __future__ import annotations

import argparse


def option_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


def positional_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The one-line help of each subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def help_text(action: argparse.Action) -> str:
    """An action's help as --help prints it (%% is %, %(default)s filled in)."""
    text = action.help or ""
    if text == argparse.SUPPRESS:
        return ""
    return text % {"default": action.default, "prog": "", "metavar": action.metavar}
