"""Distinct, actionable failures of a model fetch; each message says what was wrong and how to fix it."""

from __future__ import annotations


class ArtifactError(RuntimeError):
    """The model's files could not be fetched or verified."""


class SourceNotFound(ArtifactError):
    """The bucket, prefix, repository, revision or path does not exist."""


class AccessDenied(ArtifactError):
    """Credentials are missing or lack permission."""


class EmptySource(ArtifactError):
    """The source exists but holds no files."""


class NoWeights(ArtifactError):
    """The source holds files, but no model weights the server can load."""


class IntegrityError(ArtifactError):
    """A downloaded file is short, long or corrupt."""

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name
        """The file at fault, relative to the model folder."""


class DownloadTimeout(ArtifactError):
    """The download did not finish within its time limit."""


class UnsafeArchive(ArtifactError):
    """An archive entry would land outside the extraction folder (absolute path, `..`, link)."""
