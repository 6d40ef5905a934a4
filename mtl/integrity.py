"""Content digests of checkpoint and artifact files, and atomic writes.

A committed checkpoint step (or an artifact's ``params/``) gets a manifest: the size and
SHA-256 of every file under it, relative paths as keys. SHA-256 (``hashlib``, ~1 GB/s
here) is slower than a non-cryptographic hash but in the standard library and
collision-proof, so a manifest also proves a shared checkpoint is the one published.

``verify_files`` names the first file that is missing, has another size or another digest.
``atomic_write_text`` / ``atomic_write_json`` write a temporary sibling, fsync it, then
``os.replace`` it onto the target, so a reader sees the old file or the new one, never half.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping

ALGORITHM = "sha256"
MANIFEST = "mtl_digests.json"
_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """A file does not match the digest recorded when it was written."""


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_files(root: str, skip: tuple[str, ...] = (MANIFEST,)) -> dict:
    """``{relative/path: {"size": bytes, "sha256": hex}}`` for every file under ``root``."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(d, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel in skip:
                continue
            out[rel] = {"size": os.path.getsize(full), ALGORITHM: file_digest(full)}
    return out


def verify_files(root: str, files: Mapping[str, Mapping], what: str) -> int:
    """Check every recorded file under ``root``; returns how many were checked.

    Raises ``IntegrityError`` naming ``what`` and the first bad file."""
    for rel in sorted(files):
        rec = files[rel]
        full = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(full):
            raise IntegrityError(f"{what}: file {rel} is missing")
        size = os.path.getsize(full)
        if size != rec["size"]:
            raise IntegrityError(f"{what}: file {rel} has {size} bytes, {rec['size']} were written "
                                 f"({'truncated' if size < rec['size'] else 'grown'})")
        if file_digest(full) != rec[ALGORITHM]:
            raise IntegrityError(f"{what}: file {rel} does not match its {ALGORITHM} digest (content changed)")
    return len(files)


def check_json_files(root: str, names, what: str) -> None:
    """Each of ``names`` (relative paths) that exists under ``root`` must parse as JSON."""
    for rel in names:
        full = os.path.join(root, *rel.split("/"))
        if os.path.isfile(full):
            try:
                with open(full) as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise IntegrityError(f"{what}: file {rel} is not valid JSON ({e})") from None


def write_manifest(root: str) -> dict:
    """Digest every file under ``root`` into ``root/mtl_digests.json`` (atomically)."""
    manifest = {"algorithm": ALGORITHM, "files": digest_files(root)}
    atomic_write_json(os.path.join(root, MANIFEST), manifest)
    return manifest


def read_manifest(root: str, what: str) -> dict | None:
    """The manifest under ``root``, or None when there is none (saved before digests existed,
    or the process died between the commit and the manifest)."""
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            m = json.load(f)
        if m.get("algorithm") != ALGORITHM or not isinstance(m.get("files"), dict):
            raise ValueError(f"algorithm {m.get('algorithm')!r}, expected {ALGORITHM!r}")
        return m
    except (ValueError, OSError) as e:
        raise IntegrityError(f"{what}: its digest manifest {MANIFEST} is unreadable ({e})") from None


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (standard JSON has no NaN/Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    """Standard JSON (non-finite floats written as null)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj: Any, **kw) -> None:
    atomic_write_text(path, dumps(obj, **kw))
