"""User-facing errors: one clear line that names the input and the fix."""

from __future__ import annotations


class CareError(ValueError):
    """An error caused by user input (config, data, files).

    The CLI prints ``error: <message>`` on one line and exits with status 2, without a traceback.
    The message names the offending input and says how to fix it.
    """
