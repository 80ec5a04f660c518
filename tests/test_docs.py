"""The README and docs/ stay true to the repository: every relative link (and `#anchor`) resolves, and every command
in the README's command list is accepted by the CLI's own argument parsing, so a renamed or removed flag fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_MAX_LINES = 250

# Pages the README links to that other branches bring; a link to one of them is allowed only while it is missing.
# The lead empties this list once they have all landed.

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto: ... : not a file of this repository
SHELL_OPERATOR = set("();<>|&")


def markdown_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            lines.append((number, line))
    return lines


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: dict[str, int] = {}
    names = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        anchor = heading_anchor(match.group(2))
        count = found.get(anchor, 0)
        names.add(anchor if count == 0 else f"{anchor}-{count}")  # GitHub numbers repeated headings
        found[anchor] = count + 1
    return names


def relative_links(path: Path) -> list[tuple[int, str]]:
    links = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        reference = REFERENCE_LINK.match(line)
        if reference:
            links.append((number, reference.group(1)))
            continue
        line = re.sub(r"`[^`]*`", "``", line)  # a link written inside code is text, not a link
        links += [(number, target) for target in INLINE_LINK.findall(line)]
    return [(number, target) for number, target in links if not SCHEME.match(target)]


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """'FILE:LINE: TARGET (why)' for each relative link of `path` (a file under `root`) that does not resolve."""
    problems = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        try:
            repo_path = linked.relative_to(root.resolve()).as_posix()
        except ValueError:
            problems.append(f"{where} (outside the repository)")
            continue
        if not linked.exists():
            problems.append(f"{where} (no such file: {repo_path})")
            continue
        if anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            problems.append(f"{where} (no heading #{anchor} in {repo_path})")
    return problems


def readme_commands() -> list[str]:
    """The lines of the first ```sh block after the README's '## Commands' heading."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Commands"), None)
    assert start is not None, "README.md has no '## Commands' section"
    opening = next((i for i in range(start + 1, len(lines)) if lines[i].strip() == "```sh"), None)
    assert opening is not None, "README.md's '## Commands' section has no ```sh block"
    commands = []
    for line in lines[opening + 1:]:
        if FENCE.match(line):
            return commands
        if line.strip():
            commands.append(line)
    raise AssertionError("README.md's command block is not closed")


def cli_rejects(command: str) -> str | None:
    """Why `starqa`'s own parser refuses `command` (None if it accepts it): the group, then the subcommand, each
    building its context from the arguments (types checked, required ones present) without running anything."""
    import typer

    from starqa.cli import app

    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    if any(token and set(token) <= SHELL_OPERATOR for token in lexer):
        return "has shell syntax (a pipe, a redirection, several commands): the list holds plain commands"
    words = shlex.split(command, comments=True)
    if not words or words[0] != "starqa":
        return "does not start with `starqa`"
    group = typer.main.get_command(app)
    try:
        context = group.make_context("starqa", words[1:], resilient_parsing=False)
        name, command_object, rest = group.resolve_command(context, [*getattr(context, "_protected_args", []),
                                                                    *context.args])
        command_object.make_context(name, rest, parent=context, resilient_parsing=False)
    except Exception as exc:  # click's UsageError and its kin (Typer vendors its own click): refused
        return f"{type(exc).__name__}: {exc}"
    return None


def test_readme_fits_on_a_few_screens():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_every_readme_command_is_accepted_by_the_cli():
    commands = readme_commands()
    assert len(commands) >= 5
    refused = {command: why for command in commands if (why := cli_rejects(command))}
    assert refused == {}


def test_the_checks_catch_a_stale_flag_and_a_broken_link(tmp_path):
    """The checks themselves can fail: a flag or command the CLI does not have, a value of the wrong type, shell
    syntax, a missing page and a missing heading."""
    assert cli_rejects("starqa ask --doc contract 'What?' --max-new-tokens 8") is None
    assert "NoSuchOption" in cli_rejects("starqa ingest report.pdf --no-such-flag")
    assert cli_rejects("starqa ask --doc contract --batch-size many") is not None
    assert cli_rejects("starqa no-such-command") is not None
    assert cli_rejects("starqa ingest") is not None  # its FILES argument is required
    assert "shell syntax" in cli_rejects("starqa list | head")
    assert "shell syntax" in cli_rejects("starqa ask --doc contract 'Why?' --json > answers.jsonl")

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Star Attention, as implemented\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text("\n".join([
        "# Title", "",
        "[fine](docs/page.md) [anchor](docs/page.md#star-attention-as-implemented) [here](#title)",
        "[web](https://example.org/x.md) `[in code](docs/nothing.md)`",
        "```", "[in a code block](docs/nothing.md)", "```",
        "[missing page](docs/gone.md)",
        "![missing image](docs/gone.png)",
        "[missing heading](docs/page.md#no-such-heading)",
        "[reference]: docs/also-gone.md", ""]), encoding="utf-8")
    problems = broken_links(readme, root=tmp_path)
    assert [problem.split(": ")[1] for problem in problems] == [
        "docs/gone.md (no such file", "docs/gone.png (no such file",
        "docs/page.md#no-such-heading (no heading #no-such-heading in docs/page.md)", "docs/also-gone.md (no such file"]

    assert heading_anchor("Precision: bfloat16 compute and the stored KV's dtype") == \
        "precision-bfloat16-compute-and-the-stored-kvs-dtype"
    assert heading_anchor("A warm server: `starqa serve`") == "a-warm-server-starqa-serve"
