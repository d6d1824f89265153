"""Checkpoints of a training run: NumPy ``.npz`` archives, never pickles, written atomically.

One checkpoint is one file ``ckpt_<step>.npz`` holding every leaf of the train state as an
array (``leaf_00000``, ``leaf_00001``, … in ``jax.tree_util`` flattening order), the run's
history, and a JSON description (``__metadata__``) of each leaf's pytree path, shape and dtype.
Restoring fills the leaves into a template of the same tree (the state the run would start
from), after checking that paths, shapes and dtypes agree, so a checkpoint of another model is
reported instead of silently loaded. Files are read with ``allow_pickle=False``.

A file is written to a temporary name in the same folder, flushed to disk and renamed over its
final name, so a crash leaves either the previous checkpoint or the new one, never half a file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "gradkit-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8,})\.npz$")
_PLAIN_KINDS = "biufc"  # bool, int, uint, float, complex: dtypes NumPy stores natively


def checkpoint_path(directory: Path, step: int) -> Path:
    """Returns the file name of the checkpoint at ``step``."""
    return Path(directory) / f"ckpt_{step:08d}.npz"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Returns ``[(step, path), ...]`` of the checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """Returns the newest checkpoint in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _leaf_record(leaf: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Converts one leaf to a NumPy array NumPy can store, and describes how to convert it back."""
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.device_get(jax.random.key_data(leaf)))
        info = {"shape": list(leaf.shape), "dtype": str(leaf.dtype)}
        return data, {**info, "key_impl": str(jax.random.key_impl(leaf))}
    array = np.asarray(jax.device_get(leaf))
    info = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if array.dtype.kind not in _PLAIN_KINDS:
        # bfloat16 and the other ml_dtypes are stored as raw bits and viewed back on load.
        array = array.view(np.dtype(f"u{array.dtype.itemsize}"))
        info["stored_as_bits"] = True
    return array, info


def _restore_leaf(array: np.ndarray, info: dict[str, Any]) -> Any:
    if "key_impl" in info:
        return jax.random.wrap_key_data(jnp.asarray(array), impl=info["key_impl"])
    if info.get("stored_as_bits"):
        array = array.view(jnp.dtype(info["dtype"]))
    return jnp.asarray(array)


def describe(tree: Any) -> list[dict[str, Any]]:
    """Returns ``[{"path", "shape", "dtype"}, ...]`` for every leaf of ``tree``."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = list(jnp.shape(leaf))
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if not isinstance(leaf, jax.Array):
            # What the leaf becomes on the device: a Python or NumPy float64 or int64 is
            # float32 or int32 there unless x64 is on (the saved state came from the device).
            dtype = jax.dtypes.canonicalize_dtype(dtype)
        dtype = str(dtype)
        out.append({"path": jax.tree_util.keystr(path), "shape": shape, "dtype": dtype})
    return out


def save(
    directory: str | Path,
    step: int,
    tree: Any,
    *,
    extra_arrays: dict[str, np.ndarray] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Writes ``tree`` (and optional extra arrays) as the checkpoint of ``step``, atomically.

    Args:
      directory: the checkpoint folder (created if missing).
      step: the step number, part of the file name.
      tree: a pytree of arrays (typed PRNG keys and ml_dtypes included).
      extra_arrays: more named arrays to store (names must not start with ``leaf_``).
      extra_metadata: JSON-serialisable values stored with the description.
      keep: keep only this many newest checkpoints (``None`` keeps all).

    Returns:
      The checkpoint's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    arrays: dict[str, np.ndarray] = {}
    records = []
    for index, (path, leaf) in enumerate(leaves):
        array, info = _leaf_record(leaf)
        arrays[f"leaf_{index:05d}"] = array
        records.append({"path": jax.tree_util.keystr(path), **info})
    for name, value in (extra_arrays or {}).items():
        if name.startswith("leaf_") or name == "__metadata__":
            raise ValueError(f"extra array name {name!r} is reserved")
        arrays[name] = np.asarray(value)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "leaves": records,
        **(extra_metadata or {}),
    }
    arrays["__metadata__"] = np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)

    final = checkpoint_path(directory, step)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    if keep is not None:
        for _, old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return final


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(descriptor)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(descriptor)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Returns the JSON description stored in a checkpoint file."""
    with np.load(path, allow_pickle=False) as archive:
        return _metadata(archive, path)


def _metadata(archive: Any, path: str | Path) -> dict[str, Any]:
    if "__metadata__" not in archive.files:
        raise ValueError(f"{path} is not a gradkit checkpoint (it has no __metadata__ entry)")
    metadata = json.loads(archive["__metadata__"].tobytes().decode())
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise ValueError(
            f"{path} is not a gradkit checkpoint of version {VERSION} "
            f"(format {metadata.get('format')!r}, version {metadata.get('version')!r})"
        )
    return metadata


def restore(path: str | Path, template: Any) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """Reads a checkpoint into the structure of ``template``.

    Args:
      path: a checkpoint file written by :func:`save`.
      template: a pytree with the structure, shapes and dtypes the checkpoint must have.

    Returns:
      ``(tree, extra_arrays, metadata)``.

    Raises:
      ValueError: if the checkpoint holds another tree (different leaf paths, shapes or dtypes);
        the message lists the differences.
    """
    expected = describe(template)
    with np.load(path, allow_pickle=False) as archive:
        metadata = _metadata(archive, path)
        records = metadata["leaves"]
        differences = _differences(records, expected)
        if differences:
            shown = "\n  ".join(differences[:8])
            more = f"\n  … and {len(differences) - 8} more" if len(differences) > 8 else ""
            raise ValueError(
                f"{path} holds a checkpoint of a different model or optimizer "
                f"({len(differences)} difference(s) from this run's train state):\n  "
                f"{shown}{more}\nUse another checkpoint_dir for this run, or delete that one."
            )
        leaves = [
            _restore_leaf(archive[f"leaf_{index:05d}"], record)
            for index, record in enumerate(records)
        ]
        extra = {
            name: archive[name]
            for name in archive.files
            if not name.startswith("leaf_") and name != "__metadata__"
        }
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, leaves), extra, metadata


def _differences(found: list[dict[str, Any]], expected: list[dict[str, Any]]) -> list[str]:
    found_by_path = {record["path"]: record for record in found}
    expected_by_path = {record["path"]: record for record in expected}
    out = []
    for path, record in expected_by_path.items():
        if path not in found_by_path:
            out.append(f"{path}: in this run, missing from the checkpoint")
            continue
        stored = found_by_path[path]
        if list(stored["shape"]) != list(record["shape"]) or stored["dtype"] != record["dtype"]:
            out.append(
                f"{path}: {stored['dtype']}{tuple(stored['shape'])} in the checkpoint, "
                f"{record['dtype']}{tuple(record['shape'])} in this run"
            )
    for path in found_by_path:
        if path not in expected_by_path:
            out.append(f"{path}: in the checkpoint, not in this run")
    if not out and [r["path"] for r in found] != [r["path"] for r in expected]:
        out.append("the leaves are stored in a different order than this run's tree")
    return out
