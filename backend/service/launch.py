"""The `farslip` console script. The command line imports torch, open_clip and GDAL before any command runs
(a second or more; longer from a cold disk): Ctrl+C in that time ended in a Python traceback. Here it ends
as it does later, in one line and exit status 130; nothing can have been written yet."""

from __future__ import annotations

import sys

INTERRUPTED = "Interrupted; nothing was written."


def main() -> None:
    try:
        from backend.service.cli import main as command_line
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None
    command_line()


if __name__ == "__main__":
    main()
