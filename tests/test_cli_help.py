"""The command line as a newcomer meets it: every command answers -h, errors share one format, trainers and
converters are described in whole sentences, ``--version`` exists."""
import argparse
import re

import pytest

from nnunet_ssl import __version__, cli
from nnunet_ssl.cli_common import ERROR_PREFIX, first_sentence


def _subparsers() -> dict:
    """Every subcommand, read from the parser itself, so a new one is covered without editing this test."""
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = sorted(_subparsers())


def _run(capsys, argv):
    """``nnunet_ssl ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _converters():
    from nnunet_ssl.dataset_conversion import CONVERTERS

    return sorted(CONVERTERS)


def _no_default_twice(text: str) -> None:
    flat = " ".join(text.split())
    assert not re.search(r"\(default[^()]*\)\s*\(default", flat), flat
    assert "(default: None)" not in flat and "(default: False)" not in flat


def test_the_walk_covers_the_known_commands():
    assert {"convert", "pseudolabel", "self-train", "demo", "evaluate", "list-trainers"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_answers_help(capsys, command):
    rc, out, err = _run(capsys, [command, "-h"])
    assert rc == 0, err
    assert out.startswith(f"usage: nnunet_ssl {command}"), out[:200]
    sub = _subparsers()[command]
    for action in sub._actions:  # every option of the command is shown
        for option in action.option_strings:
            assert option in out, (command, option)
    _no_default_twice(out)


def test_convert_help_lists_every_converter_with_a_sentence(capsys):
    rc, out, err = _run(capsys, ["convert", "-h"])
    assert rc == 0, err
    for name in _converters():
        line = next((x for x in out.splitlines() if x.split()[:1] == [name]), None)
        assert line is not None, (name, out)
        assert len(line.split()) > 3, line  # a description follows the name


@pytest.mark.parametrize("name", _converters())
def test_every_converter_answers_help(capsys, name):
    rc, out, err = _run(capsys, ["convert", name, "-h"])
    assert rc == 0, err
    assert out.startswith(f"usage: nnunet_ssl convert {name}")
    assert "--overwrite" in out  # its own options, not convert's
    _no_default_twice(out)


@pytest.mark.parametrize("argv,message", [
    (["convert"], "no converter named"),
    (["convert", "no-such-converter"], "unknown converter 'no-such-converter'"),
])
def test_a_missing_or_unknown_converter_lists_the_converters(capsys, argv, message):
    rc, out, err = _run(capsys, argv)
    assert rc == 2 and out == ""
    lines = err.splitlines()
    assert lines[-1].startswith(ERROR_PREFIX) and message in lines[-1]
    listed = [x.split()[0] for x in lines if x.startswith("  ") and x.split()[0] in _converters()]
    assert listed == _converters()  # one line each, in order


@pytest.mark.parametrize("argv,message", [
    (["pseudolabel", "-c", "3d_fullres"], "the following arguments are required: -d"),
    (["demo", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["convert", "acdc-h5", "/nonexistent/ACDC", "-o", "/nonexistent/raw"], "/nonexistent/ACDC has no data/ folder"),
    (["evaluate", "/nonexistent/pred", "/nonexistent/ref"], "folder /nonexistent/pred does not exist"),
    (["self-train", "-d", "1", "-c", "2d", "--rounds", "x"], "argument --rounds: invalid int value: 'x'"),
])
def test_errors_of_every_kind_share_one_prefix(capsys, argv, message):
    rc, out, err = _run(capsys, argv)
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(ERROR_PREFIX) and message in last, err


def test_version(capsys):
    from importlib.metadata import version

    rc, out, _ = _run(capsys, ["--version"])
    assert rc == 0
    assert out.startswith(f"nnunet_ssl {__version__} (nnunetv2 {version('nnunetv2')}")


def test_top_level_help_lists_version_and_commands(capsys):
    rc, out, _ = _run(capsys, ["-h"])
    assert rc == 0 and "--version" in out
    for command in SUBCOMMANDS:
        assert command in out


# ---------------------------------------------------------------------------------------------------------------
# Descriptions
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc,expected", [
    ("Cross Pseudo Supervision (Chen et al., CVPR 2021) as an nnU-Net trainer.\n\nMore.",
     "Cross Pseudo Supervision (Chen et al., CVPR 2021) as an nnU-Net trainer."),
    ("No L_l (spec section 5): the supervised loss alone. Hypothesis under test\n    (benchmarks): more.",
     "No L_l (spec section 5): the supervised loss alone."),
    ("EMA decay 0.99, e.g. for short runs, i.e. a fast teacher; then\n    more text. Second.",
     "EMA decay 0.99, e.g. for short runs, i.e. a fast teacher; then more text."),
    ("Reference = weak view (``no_grad``), supervised = strong view.",
     "Reference = weak view (no_grad), supervised = strong view."),
    ("A first paragraph without a stop\n\nand a second.", "A first paragraph without a stop."),
    (None, ""),
])
def test_first_sentence(doc, expected):
    assert first_sentence(doc) == expected


def test_every_trainer_has_a_whole_sentence(capsys):
    from nnunet_ssl.trainers import all_trainers

    rc, out, _ = _run(capsys, ["list-trainers"])
    assert rc == 0
    lines = {x.split()[0]: x.split(None, 1)[1] if len(x.split()) > 1 else "" for x in out.splitlines()}
    trainers = all_trainers()
    assert set(lines) == set(trainers)
    for name, text in lines.items():
        assert text.endswith("."), (name, text)
        assert text.count("(") == text.count(")"), (name, text)
        own = " ".join(" ".join((trainers[name].__dict__.get("__doc__") or "").split()).replace("``", "").split())
        if own:  # cut where a sentence ends, never at the end of a docstring line
            assert own.startswith(text), (name, text)
            assert len(own) == len(text) or own[len(text)] == " ", (name, text)


def test_variants_without_a_docstring_say_what_they_change():
    from nnunet_ssl.trainers.nnUNetTrainerFixMatch import nnUNetTrainerFixMatch

    class nnUNetTrainerFixMatch_threshold08(nnUNetTrainerFixMatch):
        threshold = 0.8

    text = cli.trainer_description(nnUNetTrainerFixMatch_threshold08)
    assert text.startswith(cli.trainer_description(nnUNetTrainerFixMatch))
    assert text.endswith(" Variant: threshold = 0.8.")
