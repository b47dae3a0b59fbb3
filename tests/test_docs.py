"""The docs stay true: README.md and docs/*.md are read as the tests' input. Every params example is valid
params, every documented command names a real verb and real options, every path and link exists, and the
README stays a short front door. Each check returns its problems as lines, so a planted error shows it can fail."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, doc_blocks, doc_pages, own_data_examples, parse_page
from pipeline.commands.cli import COMMANDS
from pipeline.core.catalog import STAGES
from pipeline.core.errors import DataError
from pipeline.core.params import ParamsError, load_params, read_yaml
from pipeline.data import sources

README_MAX_LINES = 300
SHELL = ("bash", "sh", "console", "shell")
CLI = "llm-pipeline"


def where(page: str, line: int) -> str:
    return f"{page}:{line}"


# -- (a) params examples --------------------------------------------------------------------------
def merged(base: dict, fragment: dict) -> dict:
    """`fragment` laid over `base` (a copy), new keys kept, so that a key params.yaml lacks reaches the check."""
    out = dict(base)
    for key, value in fragment.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


@functools.cache
def stage_params() -> tuple[dict, ...]:
    return tuple(stage.load().PARAMS for stage in STAGES.values())


def params_problem(fragment, folder: Path) -> str | None:
    """Why `fragment` is not a valid change to the real params.yaml, or None: it must be a mapping of sections
    a stage reads, and params.yaml with it merged in must pass every stage's check and the sources' own."""
    if not isinstance(fragment, dict) or not fragment:
        return "not a mapping of params.yaml sections"
    declared = {name.split(".")[0] for specs in stage_params() for name in specs}
    unknown = sorted(set(fragment) - declared, key=str)
    if unknown:
        return f"unknown section {unknown[0]} (params.yaml has: {', '.join(sorted(declared))})"
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(merged(read_yaml(REPO / "params.yaml"), fragment), sort_keys=False))
    try:
        checked = {}
        for specs in stage_params():
            checked.update(load_params(path, specs))
        for entry in sources.local_deps(checked["datasets"], checked["download.sources"]):
            sources.check_local(entry)
    except (ParamsError, DataError) as exc:
        return str(exc)
    return None


def params_problems(root: Path, folder: Path) -> list[str]:
    """Every ```yaml block of the docs is a params.yaml fragment (see docs/development.md); the invalid ones."""
    found = []
    for block in doc_blocks("yaml", root=root):
        try:
            fragment = yaml.safe_load(block.text)
        except yaml.YAMLError as exc:
            found.append(f"{where(block.page, block.line)}: not YAML: {' '.join(str(exc).split())}")
            continue
        problem = params_problem(fragment, folder)
        if problem:
            found.append(f"{where(block.page, block.line)}: {problem}")
    return found


# -- (b) command lines --------------------------------------------------------------------------------
@functools.cache
def help_text(*words: str) -> str:
    """`llm-pipeline WORDS... --help`, run once per verb (and flow subcommand)."""
    result = subprocess.run([str(BIN / CLI), *words, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def options_of(*words: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text(*words)))


def subcommands(verb: str) -> list[str]:
    """The choices of a verb whose first argument is a subcommand (flow: run, serve, list), else []."""
    match = re.search(r"^usage: \S+ \S+ .*?\{([\w,-]+)\} \.\.\.", help_text(verb), re.M | re.S)
    return match.group(1).split(",") if match else []


def logical_lines(text: str) -> list[tuple[int, str]]:
    """A shell block's lines, continuation lines (ending in a backslash) joined; (offset of the first, line)."""
    out, pending, first = [], "", 0
    for offset, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"^\s*\$ ", "", line) if not pending else line  # a console prompt
        if not pending:
            first = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    return out


def commands_in(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at &&, ||, |, ;), each without leading VAR=value words."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    out = []
    for words in commands:
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            words = words[1:]
        if words:
            out.append(words)
    return out


def cli_problems(words: list[str], inline: bool) -> list[str]:
    """What is wrong with `llm-pipeline WORDS...`: an unknown verb or subcommand, or an option its help lacks.
    Inline spans (`llm-pipeline run [--force]`) are synopses: options are read from brackets too."""
    if not words:
        return ["no verb"]
    verb, rest = words[0], words[1:]
    if inline and verb.isupper():  # a placeholder: `llm-pipeline VERB --help`
        return []
    if verb not in COMMANDS:
        return [f"unknown verb {verb!r} (verbs: {', '.join(COMMANDS)})"]
    used = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(rest))
    subs = subcommands(verb)
    if not subs:
        known = options_of(verb)
    elif inline:
        known = set().union(*(options_of(verb, sub) for sub in subs))
    elif not rest or rest[0] not in subs:
        return [f"{verb} needs one of {', '.join(subs)}"]
    else:
        known = options_of(verb, rest[0])
    return [f"{verb}: no option {option}" for option in used if option not in known | {"--help"}]


@functools.cache
def make_targets(root: Path) -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (root / "Makefile").read_text(), re.M))


def word_problems(words: list[str], root: Path, inline: bool) -> list[str]:
    """Problems of one documented command: llm-pipeline's verbs and options, make's targets, python -m's module."""
    program = words[0].rsplit("/", 1)[-1]
    if program == CLI:
        return [f"{' '.join(words)}: {problem}" for problem in cli_problems(words[1:], inline)]
    if program == "make":
        targets = [word for word in words[1:] if not word.startswith("-") and "=" not in word]
        return [f"make {target}: no such Makefile target" for target in targets if target not in make_targets(root)]
    if program.startswith("python") and len(words) > 2 and words[1] == "-m" and not re.search(r"<|^[A-Z]+$", words[2]):
        try:
            found = importlib.util.find_spec(words[2]) is not None
        except ImportError:
            found = False
        return [] if found else [f"python -m {words[2]}: no such module"]
    return []


INLINE_COMMAND = re.compile(r"`((?:\.venv/bin/)?(?:llm-pipeline|make|python) [^`]+)`")


def command_problems(root: Path) -> list[str]:
    """Every command in a shell block, and every inline `llm-pipeline ...`, `make ...` or `python -m ...`."""
    found = []
    for block in doc_blocks(SHELL, root=root):
        for offset, line in logical_lines(block.text):
            place = where(block.page, block.line + offset)
            try:
                commands = commands_in(line)
            except ValueError as exc:  # unbalanced quotes: only a problem where the line runs our command
                commands = []
                if CLI in line:
                    found.append(f"{place}: cannot split {line.strip()!r}: {exc}")
            found += [f"{place}: {problem}" for words in commands for problem in word_problems(words, root, False)]
    for path in doc_pages(root):
        for number, _, line in parse_page(path, root)[1]:
            for span in INLINE_COMMAND.findall(line):
                try:
                    words = shlex.split(span.replace("\\|", "|"))
                except ValueError:
                    words = span.split()
                found += [f"{where(path.relative_to(root).as_posix(), number)}: {problem}"
                          for problem in word_problems(words, root, True)]
    return found


# -- (c) paths, names and links ------------------------------------------------------------------------
# A repository path: a file with a suffix, or a folder written with its trailing slash.
REPO_PATH = re.compile(r"(?<![\w./-])((?:gpt|pipeline|benchmarks|tests|docs)/[\w./-]*(?:\.[a-z]{1,4}\b|/))")
DOTTED = re.compile(r"(?<![\w./-])((?:gpt|pipeline)(?:\.[A-Za-z_]\w*)+)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def resolves(name: str) -> bool:
    """Whether a dotted name is a module of ours or an attribute of one (gpt.runtime.tune_malloc)."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            thing = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                thing = getattr(thing, attribute)
        except AttributeError:
            return False
        return True
    return False


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path, root: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, headings, line in parse_page(path, root)[1]:
        if re.match(r"#{1,6}\s", line):
            base = slug(headings[-1])
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def path_problems(root: Path) -> list[str]:
    """Every repository path, `gpt.`/`pipeline.` name and relative link (with its #anchor) named in the docs."""
    found = []
    for path in doc_pages(root):
        page = path.relative_to(root).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name in REPO_PATH.findall(line):
                if not (root / name).exists():
                    found.append(f"{where(page, number)}: {name} does not exist")
            for name in DOTTED.findall(line):
                if not resolves(name):
                    found.append(f"{where(page, number)}: {name} is not a module or attribute of ours")
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue  # http:, https:, mailto:
                file, _, anchor = target.partition("#")
                linked = (path.parent / file).resolve() if file else path
                if not linked.exists():
                    found.append(f"{where(page, number)}: link to {target}: no such file")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked, root):
                    found.append(f"{where(page, number)}: link to {target}: no such heading")
    return found


# -- (d) the README --------------------------------------------------------------------------------
def readme_problems(root: Path) -> list[str]:
    """The README is a front door: short, with the two set-up commands, every verb, and a link to every page."""
    text = (root / "README.md").read_text(encoding="utf-8")
    found = []
    lines = len(text.splitlines())
    if lines > README_MAX_LINES:
        found.append(f"README.md: {lines} lines, more than {README_MAX_LINES}")
    setup = " ".join(block.text for block in doc_blocks(SHELL, "README.md", root=root))
    found += [f"README.md: no `make {target}` in its shell blocks" for target in ("pipeline", "test")
              if not re.search(rf"^make {target}\b", setup, re.M)]
    found += [f"README.md: verb {verb} is not in its command table" for verb in COMMANDS
              if not re.search(rf"^\| `{CLI} {re.escape(verb)}\b", text, re.M)]
    found += [f"README.md: no link to docs/{page.name}" for page in doc_pages(root)[1:]
              if f"](docs/{page.name}" not in text]
    return found


# -- the checks on the real docs -------------------------------------------------------------------
def test_every_params_example_is_valid_params(tmp_path: Path):
    assert len(doc_blocks("yaml")) >= 5  # the parser found the examples: the check is not vacuous
    assert params_problems(REPO, tmp_path) == []


def test_the_own_data_examples_are_read_from_docs_data():
    """What tests/test_flows.py runs: the three worked examples, one per dataset, in order."""
    examples = own_data_examples()
    assert [list(example["datasets"]) for example in examples] == [["corpus"], ["classification"], ["instructions"]]


@pytest.mark.slow(40)
def test_every_documented_command_has_a_real_verb_and_real_options():
    assert len(doc_blocks(SHELL)) >= 10
    assert command_problems(REPO) == []


def test_every_path_name_and_link_exists():
    assert path_problems(REPO) == []


def test_the_readme_is_a_short_front_door():
    assert readme_problems(REPO) == []


def test_make_pipeline_and_make_test_do_what_the_readme_says():
    """`make pipeline` is `llm-pipeline run` and `make test` is `pytest`, each after setting up .venv."""
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^pipeline: setup\n\tllm-pipeline run\n", makefile, re.M)
    assert re.search(r"^test: setup\n\tpytest\n", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()


# -- the checks can fail: each catches errors planted in a copy of the docs ---------------------------
def test_the_checks_catch_planted_errors(tmp_path: Path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    for page in doc_pages():
        shutil.copy(page, root / page.relative_to(REPO))
    shutil.copy(REPO / "Makefile", root / "Makefile")
    with (root / "docs" / "data.md").open("a", encoding="utf-8") as out:
        out.write("\n## Planted\n\n```yaml\ndatasets:\n  corpus:\n    sourcez: [my-data/corpus]\n```\n\n"
                  "```yaml\npretrain:\n  lr: -1\n```\n\n```yaml\ntrainer:\n  lr: 0.1\n```\n\n"
                  "```yaml\ndatasets:\n  corpus:\n    sources: [data/raw/mine.txt]\n```\n\n"
                  "```bash\nllm-pipeline train --fast\nllm-pipeline run --fast\n"
                  "llm-pipeline flow run --cron '0 1 * * *'\nmake deploy\npython -m pipeline.flows run\n```\n\n"
                  "See `llm-pipeline review --verbose`, tests/test_own_data.py, docs/nowhere.md,\n"
                  "`gpt.train.tune_malloc`, [the registry](registry.md#no-such-heading) and [gone](gone.md).\n")
    readme = root / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8").replace("| `llm-pipeline serve", "| `serve")
                      + "\n" * README_MAX_LINES, encoding="utf-8")

    params = params_problems(root, tmp_path)
    assert len(params) == 4, params
    assert "unknown key datasets.corpus.sourcez" in params[0]
    assert "pretrain.lr must be" in params[1]
    assert "unknown section trainer" in params[2]
    assert "data/ holds the pipeline's outputs" in params[3]

    commands = " | ".join(command_problems(root))
    for expected in ("unknown verb 'train'", "run: no option --fast", "flow: no option --cron",
                     "review: no option --verbose", "make deploy: no such Makefile target",
                     "python -m pipeline.flows: no such module"):
        assert expected in commands, commands

    paths = " | ".join(path_problems(root))
    for expected in ("tests/test_own_data.py does not exist", "docs/nowhere.md does not exist",
                     "gpt.train.tune_malloc is not", "registry.md#no-such-heading: no such heading",
                     "gone.md: no such file"):
        assert expected in paths, paths

    readme_found = " | ".join(readme_problems(root))
    assert "lines, more than 300" in readme_found and "verb serve is not in its command table" in readme_found
