"""Pseudonyms that cannot be linked back to hospital identifiers: keyed hashes with a per-dataset secret.

Every identifier pancls derives from an input (patient, study, series, output file names, source
fingerprints) is ``HMAC-SHA-256(secret, kind + NUL + value)``, never a plain hash: anyone holding the
hospital's UIDs or PatientIDs can compute ``sha256(uid)`` and find its row, but not the HMAC without the
secret. ``kind`` separates the name spaces, so the same string hashed as a study and as a series gives
unrelated ids.

The secret is 32 random bytes (64 hex digits in a text file), created on first use by
:func:`load_or_create_secret` in a folder of the caller's choice -- for ``pancls ingest`` that is
``OUT/.private/secret``, beside the data and outside every output file (manifest, inventory, NIfTI,
sidecars). Keep it: the same secret gives the same ids on a rerun (incremental conversion, and patient
ids that match across runs into one dataset); pass the same file to several runs to give them one id
space. Do not share it with the data: whoever holds it can test a known UID against the ids.

Without a secret (:func:`session_secret`) a process gets a random one of its own: ids are then stable
within the process only, which is what library callers that write nothing (tests, ``scan``) need.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from pancls.errors import UserError

SECRET_FILE = "secret"
SECRET_BYTES = 32

_SESSION_SECRET = secrets.token_bytes(SECRET_BYTES)


def keyed_id(secret: bytes, kind: str, value: str, length: int = 16) -> str:
    """Pseudonym of ``value``: the first ``length`` hex digits of HMAC-SHA-256(``secret``, ``kind`` NUL ``value``).

    Parameters
    ----------
    secret : bytes
        The dataset's key (:func:`load_or_create_secret`). An empty key is accepted here (``--insecure-ids``
        decides that upstream); the ids are then plain keyed-with-nothing hashes, linkable by anyone.
    kind : str
        Name space, e.g. ``"patient"``, ``"study"``, ``"series"``, ``"file"``: the same value in two kinds
        gives unrelated ids.
    value : str
        What is hashed (a UID, a PatientID, a fallback key, a path). Never stored.
    length : int
        Hex digits kept (4 bits each; 16 = 64 bits, at most 64).
    """
    if not 1 <= length <= 64:
        raise ValueError(f"length must be in 1..64, got {length}")
    digest = hmac.new(secret, f"{kind}\0{value}".encode("utf-8", "surrogateescape"), hashlib.sha256)
    return digest.hexdigest()[:length]


def session_secret() -> bytes:
    """A random key made once per process: ids that are stable in this process and unlinkable outside it."""
    return _SESSION_SECRET


def load_or_create_secret(folder: str | os.PathLike, insecure: bool = False, file: str | os.PathLike | None = None
                          ) -> bytes:
    """The dataset's secret: read from ``file`` (default ``folder/secret``), created there on first use.

    A new secret is 32 bytes from :mod:`secrets`, written as 64 hex digits to a file only the owner can
    read (mode 0600, the folder 0700), created exclusively so that two runs starting at once agree on it.

    Raises
    ------
    UserError
        The file cannot be read or created, does not hold hex digits, or is empty -- an empty secret makes
        every id a plain hash anyone can recompute, so it is accepted only with ``insecure=True``
        (``--insecure-ids``), and then returned as ``b""``.
    """
    path = Path(file) if file is not None else Path(folder) / SECRET_FILE
    if not path.exists() and file is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another run created it a moment ago: read theirs
        except OSError as exc:
            raise UserError(f"cannot create the dataset secret: {exc.strerror}", path) from None
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(SECRET_BYTES) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise UserError("secret file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the dataset secret: {exc}", path) from None
    if not text:
        if insecure:
            return b""
        raise UserError("the dataset secret is empty: ids would be plain hashes anyone holding the hospital's "
                        "UIDs can link back; put a secret there (or delete the file to have one made), or pass "
                        "--insecure-ids", path)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise UserError("the dataset secret must be hex digits (as pancls writes it)", path) from None
    if len(key) < 16 and not insecure:
        raise UserError(f"the dataset secret has only {len(key)} bytes (at least 16 needed), or pass --insecure-ids",
                        path)
    return key
