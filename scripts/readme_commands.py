"""The shell commands of the README: list them, or run every ``bash`` block in order in a checkout.

    python scripts/readme_commands.py                      # list the commands, block by block
    python scripts/readme_commands.py --run --skip 'make test'   # run them here (a fresh clone)

Blocks run as one ``bash -euo pipefail`` script, so the README's own ``source .venv/bin/activate``
line activates the environment for the blocks after it, exactly as for a user. A line matching a
``--skip`` regex is echoed instead of run (say why in the report). tests/unit/test_readme.py checks,
without running them, that every command exists with the options it is given.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

FENCE = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def bash_blocks(markdown: str) -> list[str]:
    """The body of every fenced ``bash`` block, in order."""
    return [m.group(1) for m in FENCE.finditer(markdown)]


def logical_lines(block: str) -> list[str]:
    """Lines of a block with ``\\`` continuations joined and trailing comments removed."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(line.split(" #")[0].strip() if " #" in line else line.strip())
    return lines


def commands(line: str) -> list[list[str]]:
    """The simple commands of a line (split at ``&&``), each as argv."""
    return [shlex.split(part) for part in line.split("&&") if part.strip()]


def script(markdown: str, skip: list[str]) -> str:
    out = ["set -euo pipefail"]
    for number, block in enumerate(bash_blocks(markdown), 1):
        out.append(f"echo '### block {number}'")
        for line in logical_lines(block):
            if any(re.search(pattern, line) for pattern in skip):
                out.append(f"echo {shlex.quote('skipped: ' + line)}")
            else:
                out += [f"echo {shlex.quote('$ ' + line)}", line]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("readme", nargs="?", default="README.md", type=Path)
    parser.add_argument("--run", action="store_true", help="run the blocks in the current directory")
    parser.add_argument("--skip", action="append", default=[], help="regex of lines not to run (repeatable)")
    args = parser.parse_args()
    text = script(args.readme.read_text(), args.skip)
    if not args.run:
        print(text)
        return
    sys.exit(subprocess.run(["bash", "-c", text]).returncode)


if __name__ == "__main__":
    main()
