"""A released router's manifest: the sha256 of every file in its folder, written when it is
released (``evaluation.release.publish``) and checked whenever it is loaded, so a file
edited, cut, swapped or added after the release (a head with other coefficients,
``classes`` reordered in router.json, an edited tokenizer) is refused, naming the file,
instead of routing differently."""

from __future__ import annotations

import json
from pathlib import Path

from router_pipeline.artifacts import MANIFEST_FILE
from router_pipeline.routers.contract import read_json_object
from router_pipeline.routers.features import sha256_file

FIX = "restore the release (materialize released_router again)"


class ReleaseIntegrityError(ValueError):
    """A released router whose files are not the ones released."""


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE)


def write_manifest(folder: str | Path) -> dict[str, str]:
    """Record every file of ``folder`` (path inside it -> sha256) in its manifest."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in _files(folder)}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=2))
    return files


def check_manifest(folder: str | Path) -> bool:
    """True when ``folder`` holds exactly the files its manifest lists, each with its
    sha256; False when it has no manifest (not a release, or an older one);
    ReleaseIntegrityError naming the first file that differs."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.exists():
        return False
    files = read_json_object(path, "'files' (path -> sha256)", FIX).get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ReleaseIntegrityError(f"{path} must hold 'files', an object of path -> sha256; {FIX}")
    for rel, digest in files.items():
        file = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ReleaseIntegrityError(f"{path} names {rel!r}, outside the router's folder; {FIX}")
        if not file.is_file():
            raise ReleaseIntegrityError(f"{file} is missing from the released router; {FIX}")
        if (found := sha256_file(file)) != digest:
            raise ReleaseIntegrityError(f"{file} was changed after the release (sha256 {found[:12]}…, released "
                                        f"{digest[:12]}…); {FIX}")
    extra = [p for p in _files(folder) if p.relative_to(folder).as_posix() not in files]
    if extra:
        raise ReleaseIntegrityError(f"{extra[0]} was added after the release (not in {path.name}); remove it or {FIX}")
    return True
