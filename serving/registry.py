"""The models this server runs, by name: request routing, memory accounting and per-model config.

Each model gets its own ServingConfig, built from its folder's serving.properties and the server's
environment exactly like the start-up model's, and its own worker spec file; a load is refused
before any process starts when the name is taken (409), the folder or its properties are wrong
(400), or its memory does not fit the budget (507). Used only on the broker thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import shutil
from collections.abc import Mapping

from serving.config import ServingConfig, load_config
from serving.errors import BadRequest, ConfigError, NotFound, ServingError
from serving.memory import MemoryLedger, available_memory_mb, estimate_need
from serving.model_group import ModelGroup
from serving.workers import write_worker_spec

log = logging.getLogger("serving.registry")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
LOAD_OVERRIDES = {
    "batch_size": "batch_size",
    "max_batch_delay": "max_batch_delay",
    "job_queue_size": "job_queue_size",
    "min_worker": "minWorkers",
    "max_worker": "maxWorkers",
    "device": "option.device",
    "engine": "engine",
}
"""DJL load-request parameters → the serving.properties keys they override."""
IGNORED_LOAD_PARAMETERS = ("model_version", "max_idle_time")
"""DJL load-request parameters accepted without effect (one version per model; workers never idle out)."""


class ModelConflict(ServingError):
    status_code = 409
    error_type = "ModelAlreadyLoadedException"


class ModelRegistry:
    def __init__(self, server_config: ServingConfig, runtime_dir: str, environ: Mapping[str, str]) -> None:
        self.server_config = server_config
        self.runtime_dir = runtime_dir
        self.environ = dict(environ)
        self.ledger = MemoryLedger(server_config.memory_budget_mb or available_memory_mb())
        self._groups: dict[str, ModelGroup] = {}
        self._uids = itertools.count(1)

    # ---- lookups ---------------------------------------------------------------------------------
    def groups(self) -> list[ModelGroup]:
        return list(self._groups.values())

    def names(self) -> list[str]:
        return sorted(self._groups)

    def get(self, name: str) -> ModelGroup:
        group = self._groups.get(name)
        if group is None:
            raise NotFound(f"Model {name!r} not found. Loaded models: {self.names()}.")
        return group

    def resolve(self, name: str | None) -> ModelGroup:
        """The model a request names; unnamed: the start-up model, else the only one loaded (as DJL)."""
        if name:
            return self.get(name)
        startup = [g for g in self._groups.values() if g.at_startup]
        if len(startup) == 1:
            return startup[0]
        if len(self._groups) == 1:
            return next(iter(self._groups.values()))
        if not self._groups:
            raise NotFound("No model is loaded. Fix: load one with POST /models first.")
        raise BadRequest(
            f"Parameter model_name is required: {len(self._groups)} models are loaded ({self.names()}). "
            "Fix: POST /models/<name>/invoke, /predictions/<name> or /invocations?model_name=<name>."
        )

    def page(self, limit: int, token: int) -> tuple[list[ModelGroup], int | None]:
        """Models sorted by name from offset ``token``; the next token when more remain (DJL paging)."""
        names = self.names()
        chosen = [self._groups[n] for n in names[token : token + limit]]
        return chosen, (token + limit if token + limit < len(names) else None)

    # ---- registration ----------------------------------------------------------------------------
    def add_startup(self, config: ServingConfig, spec_path: str) -> ModelGroup:
        """The model given on the command line: accounted, but served whatever the estimate says."""
        url = config.model_dir or config.settings.get("model_id") or "default model"
        group = ModelGroup(config, spec_path, url, at_startup=True)
        self._account(group, force=True)
        self._groups[group.name] = group
        return group

    def prepare(self, name: str | None, url: str, params: Mapping[str, str]) -> ModelGroup:
        """Check, configure, account and register a model to load from a local folder; its workers are
        not started yet. ``params``: LOAD_OVERRIDES. Raises 400, 409 or 507 saying what to fix."""
        if name:
            self._check_new_name(name)
        params = {k: v for k, v in params.items() if k not in IGNORED_LOAD_PARAMETERS}
        unknown = sorted(set(params) - set(LOAD_OVERRIDES))
        if unknown:
            raise BadRequest(f"Unknown load parameter(s) {unknown}. Fix: use {sorted(LOAD_OVERRIDES)}.")
        config = self._model_config(url, {LOAD_OVERRIDES[k]: v for k, v in params.items()})
        name = name or config.model_name
        self._check_new_name(name)
        config = dataclasses.replace(
            config, model_name=name, settings={**config.settings, "model_name": name}
        )
        uid = next(self._uids)
        spec_dir = os.path.join(self.runtime_dir, "models", str(uid))
        group = ModelGroup(config, os.path.join(spec_dir, "worker.json"), url, prefix=f"{name}.{uid}.")
        self._account(group)
        os.makedirs(spec_dir, exist_ok=True)
        write_worker_spec(config, group.spec_path)
        self._groups[name] = group
        return group

    def remove(self, group: ModelGroup) -> None:
        """Stop routing to it and free its name; its memory stays reserved until ``release``."""
        del self._groups[group.name]
        group.unloading = True
        key = f"{group.name} (unloading, {group.prefix or 'start-up model'})"
        self.ledger.rename(group.ledger_key, key)
        group.ledger_key = key

    def release(self, group: ModelGroup) -> None:
        """Its worker processes have exited: free its memory and its spec file."""
        self.ledger.release(group.ledger_key)
        if not group.at_startup:
            shutil.rmtree(os.path.dirname(group.spec_path), ignore_errors=True)
        log.info(
            "Model %r released; %d of %d MB reserved", group.name, self.ledger.used_mb, self.ledger.budget_mb
        )

    def account_workers(self, group: ModelGroup, workers: int, force: bool = False) -> None:
        """Reserve memory for ``workers`` processes of ``group`` (507 when growing past the budget)."""
        detail = f"{workers} worker(s) × {group.memory_mb} MB"
        self.ledger.reserve(group.ledger_key, workers * group.memory_mb, detail, force=force)

    def _account(self, group: ModelGroup, force: bool = False) -> None:
        need = estimate_need(group.config.model_dir, group.config.settings.get("required_memory_mb"))
        group.memory_mb = need.per_worker_mb
        workers = len(group.slots)
        detail = f"{workers} worker(s) × {need.per_worker_mb} MB, {need.how}"
        self.ledger.reserve(group.ledger_key, workers * need.per_worker_mb, detail, force=force)
        log.info(
            "Model %r reserves %d MB (%s); %d of %d MB reserved",
            group.name,
            workers * need.per_worker_mb,
            detail,
            self.ledger.used_mb,
            self.ledger.budget_mb,
        )

    def _check_new_name(self, name: str) -> None:
        if not NAME_PATTERN.fullmatch(name):
            raise BadRequest(
                f"Invalid model_name {name!r}. Fix: use 1-128 letters, digits, '_', '-' or '.', starting "
                "with a letter or digit."
            )
        if name in self._groups:
            raise ModelConflict(
                f"Model {name!r} is already loaded (from {self._groups[name].url}). Fix: DELETE "
                f"/models/{name} first, or load it under another model_name."
            )

    def _model_config(self, url: str, overrides: Mapping[str, str]) -> ServingConfig:
        path = url.removeprefix("file://")
        if not url or not os.path.isdir(path):
            raise BadRequest(
                f"Model url {url!r} is not a local folder. Fix: pass the folder that holds the model "
                "(SageMaker gives /opt/ml/models/<name>/model); fetch a remote model first with "
                "`lmi pull SOURCE` and pass the folder it prints."
            )
        try:
            return load_config(path, self.environ, overrides=overrides)
        except ConfigError as exc:
            raise BadRequest(f"Model {url!r} cannot be configured: {exc.message}") from None
