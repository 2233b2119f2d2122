"""Reading a large JSON object one array element at a time.

``json.load`` of LVIS v1 train (1.1 GB, 1.27M annotations with polygons) builds about 4 GB of
Python objects before the first record can be looked at. :func:`stream_object` reads the
file in chunks instead and hands the elements of chosen top-level arrays (``"images"``,
``"annotations"``) to a callback one by one, so what is kept is what the callback keeps. Each
element is parsed by the standard library's own scanner (the C one behind ``json.loads``), so
values come out exactly as ``json.loads`` gives them.

A caller that does not need some values can have them cut out of the text before it is
parsed (``transform``, applied to the text in the buffer each time more is read; it must leave
its own output unchanged): parsing 125M polygon coordinates is most of the time ``json.loads``
spends on LVIS.

It reads only well-formed files: anything unexpected (bad syntax, a top level that is not an
object, a repeated streamed key, a byte order mark other than UTF-8's) raises
:class:`NotStreamable`, and the caller falls back to ``json.loads``, whose error messages
name the line and column.
"""

from __future__ import annotations

import codecs
import json
import json.scanner
import re
from typing import Callable

#: bytes read at a time
CHUNK = 1 << 24
#: an element is parsed only when this much text (or the end of the file) is in the buffer
MARGIN = 1 << 20

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER_CHARS = frozenset("0123456789.eE+-")
_scan = json.scanner.make_scanner(json.JSONDecoder())


class NotStreamable(Exception):
    """The file is not a well-formed JSON object (the caller reads it with ``json.loads``)."""


class _Text:
    """A window on the decoded text of a file: ``buf[pos:]`` is what is left to read."""

    def __init__(self, f, chunk: int, margin: int, transform, progress):
        self.f, self.chunk, self.margin, self.transform, self.progress = f, chunk, margin, transform, progress
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof = "", 0, False
        self._fill()
        if self.buf.startswith("\ufeff"):  # json.loads of bytes reads UTF-8 with a BOM too
            self.pos = 1

    def _fill(self) -> None:
        """Drop what was read and append the next chunk."""
        data = self.f.read(self.chunk)
        if self.progress is not None:
            self.progress(len(data))
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError:
            raise NotStreamable from None
        self.eof = not data
        self.buf = self.buf[self.pos:] + text
        self.pos = 0
        if self.transform is not None:
            self.buf = self.transform(self.buf)

    def peek(self) -> str:
        """The next character after whitespace ('' at the end of the file)."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self._fill()

    def take(self, chars: str) -> str:
        """Consume the next character, which must be one of ``chars``."""
        c = self.peek()
        if not c or c not in chars:
            raise NotStreamable
        self.pos += 1
        return c

    def value(self):
        """Parse the JSON value that starts at the next character."""
        self.peek()
        while not self.eof and len(self.buf) - self.pos < self.margin:
            self._fill()
        while True:
            try:
                obj, end = _scan(self.buf, self.pos)
            except (StopIteration, json.JSONDecodeError):
                if self.eof:
                    raise NotStreamable from None
                self._fill()  # the value runs past the buffer: read on
                continue
            if not self.eof and (end >= len(self.buf) or (type(obj) in (int, float) and self.buf[end] in _NUMBER_CHARS)):
                self._fill()  # a number cut at the buffer's end ('1.2' of '1.25e3') parses short: read on
                continue
            self.pos = end
            return obj


def stream_object(path, elements: dict[str, Callable[[object, int], None]],
                  transform: Callable[[str], str] | None = None, progress: Callable[[int], None] | None = None,
                  chunk: int | None = None, margin: int | None = None) -> tuple[dict, dict]:
    """Read the JSON object in ``path``, calling ``elements[key](element, n)`` for each element
    (``n`` from 0) of the top-level arrays named in ``elements``, in file order.

    Returns ``(values, counts)``: the object's keys that were not streamed with their values
    (a key of ``elements`` whose value is not an array among them), and the streamed keys with
    the number of elements each had.
    ``transform`` rewrites the text before it is parsed (see above); ``progress`` is called
    with the number of bytes of each chunk read; ``chunk`` and ``margin`` default to
    :data:`CHUNK` and :data:`MARGIN`. Raises
    :class:`NotStreamable` if the file is not a well-formed JSON object, and whatever
    opening the file or a callback raises."""
    out: dict = {}
    counts: dict = {}
    with open(path, "rb") as f:
        text = _Text(f, chunk or CHUNK, margin or MARGIN, transform, progress)
        text.take("{")
        if text.peek() == "}":
            text.take("}")
        else:
            while True:
                key = text.value()
                if not isinstance(key, str):
                    raise NotStreamable
                text.take(":")
                if key in elements and text.peek() == "[":
                    if key in counts:  # json.loads keeps the last; rare enough to leave to it
                        raise NotStreamable
                    text.take("[")
                    n = 0
                    if text.peek() == "]":
                        text.take("]")
                    else:
                        handle = elements[key]
                        while True:
                            handle(text.value(), n)
                            n += 1
                            if text.take(",]") == "]":
                                break
                    counts[key] = n
                else:
                    out[key] = text.value()
                if text.take(",}") == "}":
                    break
        if text.peek():
            raise NotStreamable  # text after the object
    return out, counts
