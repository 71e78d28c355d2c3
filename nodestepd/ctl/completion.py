"""Bash completion for nodestepctl, generated from its argparse parser (so it cannot drift).

The package installs the generated script as share/bash-completion/completions/nodestepctl;
`python -m nodestepd.ctl.manpage DIR` rewrites it, and a test checks the installed one is current.
"""

from __future__ import annotations

import argparse

from nodestepd.ctl.argparse_walk import option_actions, positional_actions, subparsers

# What an option's value is, by its metavar: directories, files, or nothing to offer.
DIR_METAVARS = {"DIR"}
FILE_METAVARS = {"FILE", "PATH"}


def _words(words: list[str]) -> str:
    return " ".join(words)


def _value_cases(prefix: str, parser: argparse.ArgumentParser) -> list[str]:
    """`case "$sub:$prev"` arms completing the value of each option that takes one."""
    arms = []
    for action in option_actions(parser):
        if action.nargs == 0:
            continue
        pattern = "|".join(f"{prefix}:{opt}" for opt in action.option_strings)
        if action.choices:
            reply = f'COMPREPLY=($(compgen -W "{_words([str(c) for c in action.choices])}" -- "$cur"))'
        elif action.metavar in DIR_METAVARS:
            reply = 'COMPREPLY=($(compgen -d -- "$cur"))'
        elif action.metavar in FILE_METAVARS:
            reply = 'COMPREPLY=($(compgen -f -- "$cur"))'
        else:
            reply = "COMPREPLY=()"  # a number, a name: nothing to offer
        arms.append(f"        {pattern}) {reply}; return 0;;")
    return arms


def _offers(parser: argparse.ArgumentParser) -> tuple[list[str], str]:
    """(the words to offer, how to complete positional values: "files" or "")."""
    words = [opt for action in option_actions(parser) for opt in action.option_strings]
    positional = ""
    for action in positional_actions(parser):
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            words += [str(c) for c in action.choices]
        elif action.metavar in FILE_METAVARS:
            positional = "files"
    return words, positional


def bash_completion(parser: argparse.ArgumentParser) -> str:
    prog = parser.prog
    subs = subparsers(parser)
    top_words, _ = _offers(parser)
    arms = _value_cases("", parser)
    sub_arms = []
    for name, sub in subs.items():
        arms += _value_cases(name, sub)
        words, positional = _offers(sub)
        compgen = f'COMPREPLY=($(compgen -W "{_words(words)}" -- "$cur"))'
        if positional == "files":
            compgen += '\n            [[ $cur != -* ]] && COMPREPLY+=($(compgen -f -- "$cur"))'
        sub_arms.append(f"        {name})\n            {compgen};;")
    function = f"_{prog}"
    return f"""# bash completion for {prog}; generated from its argparse parser by nodestepd/ctl/completion.py
{function}() {{
    local cur prev sub="" i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ -n $sub && ${{COMP_WORDS[i]}} == -- ]]; then
            return 0  # the container's command follows: resolved inside the image, not here
        fi
        if [[ -z $sub ]]; then
            case "${{COMP_WORDS[i]}}" in
                {"|".join(subs)}) sub="${{COMP_WORDS[i]}}";;
            esac
        fi
    done
    case "$sub:$prev" in
{chr(10).join(arms)}
    esac
    case "$sub" in
        "")
            COMPREPLY=($(compgen -W "{_words(top_words + list(subs))}" -- "$cur"));;
{chr(10).join(sub_arms)}
    esac
    return 0
}}
complete -F {function} {prog}
"""
