"""The documentation cannot drift from the code: links resolve, every setting is documented,
the README stays a short front door, every module, file and test it names exists, the fixed
values and exit statuses it states are the code's, and no branch's fragment in docs/incoming/
is left unfolded.

Plain file reads and one call of ``Settings.from_env``; no Redis, no network.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from polyv_sms.background import WORKER_INDEX_ENV
from polyv_sms.cli import run as cli_run
from polyv_sms.cli.run import RUN_DIR_ENV
from polyv_sms.config import Settings
from polyv_sms.tasks import EXIT_BACKGROUND_FAILED

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
OPERATIONS = DOCS / "operations.md"
#: Where feature branches leave their documentation until it is folded into the pages.
INCOMING = DOCS / "incoming"
ENV_EXAMPLE = ROOT / ".env.example"
MAX_README_LINES = 250
#: Written by runs, git-ignored: named in the docs, absent from a clean clone.
GENERATED_DIRS = ("benchmarks/results",)
#: Read by the code outside ``Settings``: the supervisord set-up's own variables.
VARIABLES_OUTSIDE_SETTINGS = frozenset({RUN_DIR_ENV, WORKER_INDEX_ENV})

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
_VARIABLE = re.compile(r"\b((?:SMS|POLYV)_[A-Z0-9_]+)\b")
_REPO_PATH = re.compile(r"\b((?:polyv_sms|tests|deploy|benchmarks|scripts)/[\w./*-]*)")


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md")), ROOT / "benchmarks" / "README.md"]


def _prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """The lines of a Markdown text outside fenced code blocks, with their numbers."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def _code_blocks(text: str) -> list[tuple[int, str]]:
    """Each fenced code block: the line it starts on and its content."""
    blocks: list[tuple[int, str]] = []
    current: list[str] | None = None
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            if current is None:
                current, start = [], number
            else:
                blocks.append((start, "\n".join(current)))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower-cased, punctuation
    dropped (letters, digits, ``_``, ``-`` and spaces stay), spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("*", "")
    kept = []
    for char in text.lower():
        if char.isalnum() or char in "_- " or unicodedata.category(char).startswith("M"):
            kept.append(char)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in _prose_lines(path.read_text("utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """The relative link targets of a Markdown file (outside code), with their line numbers."""
    links = []
    for number, line in _prose_lines(path.read_text("utf-8")):
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # http:, https:, mailto:
            links.append((number, target))
    return links


def broken_links(path: Path) -> list[str]:
    """What is wrong with each relative link of ``path``: a missing file or a missing anchor."""
    problems = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not linked.exists():
            problems.append(f"{where}: no file {file_part}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{where}: no heading #{anchor} in {linked.relative_to(ROOT)}")
        elif anchor and linked.suffix != ".md":
            problems.append(f"{where}: an anchor into a file that is not Markdown")
    return problems


class RecordingEnv(dict[str, str]):
    """An environment that remembers every variable asked for, however it is asked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return super().__contains__(key)


def variables_settings_reads() -> set[str]:
    """Every variable ``Settings.from_env`` asks for, with and without the optional ones set."""
    asked: set[str] = set()
    for values in (
        {},
        {
            "SMS_BROKER_URL": "amqp://guest@127.0.0.1:5672//",
            "SMS_REDIS_URL": "redis://127.0.0.1:6399/0",
            "SMS_METRICS_PORT": "9100",
            "POLYV_APP_ID": "app",
            "POLYV_APP_SECRET": "secret",
        },
    ):
        env = RecordingEnv(values)
        Settings.from_env(env)
        asked |= env.asked
    return asked


def documented_variables() -> set[str]:
    """The variables of the settings table: the first cell of each row of configuration.md."""
    rows = set()
    for _, line in _prose_lines(CONFIGURATION.read_text("utf-8")):
        match = re.match(r"^\|\s*`((?:SMS|POLYV)_[A-Z0-9_]+)`\s*\|", line)
        if match:
            rows.add(match.group(1))
    return rows


def example_variables() -> set[str]:
    """The variables ``.env.example`` assigns."""
    found = set()
    for line in ENV_EXAMPLE.read_text("utf-8").splitlines():
        match = re.match(r"^\s*((?:SMS|POLYV)_[A-Z0-9_]+)\s*=", line)
        if match:
            found.add(match.group(1))
    return found


# --- links -----------------------------------------------------------------------------------


def test_every_relative_link_resolves() -> None:
    problems = [problem for path in _markdown_files() for problem in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_check_sees_links_and_anchors() -> None:
    # The checker itself: it finds the README's links and GitHub's anchors.
    assert "docs/getting-started.md" in {t for _, t in relative_links(README)}, (
        "README.md must link to the local walkthrough, docs/getting-started.md"
    )
    assert github_slug("Why `stopwaitsecs=370`") == "why-stopwaitsecs370"
    assert github_slug("2. Sent once; not again") == "2-sent-once-not-again"
    assert github_slug("The 3 × PING target") == "the-3--ping-target"


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    page = DOCS / "_test_docs_probe.md"
    page.write_text(
        "# Probe\n\n[ok](configuration.md#the-settings) [gone](nowhere.md) "
        "[no anchor](configuration.md#no-such-heading) `[code](ignored.md)`\n\n"
        "```\n[in a block](ignored-too.md)\n```\n",
        "utf-8",
    )
    try:
        problems = broken_links(page)
    finally:
        page.unlink()
    assert len(problems) == 2, problems
    assert "no file nowhere.md" in problems[0]
    assert "no heading #no-such-heading" in problems[1]


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    linked = {
        (README.parent / target.partition("#")[0]).resolve()
        for _, target in relative_links(README)
        if target.partition("#")[0]
    }
    pages = {path.resolve() for path in DOCS.glob("*.md")}
    orphans = sorted(str(path.relative_to(ROOT)) for path in pages - linked)
    assert not orphans, f"docs pages the README's table of contents does not link: {orphans}"


# --- settings --------------------------------------------------------------------------------


def test_the_recording_env_sees_what_settings_reads() -> None:
    asked = variables_settings_reads()
    assert {"SMS_BROKER_URL", "POLYV_APP_SECRET", "SMS_METRICS_PORT"} <= asked
    assert all(_VARIABLE.fullmatch(name) for name in asked), sorted(asked)


def test_every_variable_settings_reads_is_in_the_configuration_table() -> None:
    missing = sorted(variables_settings_reads() - documented_variables())
    assert not missing, f"docs/configuration.md has no table row for {missing}"


def test_the_configuration_table_lists_only_variables_the_code_reads() -> None:
    read = variables_settings_reads() | VARIABLES_OUTSIDE_SETTINGS
    unknown = sorted(documented_variables() - read)
    assert not unknown, f"docs/configuration.md documents variables nothing reads: {unknown}"


def test_env_example_and_the_configuration_table_agree() -> None:
    documented, example = documented_variables(), example_variables()
    assert example, ".env.example assigns no SMS_*/POLYV_* variable"
    assert not sorted(example - documented), "in .env.example, not in docs/configuration.md"
    assert not sorted(documented - example), "in docs/configuration.md, not in .env.example"


# --- the README as a front door ----------------------------------------------------------------


def test_readme_is_short() -> None:
    lines = len(README.read_text("utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; keep it to {MAX_README_LINES}"


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text("utf-8")
    blocks = _code_blocks(text)
    assert blocks, "README.md has no code block"
    start, first = blocks[0]
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands[:2] == ["./scripts/demo.sh", "./scripts/test.sh"], first
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        path = ROOT / script
        assert path.is_file(), f"{script} is missing"
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
    # Nothing but the title and the opening paragraph before it: no other section's code.
    sections_before = [
        line for number, line in _prose_lines(text) if number < start and line.startswith("## ")
    ]
    assert len(sections_before) <= 1, sections_before


# --- names the docs mention exist ------------------------------------------------------------


def _backticked(path: Path) -> Iterator[str]:
    for match in re.finditer(r"`([^`\n]+)`", path.read_text("utf-8")):
        yield match.group(1)


def _resolves(dotted: str) -> bool:
    """``polyv_sms.a.b`` names a module, or an attribute of one (``polyv_sms.worker.app``)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            obj: Any = importlib.import_module(module_name)
            for attribute in parts[cut:]:
                if not hasattr(obj, attribute):
                    return False
                obj = getattr(obj, attribute)
            return True
    return False


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text("utf-8"))
    return any(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.name == name
        for node in ast.walk(tree)
    )


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_files_and_tests_named_in_the_docs_exist(path: Path) -> None:
    problems = []
    for token in _backticked(path):
        for dotted in re.findall(r"\bpolyv_sms(?:\.[A-Za-z_]\w*)+", token):
            if "/" not in token and not _resolves(dotted):
                problems.append(f"module or name {dotted}")
        for file in re.findall(_REPO_PATH, token):
            if "<" in token or file.startswith(GENERATED_DIRS):
                continue  # a pattern (<timestamp>.json) or what a run writes
            pattern = file.rstrip(".")
            if not any(ROOT.glob(pattern)) and not (ROOT / pattern).exists():
                problems.append(f"path {pattern}")
        for test_file, test_name in re.findall(r"\b(tests/[\w/]+\.py)::(\w+)", token):
            if (ROOT / test_file).is_file() and not _defines(ROOT / test_file, test_name):
                problems.append(f"test {test_file}::{test_name}")
    assert not problems, f"{path.relative_to(ROOT)} names what does not exist: {problems}"


# --- fragments are folded, fixed values and exit statuses match the code ------------------------


def test_no_documentation_fragment_is_left_unfolded() -> None:
    # A branch's docs/incoming/<branch>.md is folded into README.md and docs/, then deleted:
    # a fragment left behind is documentation no reader finds.
    left = sorted(str(path.relative_to(ROOT)) for path in INCOMING.glob("**/*.md"))
    assert not left, f"fold these into README.md and docs/, then delete them: {left}"


def _section(path: Path, heading: str) -> list[str]:
    """The prose lines of the section of ``path`` under ``heading`` (to the next heading of the
    same or a higher level)."""
    lines, level = [], 0
    for _, line in _prose_lines(path.read_text("utf-8")):
        match = _HEADING.match(line)
        if match and level and len(match.group(1)) <= level:
            break
        if level:
            lines.append(line)
        elif match and match.group(2) == heading:
            level = len(match.group(1))
    assert level, f"{path.relative_to(ROOT)} has no heading {heading!r}"
    return lines


def _table_rows(lines: list[str]) -> list[list[str]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    return [row for row in rows if row and row[0] and not set(row[0]) <= {"-", ":"}][1:]


def test_the_fixed_values_table_matches_the_code() -> None:
    rows = _table_rows([line for line in _section(CONFIGURATION, "Fixed values") if "|" in line])
    assert rows, "docs/configuration.md: the Fixed values table is empty"
    for name, value, *_ in rows:
        dotted = name.strip("`")
        module_name, _, attribute = dotted.rpartition(".")
        actual = getattr(importlib.import_module(module_name), attribute)
        if isinstance(actual, int | float):
            number = re.match(r"[\d.]+", value)
            assert number, f"{dotted}: the value {value!r} does not start with a number"
            assert float(number.group()) == actual, (
                f"{dotted}: documented {value}, the code has {actual}"
            )


def test_every_exit_status_of_the_command_is_documented() -> None:
    section = _section(OPERATIONS, "Exit statuses")
    documented = {int(row[0]) for row in _table_rows([line for line in section if "|" in line])}
    codes = {value for name, value in vars(cli_run).items() if name.startswith("EXIT_") and value}
    assert codes <= documented, f"exit statuses of polyv-sms not in operations.md: {codes}"
    worker = _section(OPERATIONS, "A worker that cannot start")
    assert any(line.startswith(f"| {EXIT_BACKGROUND_FAILED} |") for line in worker), worker
