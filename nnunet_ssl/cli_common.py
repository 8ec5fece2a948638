"""What every ``nnunet_ssl`` command line shares, so that all of them read and fail the same way.

- :class:`Parser`: argparse with one error format (``nnunet_ssl: error: <message>``, exit code 2) and
  :class:`HelpFormatter`, which shows an option's default once.
- :func:`print_error`: the same one-line format for errors found after parsing.
- :func:`first_sentence`: one-line descriptions (trainers, converters) from docstrings, cut where a sentence ends.

Converters (``nnunet_ssl convert NAME``) and ``nnunet_ssl evaluate`` build their own parsers; they use these too.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap

ERROR_PREFIX = "nnunet_ssl: error: "


def print_error(message: str) -> None:
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr, flush=True)


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the text already states its default.

    A help text that says ``(default: $nnUNet_raw)`` keeps exactly that; defaults that say nothing (None, the
    False of a switch) are not shown. Descriptions and epilogs are wrapped line by line, so a list keeps one
    entry per line, wrapped under its own text (``  name   text``).
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            hanging = re.match(r"^\s+\S+\s+", line)
            lines.append(textwrap.fill(line, width, initial_indent=indent, break_on_hyphens=False,
                                       subsequent_indent=indent + " " * (hanging.end() if hanging else 0))
                         if line.strip() else "")
        return "\n".join(lines)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings or action.default is None
                or action.default is argparse.SUPPRESS or isinstance(action.default, bool)):
            return text
        value = action.default
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter` and the package's one error format.

    Sub-parsers made with ``add_subparsers().add_parser`` are of this class too (argparse uses the parent's class).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{ERROR_PREFIX}{message}\n")


# "e.g." / "i.e." / "et al." / "vs." / "cf." end no sentence; "0.99" has no blank after its dot
_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bal)(?<!\bvs)(?<!\bcf)\.(?=\s|$)")


def first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line, ending in '.' ('' for no docstring).

    reST literals lose their double backticks. A first paragraph without a full stop is taken whole.
    """
    if not doc or not doc.strip():
        return ""
    paragraph = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip(), maxsplit=1)[0]
    text = " ".join(paragraph.split()).replace("``", "")
    end = _SENTENCE_END.search(text)
    if end:
        return text[:end.end()]
    return text.rstrip(" :;,") + "."
