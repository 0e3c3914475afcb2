"""Hugging Face Hub ids (org/name): huggingface_hub.snapshot_download into the HF cache (HF_HOME).

Online, the repository listing goes through the same file selection as S3, so only the files needed
are fetched. With HF_HUB_OFFLINE=1 the cached snapshot is used without any network access, and a
model that was never cached gets a message saying so. HF_TOKEN is read by huggingface_hub itself.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from serving.artifacts.errors import AccessDenied, ArtifactError, DownloadTimeout, SourceNotFound
from serving.artifacts.fetch import FetchOptions
from serving.artifacts.selection import check_weights, select_files

log = logging.getLogger("serving.artifacts")


def _describe(exc: Exception, repo_id: str, revision: str | None) -> ArtifactError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return AccessDenied(f"{repo_id} is gated: accept its terms on huggingface.co and set HF_TOKEN.")
    if isinstance(exc, RevisionNotFoundError):
        return SourceNotFound(f"{repo_id} has no revision {revision!r}. Fix option.revision.")
    if isinstance(exc, RepositoryNotFoundError):
        return SourceNotFound(f"{repo_id} was not found on the Hub (or is private: set HF_TOKEN).")
    if isinstance(exc, LocalEntryNotFoundError):
        where = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            return SourceNotFound(
                f"{repo_id} (revision {revision or 'main'}) is not in the local Hugging Face cache {where} "
                "and HF_HUB_OFFLINE=1 forbids downloading it. Pre-fetch it (`lmi pull` with network, or "
                "mount a populated HF_HOME) or unset HF_HUB_OFFLINE."
            )
        return ArtifactError(f"Could not reach the Hub for {repo_id} and it is not cached in {where}: {exc}")
    return ArtifactError(f"Fetching {repo_id} from the Hub failed: {exc}")


def _allow_patterns(repo_id: str, options: FetchOptions) -> tuple[list[str] | None, bool]:
    """(exact file names to fetch, or None for the cached snapshot as it is; whether to stay offline).

    Without HF_HUB_OFFLINE, an unreachable Hub still leaves a cached snapshot usable, as
    snapshot_download itself would."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    offline_patterns = list(options.allow_patterns) if options.allow_patterns else None
    if constants.HF_HUB_OFFLINE:
        return offline_patterns, True
    try:
        names = HfApi().list_repo_files(repo_id, revision=options.revision)
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except Exception as exc:
        if options.dest or not _unreachable(exc):
            raise  # a bad token, a rate limit...: say so; and a half-filled --dest is never trusted
        log.warning(
            "Cannot reach the Hub for %s (%s); using the cached snapshot if there is one", repo_id, exc
        )
        return offline_patterns, True
    chosen = select_files(names, options.allow_patterns, options.ignore_patterns)
    if "config.json" in chosen and options.allow_patterns is None:
        check_weights(chosen, repo_id, options)  # explicit allow_patterns: the user chose
    return chosen, False


def _unreachable(exc: BaseException) -> bool:
    """A connection failure or timeout (from whichever HTTP stack huggingface_hub uses), or a 5xx."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"ConnectError", "ConnectionError", "ConnectTimeout", "ReadTimeout", "TimeoutException",
                "Timeout", "NetworkError", "OfflineModeIsEnabled"}:  # fmt: skip
        return True
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", 0) >= 500


def _run_with_deadline(fn: Any, timeout_s: float, what: str) -> Any:
    """snapshot_download has no overall timeout; wait for it in a daemon thread."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except Exception as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="hub-download")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise DownloadTimeout(
            f"Downloading {what} from the Hub did not finish within {timeout_s:g} s. "
            "Raise option.download_timeout or pre-fetch it with `lmi pull`."
        )
    if "error" in result:
        raise result["error"]
    return result["value"]


def fetch_hub(source: str, options: FetchOptions) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def download() -> str:
        allow, local_only = _allow_patterns(source, options)
        return snapshot_download(
            source,
            revision=options.revision,
            local_files_only=local_only,
            allow_patterns=allow,
            ignore_patterns=None if allow is not None else list(options.ignore_patterns or ()) or None,
            local_dir=options.dest,
            max_workers=min(options.workers, 16),
        )

    try:
        path = Path(_run_with_deadline(download, options.timeout_s, source))
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        raise _describe(exc, source, options.revision) from None
    except ArtifactError:
        raise
    except Exception as exc:  # e.g. a connection error while filling --dest
        raise ArtifactError(f"Fetching {source} from the Hub failed: {exc}") from exc
    names = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    if "config.json" in names and options.allow_patterns is None:
        check_weights(names, source, options)  # also when the snapshot came from the cache alone
    log.info("Hub model %s is at %s", source, path)
    return path
