"""Reading a JSONL file line by line: byte offsets, line numbers, and the account of bad records.

`scan_lines(f, path, start, end, first_line, ...)` parses the lines that begin in bytes [start, end) of
an open binary file (a whole file, or one shard of it that starts right after a newline) and yields
(byte offset, body length, line number, Record) for each good line. A line is what `readline` returns:
up to and including b"\\n"; "\\r\\n" endings and a UTF-8 byte-order mark on line 1 are accepted. A
line longer than max_record_bytes is not read into memory: its remainder is skipped in 1 MiB reads.

A bad line raises `BadRecord("file:line: reason (hint)")`, or, given a `BadRecords`, is counted: the
first MAX_REPORTED messages are kept per file and `BadRecords.log` writes them with the count of the
rest. The hint names the switch of whoever reads the file (the trainer's config key or the CLI flag).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import BinaryIO

import os

from piccolo_jax.data.records import BadRecord, Record, UnknownSchema, parse_line

MAX_REPORTED = 5  # bad-record messages kept (and logged) per file
TRAINER_HINT = "set data.skip_bad_records = true to skip and count such records"
CLI_HINT = "pass --skip-bad-records to skip and count such records"


def schema_hint(hint: str, dataset: str) -> str:
    """What to set when a dataset's first record has unknown columns (records.UnknownSchema): its column
    map, in the words of whoever reads it (the trainer's config key or the CLI flag of `hint`)."""
    if hint == TRAINER_HINT:
        return (f"map your columns to ours: --set 'data.columns={{{dataset} = {{text = \"QUERY_COLUMN\", "
                f"text_pos = \"PASSAGE_COLUMN\"}}}}' (see the README's \"Bring your data\")")
    return "map your columns to ours: --columns text=QUERY_COLUMN,text_pos=PASSAGE_COLUMN"


def check_record(record_or_error, where: str, first: bool, dataset: str, bad: "BadRecords | None", hint: str):
    """The account of one parsed record: `record_or_error` is a Record or the BadRecord it raised.

    Returns the Record, or None when it is bad and counted in `bad`; raises BadRecord("where: reason (hint)")
    otherwise. Unknown columns in the dataset's first record are raised even when counting: no record of
    that dataset could pass, and the message names the column map instead of the skip switch."""
    if not isinstance(record_or_error, BadRecord):
        return record_or_error
    message = f"{where}: {record_or_error}"
    if first and isinstance(record_or_error, UnknownSchema):
        raise UnknownSchema(f"{message}; {schema_hint(hint, dataset)}") from None
    if bad is None:
        raise BadRecord(f"{message} ({hint})") from None
    bad.add(message)
    return None
_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass
class BadRecords:
    """Bad records skipped in one file: their count and the first MAX_REPORTED "file:line: reason"."""

    path: str
    count: int = 0
    messages: list[str] = dataclasses.field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.messages) < MAX_REPORTED:
            self.messages.append(message)

    def merge(self, other: "BadRecords") -> None:
        """Append the account of a later part of the same file."""
        for message in other.messages:
            if len(self.messages) < MAX_REPORTED:
                self.messages.append(message)
        self.count += other.count

    def log(self, logger: logging.Logger) -> None:
        """One warning with the count, then one line per kept message, then the number not shown."""
        if not self.count:
            return
        logger.warning("%s: skipped %d bad records%s", self.path, self.count,
                       ":" if self.messages else "")
        for message in self.messages:
            logger.warning("  %s", message)
        if self.count > len(self.messages):
            logger.warning("  ... and %d more bad records in %s", self.count - len(self.messages), self.path)


def scan_lines(f: BinaryIO, path: str, start: int = 0, end: int | None = None, first_line: int = 1,
               record_format: str = "auto", max_record_bytes: int = 1 << 20,
               bad: BadRecords | None = None, hint: str = TRAINER_HINT, columns=None
               ) -> Iterator[tuple[int, int, int, Record]]:
    """Yield (offset, length, line number, record) for every good line beginning in [start, end).

    `offset` and `length` locate the line's JSON text without its line ending (and without a
    byte-order mark), so that os.pread(fd, length, offset) reads it back. Bad lines raise BadRecord
    naming path:line unless `bad` is given, which then counts them (see module doc).
    """
    f.seek(start)
    position, line_no = start, first_line - 1
    first = start == 0  # until the file's first good record (check_record)
    dataset = os.path.splitext(os.path.basename(path))[0]
    while end is None or position < end:
        raw = f.readline(max_record_bytes + 1)
        if not raw:
            break
        line_no += 1
        offset, position = position, position + len(raw)
        if offset == 0 and raw.startswith(_BOM):
            raw, offset = raw[3:], offset + 3
        try:
            if len(raw) > max_record_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line unread
                    raw = f.readline(1 << 20)
                    position += len(raw)
                raise BadRecord(f"line is {position - offset:,} bytes, over max_record_bytes="
                                f"{max_record_bytes:,}")
            body = raw.rstrip(b"\r\n")
            record = parse_line(body, record_format, columns)
        except BadRecord as e:
            record = e
        if check_record(record, f"{path}:{line_no}", first, dataset, bad, hint) is None:
            continue
        first = False
        yield offset, len(body), line_no, record
