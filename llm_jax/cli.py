"""Shared plumbing for the command-line scripts: user errors become one line and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from llm_jax.errors import UserError


def run_main(main: Callable[[list[str]], int | None]) -> None:
    try:
        code = main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
