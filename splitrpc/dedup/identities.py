"""A record's identity: the SHA-256 of its decoded uint8 pixels, or ``"patient:" + patient_id`` from a manifest.

The same image stored twice is one record; with a manifest, several images of one
patient are one record. Identities never leave the hospital: they become tokens
(``splitrpc.dedup.hmac_tokens``, ``splitrpc.dedup.psi``).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import PurePosixPath

import numpy as np

from splitrpc.errors import UserError

PATIENT_PREFIX = "patient:"
MANIFEST_COLUMNS = ("path", "patient_id")


def pixel_identities(images: np.ndarray) -> list[bytes]:
    """SHA-256 of each image's uint8 pixels (row-major bytes), one per record."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 2:
        raise UserError(f"pixel identities need uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    return [hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest() for image in images]


def _normal_path(path: str) -> str:
    # "./train/cat/1.png" and "train/cat/1.png" name the same sample.
    return str(PurePosixPath(path.strip().replace("\\", "/")))


def read_manifest(path: str) -> dict[str, str]:
    """Map each sample's relative path (``train/<class>/<file>``) to its patient id.

    The file is CSV (UTF-8, optional BOM) with a header naming at least the
    columns ``path`` and ``patient_id``; other columns are ignored. Surrounding
    spaces are stripped. A path listed twice must carry the same id both times.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return _parse_manifest(csv.reader(fh), path)
    except OSError as exc:
        raise UserError(f"manifest {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UserError(f"manifest {path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise UserError(f"manifest {path}: malformed CSV ({exc})") from None


def _parse_manifest(reader, path: str) -> dict[str, str]:
    """Rows of a csv.reader into {path: patient_id}; errors name the file line (reader.line_num)."""
    header = [name.strip() for name in next(reader, [])]
    missing = [name for name in MANIFEST_COLUMNS if name not in header]
    if missing:
        raise UserError(f"manifest {path}: the header must name the columns {','.join(MANIFEST_COLUMNS)}; "
                        f"missing {', '.join(missing)}")
    path_column, id_column = (header.index(name) for name in MANIFEST_COLUMNS)
    patients: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) <= max(path_column, id_column):
            raise UserError(f"manifest {path} line {line}: the row has {len(row)} fields, "
                            f"too few for the header's columns")
        if not row[path_column].strip():
            raise UserError(f"manifest {path} line {line}: empty path")
        sample, patient = _normal_path(row[path_column]), row[id_column].strip()
        if not patient:
            raise UserError(f"manifest {path} line {line}: empty patient_id for {sample}")
        if sample in patients and patients[sample] != patient:
            raise UserError(f"manifest {path} line {line}: {sample} has patient_id {patient!r} but line "
                            f"{first_line[sample]} gave {patients[sample]!r}")
        patients.setdefault(sample, patient)
        first_line.setdefault(sample, line)
    if not patients:
        raise UserError(f"manifest {path}: no rows after the header")
    return patients


def manifest_identities(paths: list[str], manifest: dict[str, str]) -> list[bytes]:
    """``"patient:" + id`` (UTF-8) per sample, so all images of one patient share an identity."""
    normal = {_normal_path(p): patient for p, patient in manifest.items()}
    missing = [p for p in paths if _normal_path(p) not in normal]
    if missing:
        raise UserError(f"{len(missing)} of {len(paths)} samples are not in the manifest, "
                        f"the first is {_normal_path(missing[0])}")
    return [(PATIENT_PREFIX + normal[_normal_path(p)]).encode() for p in paths]

