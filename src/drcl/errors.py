"""Errors users can act on.

A :class:`DataError` carries a one-line message that names the file and the record
(image / annotation / category id). The CLI prints it as ``error: <message>`` and exits
with code 2 instead of showing a traceback.
"""


class DataError(Exception):
    """Bad input data: malformed JSON, missing keys, bad boxes, unreadable images."""

    exit_code = 2
