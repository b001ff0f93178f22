"""README.md's shell examples against the CLI: every `vild-pipe ...` command in a ```bash block must name a real
subcommand, only options it has, values their types and checks accept, and the right number of arguments.

The commands are parsed with click's own option parser and never run: running them would need the files they
name, and converting the path arguments would check that those exist. So a renamed option, a dropped choice or
a changed argument list fails here rather than in a reader's terminal.
"""
import itertools
import re
import shlex
from pathlib import Path

import click
import pytest

from vild_pipe.cli import main
from vild_pipe.data.splits import resolve_split
from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline.shards import parse_shard_option

README = Path(__file__).resolve().parent.parent / "README.md"
PLACEHOLDER = "$VAR"
VARIABLE = re.compile(r"\$(?:\{(\w+)([^}]*)\}|(\w+))")  # $NAME, ${NAME}, ${NAME<operator>}
SEPARATORS = {";", "&&", "||", "|", "&"}


def bash_blocks(text):
    """Each ```bash block as a list of (first line number, last line number, line), `\\` continuations joined."""
    block = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        if block is None:
            block = [] if re.fullmatch(r"```(bash|sh|shell)", line) else None
        elif line.startswith("```"):
            yield block
            block = None
        elif block and block[-1][2].endswith("\\"):
            first, _, joined = block[-1]
            block[-1] = (first, number, joined[:-1] + " " + line)
        else:
            block.append((number, number, line))


def expansions(line, loops):
    """The line once per value of each `for` variable it uses plainly ($L, ${L}); any other variable or
    expansion (${L/+/-}) becomes PLACEHOLDER."""
    line = line.replace("$(which vild-pipe)", "vild-pipe")
    names = sorted({m[1] or m[3] for m in VARIABLE.finditer(line) if not m[2]} & loops.keys())
    for values in itertools.product(*(loops[name] for name in names)):
        binding = dict(zip(names, values))
        yield VARIABLE.sub(lambda m: PLACEHOLDER if m[2] else binding.get(m[1] or m[3], PLACEHOLDER), line)


def simple_commands(line):
    """The words of each simple command of a shell line (split at ;, &&, ||, |, &; comments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if word in SEPARATORS:
            yield words
            words = []
        else:
            words.append(word)
    yield words


def readme_commands():
    """(first line, last line, arguments after `vild-pipe`) of every vild-pipe command in the README's bash
    blocks, directly or behind a launcher such as `torchrun ... --no-python vild-pipe`."""
    commands = []
    for block in bash_blocks(README.read_text(encoding="utf-8")):
        loops = {}
        for first, last, line in block:
            for expanded in expansions(line, loops):
                for words in simple_commands(expanded):
                    if words[:1] == ["for"] and words[2:3] == ["in"]:
                        loops[words[1]] = words[3:]
                    if "vild-pipe" in words:
                        commands.append((first, last, words[words.index("vild-pipe") + 1:]))
    return commands


def check_split(spec):
    """--split: a spec the CLI's resolver knows. Given no categories it always raises; only an unknown spec
    counts here, its other complaints are about an annotation file this test does not have."""
    try:
        resolve_split([], spec)
    except DataError as err:
        if "unknown category split" in str(err):
            raise


CHECKS = {"split": check_split, "shard": parse_shard_option}


def parse(command, name, args):
    """click's parse of `args` without conversion: (context, values by parameter name, leftover words)."""
    ctx = click.Context(command, info_name=name)
    values, rest, _ = command.make_parser(ctx).parse_args(list(args))  # it consumes the list
    return ctx, values, rest


def supplied(param, values):
    """The parsed value of `param`, or None where the command line does not give it."""
    value = values.get(param.name)
    if isinstance(param, click.Argument) and not isinstance(value, (str, tuple)) or value == ():
        return None
    return value


def problems(args):
    """What `vild-pipe ARGS` gets wrong, as click and the CLI's own option checks would say it, except for
    paths (they are not converted)."""
    rest = []
    try:
        _, _, rest = parse(main, "vild-pipe", args)
        if not rest or rest[0] not in main.commands:
            return [f"no such subcommand {rest[0]!r}" if rest else "no subcommand"]
        ctx, values, extra = parse(main.commands[rest[0]], rest[0], rest[1:])
    except click.UsageError as err:
        return [f"{rest[0] if rest else 'vild-pipe'}: {err.format_message()}"]
    found = [f"unexpected extra argument(s) {' '.join(extra)}"] if extra else []
    for param in ctx.command.params:
        value = supplied(param, values)
        if value is None:
            if param.required:
                found.append(f"missing argument {param.human_readable_name}" if isinstance(param, click.Argument)
                             else f"missing option {param.opts[0]}")
        elif not isinstance(param.type, click.Path) and PLACEHOLDER not in str(value):
            try:
                param.type_cast_value(ctx, value)
                CHECKS.get(param.name, str)(value)
            except click.BadParameter as err:
                found.append(f"{param.opts[0]} {value}: {err.message}")
            except VildError as err:  # parse_shard_option's message names the option already, resolve_split's not
                found.append(str(err) if str(err).startswith(param.opts[0]) else f"{param.opts[0]} {value}: {err}")
    return [f"{rest[0]}: {problem}" for problem in found]


COMMANDS = readme_commands()


@pytest.mark.parametrize("first, last, args", COMMANDS, ids=[f"L{c[0]}-{(c[2] or ['?'])[0]}" for c in COMMANDS])
def test_readme_command_matches_the_cli(first, last, args):
    """One README command: its subcommand, options, values and argument count as the CLI has them."""
    found = problems(args)
    if found:
        lines = f"{first}" if first == last else f"{first}-{last}"
        pytest.fail(f"README.md:{lines}: {'; '.join(found)}", pytrace=False)


def test_every_bash_line_naming_vild_pipe_is_checked():
    """Against passing by finding nothing: each bash line that names vild-pipe must yield a checked command (a
    shell style the parser misses fails here), and the README's COCO recipe alone runs 9 of them."""
    naming = {first for block in bash_blocks(README.read_text(encoding="utf-8")) for first, _, line in block
              if re.search(r"(?<![\w-])vild-pipe(?![\w-])", line) and not line.lstrip().startswith("#")}
    missed = sorted(naming - {first for first, _, _ in COMMANDS})
    assert not missed, f"README.md lines {missed} name vild-pipe but yield no command to check"
    assert len(COMMANDS) >= 9, f"only {len(COMMANDS)} vild-pipe commands found in README.md's bash blocks"


TEST_REFERENCE = re.compile(r"tests/(\w+\.py)::(\w+)(?:\[([^\]]*)\])?")


def test_every_test_the_readme_names_exists():
    """The README's tables name the test behind each claim; a renamed or removed test must not leave a claim
    pointing at nothing. A parametrised id (`name[a\\|b]`) must also name values the test's file holds."""
    text = README.read_text()
    references = TEST_REFERENCE.findall(text)
    assert len(references) > 20
    missing = []
    for file_name, test_name, params in references:
        path = README.parent / "tests" / file_name
        source = path.read_text() if path.is_file() else ""
        if not re.search(rf"^def {test_name}\(", source, re.MULTILINE):
            missing.append(f"tests/{file_name}::{test_name}")
        missing += [f"tests/{file_name}::{test_name}[{value}]" for value in params.replace("\\|", "|").split("|")
                    if value and value not in source]
    assert not missing, "README.md names tests that do not exist: " + ", ".join(sorted(set(missing)))
