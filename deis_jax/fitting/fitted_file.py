"""The one base of fitted-sampler files (grid files, AMED predictor files): a sealed JSON
record of what was fitted and the settings it was fitted for.

A subclass names its format (:attr:`FittedFile.FORMAT`, :attr:`FittedFile.FORMAT_VERSION`),
what it is called in messages (:attr:`FittedFile.KIND`) and what to do with a damaged one
(:attr:`FittedFile.REMEDY`), and gives three things: :meth:`FittedFile.fields` (its record
without the format entries), :meth:`FittedFile.from_fields` (the inverse) and
:meth:`FittedFile.settings` (the sampling settings it is valid for). The base does the rest
the same way for every kind: the sealed record (``deis_jax.common.files.sealed_json``, with
its ``sha256``), the atomic save, the checked load (``read_sealed_record``: a file damaged or
edited after it was written is refused) and the refusal of other settings.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Self

from deis_jax.common.files import atomic_write_text, read_sealed_record, sealed_json
from deis_jax.common.identity import settings_differences


class FittedFile:
    """Save / load / verify / refuse, shared by every fitted-sampler file."""

    FORMAT: ClassVar[str]
    FORMAT_VERSION: ClassVar[int]
    KIND: ClassVar[str]  # e.g. "grid file", in every message about the file
    REMEDY: ClassVar[str]  # what to do with a file that fails its sha256
    FITTED: ClassVar[str] = "fitted"  # the verb of "was fitted for other settings"
    JSON_INDENT: ClassVar[int | None] = None

    def fields(self) -> dict[str, Any]:
        """The record's entries after ``format`` and ``version`` (JSON-able)."""
        raise NotImplementedError

    @classmethod
    def from_fields(cls, record: dict[str, Any]) -> Self:
        """The file of a record of :meth:`to_record` (``KeyError`` / ``TypeError`` /
        ``ValueError`` when it is not one)."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The sampling settings this file is valid for (compared by :meth:`refuse_other`)."""
        raise NotImplementedError

    def refuse_other(self, wanted: dict[str, Any]) -> None:
        """``ValueError`` listing every setting of ``wanted`` that differs from
        :meth:`settings` (floats to a relative 1e-12)."""
        diffs = settings_differences(self.settings(), wanted, verb=self.FITTED, rel_tol=1e-12)
        if diffs:
            raise ValueError(
                f"the {self.KIND} was {self.FITTED} for other settings: " + "; ".join(diffs)
            )

    def to_record(self) -> dict[str, Any]:
        """The file's JSON record (without its seal)."""
        return {"format": self.FORMAT, "version": self.FORMAT_VERSION, **self.fields()}

    def to_json(self) -> str:
        """The file's text: the record sealed with its sha256."""
        return sealed_json(self.to_record(), indent=self.JSON_INDENT)

    def save(self, path: str) -> None:
        """Write the file atomically (a crash never leaves a torn file)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, self.to_json())

    @classmethod
    def from_record(cls, record: dict[str, Any], source: str) -> Self:
        """The file of a record of :meth:`to_record` (``ValueError`` naming ``source``)."""
        try:
            if record["format"] != cls.FORMAT or record["version"] != cls.FORMAT_VERSION:
                raise ValueError(f"format {record['format']!r} version {record['version']!r}")
            return cls.from_fields(record)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source} is not a valid {cls.KIND}: {err}") from None

    @classmethod
    def load(cls, path: str) -> Self:
        """Read a file of :meth:`save`; ``ValueError`` naming the path when it is not one
        (torn, damaged or edited after it was written, or another kind of JSON)."""
        record = read_sealed_record(path, cls.FORMAT, cls.FORMAT_VERSION, cls.KIND, cls.REMEDY)
        return cls.from_record(record, path)
