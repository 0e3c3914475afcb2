"""Model artifacts: fetch weights from S3, the Hugging Face Hub, local folders and archives, once.

`fetch(source, options)` returns a local folder. Remote sources are materialised into a cache keyed by
the source URL: downloads land in a staging folder and are renamed into place only when complete and
verified, a manifest records what the folder holds, and a file lock keeps concurrent starts from
downloading twice. No torch here: the HTTP side and `lmi pull` use this too.
"""

from serving.artifacts.errors import ArtifactError
from serving.artifacts.fetch import FetchOptions, fetch, is_fetchable

__all__ = ["ArtifactError", "FetchOptions", "fetch", "is_fetchable"]
