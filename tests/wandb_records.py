"""Reads the records of a W&B offline run file (`run-<id>.wandb`) with W&B's own protobuf classes.

wandb 0.31 writes these files from its Go core and ships no Python reader; the
format is a LevelDB log (32 KiB blocks of checksummed, possibly fragmented
records) after a 7-byte W&B header, each record a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7  # checksum (4), length (2), type (1); the file's own header is also 7 bytes
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending, found = HEADER, b"", []
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        if kind == 0 and length == 0:
            break
        chunk = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        found.append(record)
        pending = b""
    return found


def history(run_dir: Path) -> list[dict]:
    """Every `run.log` row of every offline run file under `run_dir/wandb`, in file order."""
    rows = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def config(run_dir: Path) -> dict:
    """The run's config as its last config record set it."""
    values = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in records(path):
            kind = record.WhichOneof("record_type")
            updates = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
            values.update({item.key: json.loads(item.value_json) for item in updates})
    return values
