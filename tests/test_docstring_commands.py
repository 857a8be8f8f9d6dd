"""The command lines in the docstrings of every top-level module, bench/ and experiments/ script run as written,
checked without running them (a full run takes minutes): a script with options is executed up to its argparse call
and must parse the command's arguments (an unknown flag, a bad choice or a bracketed `[--opt]` usage line fails); a
demo without options must be given none (unless it reads sys.argv itself); `python -m pytest FILE` names a file
that exists."""
import argparse
import ast
import glob
import os
import runpy
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "*.py"))
               + glob.glob(os.path.join(ROOT, "bench", "*.py"))
               + glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def docstring_commands(rel):
    """The `python ...` / `torchrun ...` lines of a file's module docstring, backslash continuations joined, each
    split as the shell would (a trailing `# comment` dropped)."""
    with open(os.path.join(ROOT, rel)) as f:
        doc = ast.get_docstring(ast.parse(f.read()), clean=False) or ""
    commands, lines, i = [], doc.splitlines(), 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith(("python ", "torchrun ")):
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip()
            commands.append(shlex.split(line, comments=True))
        i += 1
    return commands


COMMANDS = [(rel, argv) for rel in FILES for argv in docstring_commands(rel)]


def script_and_args(argv):
    """`python X.py A...`, `torchrun --opt=v ... X.py A...` -> (X.py, [A...]); `python -m pytest F` -> (pytest, [F])."""
    if argv[:3] == ["python", "-m", "pytest"]:
        return "pytest", argv[3:]
    rest = argv[1:]
    if argv[0] == "torchrun":
        while rest and rest[0].startswith("-"):                            # torchrun's own --opt=value options
            rest = rest[1:]
    return rest[0], rest[1:]


class Parsed(BaseException):
    """Raised in place of the work that follows a successful parse (a BaseException: no `except Exception` stops it)."""


def test_the_docstrings_hold_commands():
    assert len(COMMANDS) > 40
    assert {rel for rel, _ in COMMANDS} >= {"train_stage1.py", "train_stage2.py", "evaluate.py", "plots.py",
                                            "bench/bench_mergear.py", "experiments/stage2_cpu.py"}


@pytest.mark.parametrize("rel,argv", COMMANDS, ids=[f"{rel}:{' '.join(a)[:60]}" for rel, a in COMMANDS])
def test_docstring_command_runs_as_written(rel, argv, monkeypatch, tmp_path, capsys):
    script, args = script_and_args(argv)
    if script == "pytest":
        assert args and all(os.path.isfile(os.path.join(ROOT, a)) for a in args), argv
        return
    path = os.path.join(ROOT, script)
    assert os.path.isfile(path), f"{rel}: {' '.join(argv)}: no such script"
    with open(path) as f:
        source = f.read()
    assert 'if __name__ == "__main__":' in source, f"{script} has no command-line entry"
    if "ArgumentParser(" not in source:                                    # a demo without options
        assert not args or "sys.argv" in source, f"{rel}: {script} takes no arguments, the docstring passes {args}"
        return
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))                      # a bad command line exits 2 in here

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [path, *args])
    monkeypatch.setattr(sys, "path", list(sys.path))                       # scripts may insert the repository root
    monkeypatch.chdir(tmp_path)                                            # nothing lands in the repository
    try:
        runpy.run_path(path, run_name="__main__")
    except Parsed:
        return
    except SystemExit as e:
        pytest.fail(f"{rel}: `{' '.join(argv)}` does not parse (exit {e.code}): "
                    f"{capsys.readouterr().err.strip().splitlines()[-1:]}")
    pytest.fail(f"{rel}: `{' '.join(argv)}` ran to the end without parsing a command line")
