"""One vocabulary (README 'Conventions'): the same idea has the same flag in the four scripts, the README names only
flags that exist, and every command of a method script in experiments/ and bench/ parses with that script's own
get_args (no training), so renaming a flag cannot silently break an experiment."""
import argparse
import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("masksup", "simclr_seg", "selective_mim", "lmae")
SUBCOMMANDS = {"lmae": ("complete", "degrade")}
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*(?![\w])")

# the same idea, one flag: which script has which (issue 17 item 5); the old spellings must be gone everywhere
IDEAS = {
    "--arch": SCRIPTS,  # the network, the paper's names as choices
    "--train-split": SCRIPTS,  # issue 18: the split of each role, SPLIT:F carved (common.plan_splits)
    "--val-split": SCRIPTS,
    "--test-split": SCRIPTS,
    "--split-seed": SCRIPTS,  # seeds the readers' splits and the carve, apart from --seed
    "--void-id": ("masksup", "selective_mim", "lmae"),  # every script that reads class-id labels
    "--num-classes": ("masksup", "selective_mim", "lmae"),  # every script that reads a folder dataset
    "--masking": ("masksup", "selective_mim", "lmae"),
    "--select-by": ("masksup", "simclr_seg", "selective_mim"),
    "--pretrain-root": ("simclr_seg", "selective_mim"),
    "--pretrain-data": ("simclr_seg", "selective_mim"),
    "--stage": ("simclr_seg", "selective_mim"),
}
RETIRED = ("--test-set", "--pretrain-data-root", "--preset", "--model", "--encoder", "--mask-strategy",
           "--eval-mask-strategy", "--selection", "--select-metric", "--experiment", "--grid-sources")


def parser_of(name, sub=None):
    """The argparse parser get_args builds (captured at parse time, nothing parsed)."""
    module = importlib.import_module(name)
    captured = []

    class Captured(Exception):
        pass

    def capture(self, args=None, namespace=None):
        captured.append(self)
        raise Captured

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        module.get_args([sub] if sub else [])
    except Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured[-1]


def options(name, sub=None):
    """{option string: action} of one parser."""
    return {option: action for action in parser_of(name, sub)._actions for option in action.option_strings}


def all_options(name):
    found = dict(options(name))
    for sub in SUBCOMMANDS.get(name, ()):
        found.update(options(name, sub))
    return found


@pytest.fixture(scope="module")
def flags():
    return {name: all_options(name) for name in SCRIPTS}


def test_one_idea_one_flag(flags):
    for flag, holders in IDEAS.items():
        for name in holders:
            assert flag in flags[name], f"{name}.py has no {flag}"
    for name in SCRIPTS:
        assert not set(RETIRED) & set(flags[name]), f"{name}.py still has {sorted(set(RETIRED) & set(flags[name]))}"


def test_a_shared_flag_has_one_kind_everywhere(flags):
    """A flag in two scripts takes the same kind of value (a switch in one and a number in the other would make one
    command line mean different things)."""
    def kind(action):
        return type(action).__name__, getattr(action.type, "__name__", str(action.type)), action.nargs

    seen = {}
    for name in SCRIPTS:
        for flag, action in options(name).items():
            seen.setdefault(flag, {})[name] = kind(action)
    seen["--img-size"].pop("lmae")  # lmae's also takes HxW (its completion grid is not square); an int means the same
    for flag, kinds in seen.items():
        assert len(set(kinds.values())) == 1, f"{flag} differs between scripts: {kinds}"


def readme_sections():
    """{script or 'shared': text} of the README: each method's section by its heading, the rest shared."""
    text = (ROOT / "README.md").read_text()
    parts = re.split(r"(?m)^(?=## )", text)
    sections = {}
    for part in parts:
        heading = part.splitlines()[0] if part else ""
        owner = next((name for name in SCRIPTS if f"`{name}.py`" in heading), "shared")
        sections[owner] = sections.get(owner, "") + part
    return sections


def mentioned_flags(text):
    """(line, flag) for every flag in backticks or in a code block, minus commands of other programs (torchrun's
    own, pip, pytest, experiment and bench scripts)."""
    found = []
    in_code = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
            continue
        spans = [line] if in_code else re.findall(r"`([^`]*)`", line)
        for span in spans:
            if re.search(r"experiments/|bench/|pytest|pip |torchrun --nproc", span) and not re.search(
                    r"(masksup|simclr_seg|selective_mim|lmae)\.py", span):
                continue
            span = re.sub(r"(experiments|bench)/\S+\.(py|sh)(\s+--?[\w-]+(\s+[^-`\s]\S*)*)*", "", span)
            found += [(line.strip(), flag) for flag in FLAG.findall(span)]
    return found


def test_readme_names_only_flags_that_exist(flags):
    """A flag the README names exists in the script its line names, else in its section's script (or any script in
    the shared sections); prose about an experiment's own CLI may name that script's flags."""
    everything = set().union(*flags.values())
    experiments = set().union(*(own_flags(path) for path in PYTHON))
    for owner, text in readme_sections().items():
        known = (everything if owner == "shared" else set(flags[owner])) | experiments
        for line, flag in mentioned_flags(text):
            name_in_line = [name for name in SCRIPTS if f"{name}.py" in line]
            allowed = set().union(*(flags[name] for name in name_in_line)) if name_in_line else known
            assert flag in allowed, \
                f"README ({owner}) names {flag}, which {'/'.join(name_in_line) or owner} does not have: {line[:120]}"


# --- experiments/ and bench/: every command of a method script parses ---

def shell_commands(path):
    """(script, argv) for every `... <script>.py ARGS` in a shell script: continuation lines joined, ${X:-default}
    and simple assignments / for-loop values resolved, arrays expanded, other variables kept as $NAME."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    values = {}
    for match in re.finditer(r"(?m)^\s*(\w+)=(\S+)", text):
        values.setdefault(match.group(1), re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", match.group(2)))
    for match in re.finditer(r"(?m)^\s*for (\w+) in ([^;]+);", text):
        values.setdefault(match.group(1), match.group(2).split()[0].strip("\"'"))
    arrays = {m.group(1): m.group(2) for m in re.finditer(r"(?m)^\s*(\w+)=\((.*)\)", text)}
    arrays.update({m.group(1): m.group(2) for m in re.finditer(
        r"read -r -a (\w+) <<< \"\$\{\w+:-(.*?)\}\"", text)})
    commands = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0]
        if line.lstrip().startswith("#"):
            continue
        for match in re.finditer(r"(masksup|simclr_seg|selective_mim|lmae)\.py((?:\s+[^|;&>]+)*)", line):
            args = re.sub(r"\$\(.*", "", match.group(2))  # a command substitution: optional flags, not checked
            args = re.sub(r'"\$\{(\w+)\[@\]\}"', lambda m: arrays.get(m.group(1), ""), args)
            args = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", args)
            for _ in range(3):
                args = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), "$" + m.group(1)), args)
            args = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", args)
            commands.append((match.group(1), shlex.split(args.split(" 2>")[0])))
    return commands


def placeholder(name, argv, folder):
    """Values the script only sees at run time -> values of the right kind: unresolved $VARIABLES after a flag with
    choices -> its first choice, after a number flag -> 1 or 0.5; every path -> an existing folder of the test
    (--out: a new one), since some parsers check that their inputs exist."""
    table, filled = all_options(name), []
    for i, token in enumerate(argv):
        action = table.get(argv[i - 1]) if i and argv[i - 1].startswith("--") else None
        if token.startswith("$") and (action is None or action.nargs == 0):
            continue  # a variable holding flags: nothing to check
        if action is not None and action.nargs != 0 and not action.choices and action.type in (None, str) \
                and ("/" in token or "$" in token):
            path, token = folder / str(i), str(folder / str(i))
            if token.endswith(".pt") or argv[i].endswith(".pt") or "--checkpoint" in action.option_strings:
                # a checkpoint: an (empty) file
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            elif action.option_strings != ["--out"]:
                path.mkdir(parents=True, exist_ok=True)
        elif token.startswith("$"):
            token = (str(action.choices[0]) if action.choices else "1" if action.type is int else "0.5")
        filled.append(token)
    return filled


SHELL = sorted(p for folder in ("experiments", "bench") for p in (ROOT / folder).rglob("*.sh"))
PYTHON = sorted(p for folder in ("experiments", "bench") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SHELL, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_experiments_parse(path, tmp_path):
    commands = shell_commands(path)
    assert commands, f"{path} runs no method script"
    for number, (name, argv) in enumerate(commands):
        argv = placeholder(name, argv, tmp_path / str(number))
        try:
            importlib.import_module(name).get_args(argv)
        except SystemExit as error:
            pytest.fail(f"{path.relative_to(ROOT)}: `{name}.py {' '.join(argv)}` does not parse (exit {error.code})")


def own_flags(path):
    """The flags of a Python experiment/bench script's own CLI (its add_argument calls)."""
    return {node.value for call in ast.walk(ast.parse(path.read_text())) if isinstance(call, ast.Call)
            and getattr(call.func, "attr", "") == "add_argument" for node in call.args if isinstance(node, ast.Constant)}


def python_flags(path):
    """{flag} written as string constants in a Python experiment/bench script, minus its own CLI's flags."""
    tree = ast.parse(path.read_text())
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and FLAG.fullmatch(node.value)} - own_flags(path)


@pytest.mark.parametrize("path", PYTHON, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_experiments_name_existing_flags(path, flags):
    text = path.read_text()
    users = [name for name in SCRIPTS if re.search(rf"\b{name}\.py\b|import {name}\b|\b{name}\.get_args", text)]
    if not users:
        pytest.skip("runs no method script")
    known = set().union(*(flags[name] for name in users))
    unknown = sorted(python_flags(path) - known)
    assert not unknown, f"{path.relative_to(ROOT)} passes {unknown}, which {'/'.join(users)} does not have"
