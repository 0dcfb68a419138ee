"""The commands the README and the scripts' docstrings show run as written: every flag exists in its script's parser,
every config file they name exists, and every make target and variable exists in the Makefile. Researchers copy
these lines; options get renamed."""

import ast
import importlib
import re

import pytest

import common

ROOT = common.PROJECT_DIR
SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py"))
BENCH = {"synth": "synth_parser", "finetune": "finetune_parser", "train": "train_parser", "loader": "loader_parser"}
SCRIPT_CALL = re.compile(r"(?<![\w<])(\w+)\.py\b")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
# A command's text ends at a comment, the end of inline code, a parenthesised remark or a run of spaces before one.
COMMAND_END = re.compile(r"`|#|\s\(| {3,}")


def documents() -> dict[str, str]:
    docs = {"README.md": (ROOT / "README.md").read_text()}
    for name in SCRIPTS:
        docs[f"{name}.py"] = ast.get_docstring(ast.parse((ROOT / f"{name}.py").read_text()), clean=False)
    # A backslash at a line's end continues the command on the next line.
    return {name: re.sub(r"\\\n\s*", " ", text) for name, text in docs.items()}


def script_commands(text: str):
    """(script, the flags and arguments after it) for each `python/accelerate launch/torchrun ... X.py ...`."""
    for line in text.splitlines():
        for call in SCRIPT_CALL.finditer(line):
            before = line[: call.start()]
            if call.group(1) in SCRIPTS and re.search(r"\b(python|launch|torchrun)\b", before):
                tail = line[call.end() :]
                yield call.group(1), tail[: m.start()] if (m := COMMAND_END.search(tail)) else tail


def parser_for(script: str, tail: str):
    """The script's parser (bench.py: its benchmark's); None for `bench.py` without a benchmark named."""
    module = importlib.import_module(script)
    if script == "bench":
        name = (tail.split() or [""])[0]
        return getattr(module, BENCH[name])() if name in BENCH else None
    return module.get_parser()


def all_commands():
    return [(doc, script, tail) for doc, text in documents().items() for script, tail in script_commands(text)]


def test_the_documents_show_commands_of_every_stage():
    """The extraction itself works: each stage's docstring shows how to run it."""
    found = {(doc, script) for doc, script, _ in all_commands()}
    stages = ["caption", "finetune", "synthesize", "train_cls", "eval_gap", "eval_ood", "mia_lira", "sscd_sim"]
    assert {(f"{s}.py", s) for s in stages} <= found
    assert {("README.md", s) for s in ["caption", "finetune", "synthesize", "eval_gap", "sscd_sim"]} <= found


@pytest.mark.parametrize("doc", sorted(documents()))
def test_documented_flags_exist(doc):
    unknown = []
    for _, script, tail in (c for c in all_commands() if c[0] == doc):
        if (parser := parser_for(script, tail)) is None:
            continue
        words = re.sub(r"\"[^\"]*\"|'[^']*'", "", tail)  # a quoted value holds another program's flags
        unknown += [f"{script}.py {flag}" for flag in FLAG.findall(words) if flag not in parser._option_string_actions]
    assert not unknown, f"{doc} shows flags its scripts do not have: {unknown}"


@pytest.mark.parametrize("doc", sorted(documents()))
def test_documented_config_files_exist(doc):
    named = set(re.findall(r"configs/[\w.]+\.yaml", documents()[doc]))
    assert not [c for c in sorted(named) if not (ROOT / c).is_file()]


def test_documented_make_targets_and_variables_exist():
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:((?:.*\\\n)*.*)", makefile, re.M).group(1)
    targets = set(re.findall(r"^([\w-]+)\s*:", makefile, re.M)) | set(re.findall(r"[\w-]+", phony))
    missing = []
    for doc, text in documents().items():
        # make commands in code: inline code or a code block's line, not prose's "make sure"
        code = re.findall(r"`make ([^`]+)`|^\s*make ([^#\n]+)", text, re.M)
        for command in (inline or block for inline, block in code):
            words = re.sub(r"=(\"[^\"]*\"|'[^']*'|\S+)|<[^>]*>|(?<!\S)-\w+", "=", command)  # values, <placeholders>, -B
            for name, is_variable in re.findall(r"([\w-]+)(=?)", words):
                known = f"$({name})" in makefile if is_variable else name in targets
                if not known:
                    missing.append(f"{doc}: make {name}{'=' if is_variable else ''}")
    assert not missing, missing
