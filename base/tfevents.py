"""TensorBoard event files, written without TensorBoard: live training curves need nothing installed at run time.

An event file is a sequence of TFRecords (``uint64`` length, masked CRC32C of the length, the data, masked CRC32C
of the data), each holding one serialized ``tensorboard.Event`` protobuf. The few messages needed are encoded by
hand here (field numbers from TensorBoard's ``event.proto`` and ``summary.proto``)::

    Event       wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5, session_log = 7
    Summary     value = 1 (repeated Value)
    Value       tag = 1 (string), simple_value = 2 (float)
    SessionLog  status = 1 (enum; START = 1)

The first record is ``file_version: "brain.Event:2"``, as TensorBoard's own writers put it. One event holds all
the scalars of one step (``simple_value``: float32, as TensorBoard stores scalars). A ``SessionLog`` START event at
step ``s`` marks a session (an attempt) starting; every one after the first that TensorBoard reads in a folder
tells it to drop the points at steps ``>= s`` it read before: how a run that resumed says that an abandoned
attempt's later points are void. TensorBoard ignores the first START it sees, so every attempt's file has one.

Event files are append-only logs that a reader follows while they grow, so unlike results they are written in
place; a reader stops at a torn trailing record and reads on once it is whole.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from pathlib import Path

FILE_VERSION = "brain.Event:2"
EVENT_FILE_MARK = "tfevents"  # TensorBoard reads the files whose names contain it
_EVENT_NAME = re.compile(r"^events\.out\.tfevents\.(\d+)\.")
_SESSION_START = 1  # tensorboard.SessionLog.SessionStatus.START


# ----------------------------------------------------------------------------------------------------- CRC32C
def _crc32c_table() -> tuple[int, ...]:
    polynomial = 0x82F63B78  # Castagnoli, bit-reversed
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ polynomial if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, the checksum TFRecords use."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The TFRecord's masked CRC-32C: rotated right by 15 bits, plus a constant (so CRCs of CRCs stay strong)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord framing ``data``."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


# ----------------------------------------------------------------------------------------------------- protobuf
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, *, scalars: dict[str, float] | None = None,
                 file_version: str | None = None, session_start: bool = False) -> bytes:
    """A serialized ``tensorboard.Event`` at ``step`` (a non-negative integer) holding a summary of ``scalars``
    (tag -> value), a file version, or a session start."""
    if step < 0:
        raise ValueError(f"event steps are non-negative, got {step}")
    event = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        event += _length_delimited(3, file_version.encode("utf-8"))
    if scalars:
        summary = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode("utf-8")) + _key(2, 5) + struct.pack("<f", value))
            for tag, value in scalars.items())
        event += _length_delimited(5, summary)
    if session_start:
        event += _length_delimited(7, _key(1, 0) + _varint(_SESSION_START))
    return event


# ----------------------------------------------------------------------------------------------------- files
def event_files(folder: Path) -> list[Path]:
    """The event files in ``folder``, in the order TensorBoard reads them (by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and EVENT_FILE_MARK in p.name)


def new_event_file_name(folder: Path) -> str:
    """``events.out.tfevents.<seconds>.<host>.<pid>``, named to sort after every event file already in ``folder``
    (TensorBoard reads a folder's files in name order; a clock that went back must not put a resumed attempt's
    file before the earlier one)."""
    stamp = int(time.time())
    for path in event_files(folder):
        match = _EVENT_NAME.match(path.name)
        if match:
            stamp = max(stamp, int(match.group(1)) + 1)
    return f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}"


class EventFileWriter:
    """Appends events to a new event file in ``folder`` (created if needed), starting with the file version and a
    session start at ``session_step``: TensorBoard reading the folder drops the points at steps ``>= session_step``
    of the files before this one."""

    def __init__(self, folder: Path, session_step: int = 1):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / new_event_file_name(folder)
        self._file = open(self.path, "xb")  # an open log, appended to until close()
        now = time.time()
        self._write(encode_event(0, now, file_version=FILE_VERSION))
        self._write(encode_event(session_step, now, session_start=True))

    def _write(self, event: bytes) -> None:
        self._file.write(tfrecord(event))

    def add_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
        """One event at ``step`` with every ``tag -> value`` of ``scalars``."""
        if scalars:
            self._write(encode_event(step, time.time() if wall_time is None else wall_time, scalars=scalars))

    def flush(self, fsync: bool = False) -> None:
        self._file.flush()
        if fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()


__all__ = ["EVENT_FILE_MARK", "FILE_VERSION", "EventFileWriter", "crc32c", "encode_event", "event_files",
           "masked_crc32c", "new_event_file_name", "tfrecord"]
