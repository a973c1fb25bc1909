"""`keyd bench`: picks the in-process harness or the socket load generator for the options given."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from keyd.bench import inprocess, main


def run(options: main.Options, out: TextIO = sys.stdout) -> tuple[dict[str, Any], bool]:
    """Run the benchmark the options describe; (report document, whether every answer was a 200)."""
    if options.rest:
        from keyd.bench import rest  # noqa: PLC0415 - only this mode needs the TalkJS stand-in

        return rest.run_rest(options, out)
    if options.inprocess:
        report = inprocess.run_inprocess(options, out)
        return report, report["inprocess"]["non_200"] == 0
    return main.run(options, out)
