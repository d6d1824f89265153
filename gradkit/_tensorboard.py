"""Reading TensorBoard event files back (needs the ``tensorboard`` extra: tensorboardX).

Event files are TFRecord streams: each record is a little-endian uint64 length, a masked CRC-32C
of the length, the payload (a serialized ``Event`` protocol buffer) and a masked CRC-32C of the
payload. gradkit writes them with tensorboardX; this module reads them without TensorFlow, and
checks both checksums so a truncated or corrupted file is reported instead of misread.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path
from typing import Any


def _require_tensorboardx() -> Any:
    try:
        from tensorboardX.crc32c import crc32c
        from tensorboardX.proto import event_pb2
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            'reading TensorBoard event files needs tensorboardX: pip install "gradkit[tensorboard]"'
        ) from error
    return event_pb2, crc32c


def _masked_crc(data: bytes, crc32c: Any) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def event_files(log_dir: str | Path) -> list[Path]:
    """Returns the event files under ``log_dir`` (searched recursively), oldest name first."""
    return sorted(Path(log_dir).rglob("events.out.tfevents.*"))


def read_events(path: str | Path) -> list[Any]:
    """Parses every ``Event`` record of one event file.

    Raises:
      ValueError: if a record is truncated or fails its checksum.
    """
    event_pb2, crc32c = _require_tensorboardx()
    data = Path(path).read_bytes()
    events, offset = [], 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {offset}")
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if _masked_crc(header, crc32c) != length_crc:
            raise ValueError(f"{path}: bad length checksum at byte {offset}")
        start, end = offset + 12, offset + 12 + length
        if end + 4 > len(data):
            raise ValueError(f"{path}: truncated record at byte {offset}")
        payload = data[start:end]
        (payload_crc,) = struct.unpack("<I", data[end : end + 4])
        if _masked_crc(payload, crc32c) != payload_crc:
            raise ValueError(f"{path}: bad payload checksum at byte {offset}")
        events.append(event_pb2.Event.FromString(payload))
        offset = end + 4
    return events


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Returns ``{tag: [(step, value), ...]}`` for every scalar summary under ``log_dir``."""
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in event_files(log_dir):
        for event in read_events(path):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag].append((event.step, value.simple_value))
    return dict(scalars)


def read_histograms(log_dir: str | Path) -> dict[str, list[tuple[int, Any]]]:
    """Returns ``{tag: [(step, HistogramProto), ...]}`` for every histogram under ``log_dir``."""
    histograms: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    for path in event_files(log_dir):
        for event in read_events(path):
            for value in event.summary.value:
                if value.HasField("histo"):
                    histograms[value.tag].append((event.step, value.histo))
    return dict(histograms)
