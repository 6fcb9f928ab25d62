"""Edits of a saved checkpoint's manifest.json, for tests of what reading checks: a
field changed (the manifest's checksum recomputed, as a careful forger would, or left,
as a flipped bit leaves it), a data file rewritten with its CRC-32 and size updated."""
import hashlib
import json
import os
import zlib

CHECKSUM = "manifest_sha256"


def seal(manifest):
    """The manifest with its checksum: sha256 of its canonical JSON (sorted keys, no
    spaces) without the checksum field, as docs/operations.md describes it."""
    body = {name: value for name, value in manifest.items() if name != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return dict(body, **{CHECKSUM: hashlib.sha256(text.encode()).hexdigest()})


def read(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def write(path, manifest, reseal=True):
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(seal(manifest) if reseal else manifest, f, indent=1)


def edit(path, change, reseal=True):
    """Apply change(manifest) (it edits in place) and write the manifest back."""
    manifest = read(path)
    change(manifest)
    write(path, manifest, reseal)


def rewrite_file(path, entry, kind, raw):
    """Replace the file a manifest entry names (entry[kind], or entry["file"]) with `raw`
    bytes, and give the entry the new file's CRC-32 and size."""
    relative = entry[kind] if kind != "lengths" else entry["file"]
    with open(os.path.join(path, relative), "wb") as f:
        f.write(raw)
    crc, size = zlib.crc32(raw), len(raw)
    if kind == "lengths":
        entry.update(crc32=crc, bytes=size)
    else:
        entry["crc32"][kind], entry["bytes"][kind] = crc, size
