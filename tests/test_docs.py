"""The docs stay honest: links resolve, anchors exist, and docs/cli.md covers the CLI.

Every relative link in the README, BENCHMARKS.md, DEVELOPERS.md, benchmarks/HISTORY.md and
docs/ must name a file inside the repository, and a link into a Markdown file's section must
name a heading that file has (GitHub's anchor rule, ``slug``): anchors are what break when
sections move. docs/cli.md must have one section per ``drcl`` subcommand, listing exactly the
options that ``drcl <command> --help`` prints (the parser is built in-process, no subprocess).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from drcl.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "DEVELOPERS.md", ROOT / "benchmarks" / "HISTORY.md",
        *sorted((ROOT / "docs").glob("**/*.md"))]
CLI_DOC = ROOT / "docs" / "cli.md"

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the text may hold one level of brackets; an optional title
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, every character that is not a
    letter, digit, space, hyphen or underscore dropped, each space turned into a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if m:
            s = slug(m.group(2))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(path: Path):
    """(line number, target) of every inline, image and reference link outside code."""
    for n, line in prose_lines(path.read_text()):
        line = CODE_SPAN.sub("", line)
        for m in LINK.finditer(line):
            yield n, m.group(1)
        m = REFERENCE.match(line)
        if m:
            yield n, m.group(1)


def broken_links(path: Path) -> list[str]:
    problems = []
    for n, target in links(path):
        if SCHEME.match(target):
            continue  # http(s), mailto: not ours to check offline
        where = f"{path.relative_to(ROOT)}:{n}: {target}"
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        try:
            dest.relative_to(ROOT)
        except ValueError:
            problems.append(f"{where}: points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: {dest.relative_to(ROOT)} has no heading with anchor #{anchor}")
    return problems


def test_slug_follows_githubs_rule():
    assert slug("`drcl demo`") == "drcl-demo"
    assert slug("HCL's gap on the three tail-gain datasets, and what raising it costs (CPU)") == (
        "hcls-gap-on-the-three-tail-gain-datasets-and-what-raising-it-costs-cpu")
    assert slug("Tail-class gain with the shipped tiny config (`mask_ratio` 0.1): three seeds") == (
        "tail-class-gain-with-the-shipped-tiny-config-mask_ratio-01-three-seeds")
    assert slug("Repeat factors — at LVIS v1 scale") == "repeat-factors--at-lvis-v1-scale"


def test_the_link_checker_finds_breaks(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Top\n\n## Two words\n")
    doc = tmp_path / "b.md"
    doc.write_text("[ok](a.md#two-words) [self](#here) `[code](nowhere.md)` ![img](a.md)\n\n# Here\n\n"
                   "```\n[fenced](nowhere.md)\n```\n"
                   "[gone](missing.md) [moved](a.md#three-words) [out](../x.md) [web](https://example.org/x)\n")
    problems = broken_links(doc)
    assert len(problems) == 3, problems
    assert "missing.md: no such file" in problems[0]
    assert "no heading with anchor #three-words" in problems[1]
    assert "outside the repository" in problems[2]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(path):
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_nothing_points_outside_the_repository():
    """The internal design notes are not part of what a user clones."""
    this = Path(__file__).resolve()
    files = [*DOCS, ROOT / "pyproject.toml",
             *[p for d in ("src", "benchmarks", "configs", "tests") for p in (ROOT / d).rglob("*")
               if p.suffix in {".py", ".md", ".yaml", ".sh", ".toml"} and p.resolve() != this]]
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
            if "DESIGN.md" in line or "../shared" in line]
    assert not hits, "these lines point to DESIGN.md or ../shared, outside the repository:\n" + "\n".join(hits)


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 130, f"README.md has {len(lines)} lines: move detail to docs/ (issue 27: about 120)"


# ---- docs/cli.md against the parser ----

def cli_commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def parser_arguments(p: argparse.ArgumentParser) -> set[str]:
    """Long options (``--foo``) and positionals (upper-cased, ``OUT``) as --help prints them."""
    names = set()
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if a.option_strings:
            names.update(s for s in a.option_strings if s.startswith("--"))
        else:
            names.add((a.metavar or a.dest).upper())
    return names


def documented_commands(text: str) -> dict[str, set[str]]:
    """docs/cli.md's ``## `drcl CMD` `` sections, each with the arguments its options table names
    (the first backticked word of each row's first cell: ``--foo`` or a positional ``OUT``)."""
    sections: dict[str, set[str]] = {}
    current = None
    for _, line in prose_lines(text):
        m = re.match(r"^##\s+`drcl ([a-z-]+)", line)
        if m:
            current = sections.setdefault(m.group(1), set())
            continue
        if line.startswith("## "):
            current = None
        elif current is not None and line.startswith("|"):
            first_cell = line.strip("|").split("|")[0]
            for span in re.findall(r"`([^`]+)`", first_cell):
                word = span.split()[0]
                if word.startswith("--") or re.fullmatch(r"[A-Z][A-Z0-9_]*", word):
                    current.add(word)
    return sections


def cli_doc_problems(text: str) -> list[str]:
    commands, documented = cli_commands(), documented_commands(text)
    problems = [f"`drcl {c}` has no section in docs/cli.md" for c in sorted(set(commands) - set(documented))]
    problems += [f"docs/cli.md documents `drcl {c}`, which the CLI does not have"
                 for c in sorted(set(documented) - set(commands))]
    for c in sorted(set(commands) & set(documented)):
        have, doc = parser_arguments(commands[c]), documented[c]
        problems += [f"`drcl {c} {a}` is not in its docs/cli.md options table" for a in sorted(have - doc)]
        problems += [f"docs/cli.md lists `{a}` for `drcl {c}`, which does not take it" for a in sorted(doc - have)]
    return problems


def test_every_subcommand_and_option_is_in_cli_md():
    problems = cli_doc_problems(CLI_DOC.read_text())
    assert not problems, "\n".join(problems)


def test_top_level_options_are_in_cli_md():
    text = CLI_DOC.read_text()
    top = {s for a in build_parser()._actions for s in a.option_strings
           if s.startswith("--") and not isinstance(a, argparse._HelpAction)}
    assert {o for o in top if f"drcl {o}" not in text} == set()


def test_the_cli_check_finds_gaps():
    text = CLI_DOC.read_text()
    before = set(cli_doc_problems(text))  # empty unless the test above fails too
    without_demo = re.sub(r"^## `drcl demo`.*?(?=^## |\Z)", "", text, flags=re.S | re.M)
    assert set(cli_doc_problems(without_demo)) - before == {"`drcl demo` has no section in docs/cli.md"}
    without_option = re.sub(r"^\| `--no-eval`.*\n", "", text, flags=re.M)
    assert set(cli_doc_problems(without_option)) - before == {
        "`drcl finetune --no-eval` is not in its docs/cli.md options table"}
    with_stale = text.replace("| `--no-eval` |", "| `--no-eval` | x |\n| `--eval-only` |")
    assert set(cli_doc_problems(with_stale)) - before == {
        "docs/cli.md lists `--eval-only` for `drcl finetune`, which does not take it"}
