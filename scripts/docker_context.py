"""The files `docker build` sends from a folder (its build context) and `COPY . .` copies: every file below it,
less what .dockerignore excludes - git plays no part, so untracked and git-ignored files are copied unless
.dockerignore names them.

.dockerignore is read as Docker reads it (the moby patternmatcher rules): one pattern a line, `#` comments, `!`
re-includes, each pattern cleaned like a path and anchored at the context root (`*.pyc` is top-level only;
`**/*.pyc` is everywhere); `*` and `?` stay within one path part, `**` spans any number of them; a file is
excluded when the last pattern matching it or one of its parent folders is not a `!` pattern.

    python scripts/docker_context.py [FOLDER]                  # the list, one path a line
    python scripts/docker_context.py [FOLDER] --copy-to DIR    # copy exactly those files into DIR
"""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

_ESCAPE = set(".+()|{}$")


@dataclass(frozen=True)
class Pattern:
    text: str
    exclusion: bool  # a `!` pattern: re-includes what it matches
    regex: re.Pattern

    def match(self, path: str) -> bool:
        return self.regex.match(path) is not None


def _compile(pattern: str) -> re.Pattern:
    """Docker's translation of one cleaned pattern into a regular expression."""
    out, i, n = "^", 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 1
                if i + 1 < n and pattern[i + 1] == "/":
                    i += 1  # `**/` reads as `**`
                out += ".*" if i + 1 >= n else "(.*/)?"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < n:
            i += 1
            out += re.escape(pattern[i])
        elif ch in _ESCAPE:
            out += "\\" + ch
        else:
            out += ch  # letters, '/', and character classes [...] pass through
        i += 1
    return re.compile(out + "$")


def read_patterns(text: str) -> list[Pattern]:
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        if exclusion:
            line = line[1:].strip()
        if not line:
            continue
        cleaned = posixpath.normpath(line)
        if len(cleaned) > 1 and cleaned.startswith("/"):
            cleaned = cleaned.lstrip("/")
        patterns.append(Pattern(line, exclusion, _compile(cleaned)))
    return patterns


def excluded(path: str, patterns: list[Pattern]) -> bool:
    """Docker's MatchesOrParentMatches: the last pattern that matches the path or one of its parents decides."""
    parents = posixpath.dirname(path).split("/") if "/" in path else []
    matched = False
    for p in patterns:
        if p.exclusion != matched:  # only a pattern that could change the verdict is tried
            continue
        hit = p.match(path) or any(p.match("/".join(parents[: i + 1])) for i in range(len(parents)))
        if hit:
            matched = not p.exclusion
    return matched


def context_files(root: Path) -> list[str]:
    """Relative paths (with '/') of the files and links docker would copy from `root`, sorted."""
    root = Path(root)
    ignore = root / ".dockerignore"
    patterns = read_patterns(ignore.read_text()) if ignore.is_file() else []
    can_reinclude = any(p.exclusion for p in patterns)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        if not can_reinclude:  # an excluded folder is not walked (docker skips it the same way)
            dirnames[:] = [d for d in dirnames if not excluded(rel_dir + d, patterns)]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = rel_dir + name
            if not excluded(rel, patterns):
                out.append(rel)
    return sorted(out)


def copy_context(root: Path, dest: Path) -> int:
    """Copy the context's files into `dest` (links stay links); returns how many."""
    files = context_files(root)
    for rel in files:
        src, dst = Path(root) / rel, Path(dest) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    return len(files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", default=".")
    p.add_argument("--copy-to", default=None)
    a = p.parse_args(argv)
    if a.copy_to:
        n = copy_context(Path(a.folder), Path(a.copy_to))
        print(f"copied {n} files: what docker build would copy (.dockerignore honoured)")
    else:
        sys.stdout.write("".join(f + "\n" for f in context_files(Path(a.folder))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
