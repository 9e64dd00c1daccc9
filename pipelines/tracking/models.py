"""One place that turns "a model, however named" into local files and into a model ready to run.

Sources, in the order they are tried:

- ``models:/NAME/VERSION``, ``models:/NAME/latest``, ``models:/NAME@ALIAS``: a registered version;
- ``models:/m-<id>``: an MLflow 3 logged model;
- ``runs:/<run id>/<name>``: the model logged under that name in the run; a bare run id (32 hex
  characters): the newest model logged in the run;
- a local folder: a Hugging Face format directory (``config.json`` + weights), a training
  checkpoint holding ``hf/``, a Ray Train run folder (the newest ``checkpoint_*`` with ``hf/``),
  or a downloaded MLflow model (``MLmodel`` + ``model/``);
- a Hugging Face Hub id (``deepmind/language-perceiver``, ``hf://...``, optionally ``@revision``):
  downloaded through huggingface_hub into its cache (or found there, offline), its config and
  weights only.

MLflow models are downloaded once into a cache keyed by the logged model's id (ids are unique and
logged models immutable), so loading the same 800 MB model again costs nothing. Inside a model
logged by ``mlflow.transformers`` the HF files sit in the folder its ``MLmodel`` names as
``model_binary`` (``model/``); the tokenizer is in ``components/tokenizer/`` and is not needed
(our tokenizer is the byte mapping).

Every failure to find a model is a ``ModelSourceError`` naming the source and what is wrong, raised
without retrying: a missing model is a 404 that MLflow does not retry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipelines.errors import UserError, first_line
from pipelines.tracking.registry import RegisteredModel

if TYPE_CHECKING:
    import torch

    from perceiver_core.hf import PerceiverModel

log = logging.getLogger(__name__)

ModelKind = Literal["mlm", "classifier"]

ARCHITECTURES: dict[str, ModelKind] = {
    "PerceiverForMaskedLM": "mlm",
    "PerceiverForSequenceClassification": "classifier",
}
_KIND_WORDS = {"mlm": "a masked-language model", "classifier": "a classifier"}
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_LOGGED_MODEL = re.compile(r"^models:/(m-[0-9a-f]+)$")  # not models:/m-name@alias or /1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")
_HF_SUBDIR = "hf"  # the layout of pipelines.train.checkpoint (a layer above: not imported)


class ModelSourceError(UserError, ValueError):
    """The source does not name a usable model: missing, not a Perceiver, or the wrong kind."""


@dataclass(frozen=True)
class ResolvedModel:
    source: str  # what the user gave
    hf_dir: Path  # local HF-format directory: config.json + weights (+ tokenizer files)
    kind: ModelKind  # from config.json "architectures"
    label_names: list[str]  # classifier: in label-id order; mlm: []
    registered: RegisteredModel | None  # when it came from the registry (lineage "parent")
    run_id: str | None  # the MLflow run that logged it, when known


@dataclass(frozen=True)
class LoadedModel:
    model: PerceiverModel  # in eval mode, on the requested device
    kind: ModelKind
    label_names: list[str]
    resolved: ResolvedModel


def default_cache_dir() -> Path:
    """``PERCEIVER_MODEL_CACHE``, else ``~/.cache/perceiver/models``."""
    env = os.environ.get("PERCEIVER_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "perceiver" / "models"


def resolve_model(
    source: str,
    *,
    tracking_uri: str | None = None,
    cache_dir: Path | None = None,
    expect: ModelKind | None = None,
) -> ResolvedModel:
    """Local HF files, kind and label names of ``source`` (see the module docstring)."""
    source = source.strip()
    if not source:
        raise ModelSourceError("empty model source: give a models:/ or runs:/ URI or a folder")
    is_run_id = _RUN_ID.match(source) and not Path(source).exists()
    if source.startswith(("models:/", "runs:/")) or is_run_id:
        hf_dir, registered, run_id = _MlflowSource(source, tracking_uri, cache_dir).fetch()
    else:
        hf_dir, run_id = _local_source(source)
        registered = None
    kind, label_names = _inspect(source, hf_dir)
    if expect is not None and kind != expect:
        architecture = next(a for a, k in ARCHITECTURES.items() if k == kind)
        raise ModelSourceError(
            f"{source} is {_KIND_WORDS[kind]} ({architecture}); this needs {_KIND_WORDS[expect]}"
        )
    return ResolvedModel(source, hf_dir, kind, label_names, registered, run_id)


def load_model(
    source: str,
    *,
    device: str | torch.device = "cpu",
    tracking_uri: str | None = None,
    expect: ModelKind | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """``resolve_model``, then the weights in the right ``perceiver_core`` class, eval mode."""
    from perceiver_core.hf import from_pretrained
    from perceiver_core.model import PerceiverForMaskedLM, PerceiverForSequenceClassification

    resolved = resolve_model(source, tracking_uri=tracking_uri, cache_dir=cache_dir, expect=expect)
    cls = PerceiverForMaskedLM if resolved.kind == "mlm" else PerceiverForSequenceClassification
    try:
        # strict: the architecture matches the class, so every parameter must be in the file.
        model = from_pretrained(cls, resolved.hf_dir, strict=True)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise ModelSourceError(f"{source}: cannot load its weights: {error}") from error
    model.eval().to(device)
    return LoadedModel(model, resolved.kind, resolved.label_names, resolved)


# -- what a HF directory holds ---------------------------------------------------------------------


def _inspect(source: str, hf_dir: Path) -> tuple[ModelKind, list[str]]:
    """Kind and label names from ``config.json``; a ModelSourceError if it is not our Perceiver."""
    from perceiver_core.hf import config_from_hf

    try:
        raw = json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelSourceError(f"{source}: unreadable config.json in {hf_dir}: {error}") from error
    architectures = raw.get("architectures") or []
    if raw.get("model_type") != "perceiver":
        raise ModelSourceError(
            f"{source} is not a Perceiver model (config.json model_type is "
            f"{raw.get('model_type')!r}, architectures {architectures})"
        )
    kinds = [ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES]
    if not kinds:
        raise ModelSourceError(
            f"{source} is not a text Perceiver model: its architectures are {architectures}, "
            f"expected one of {sorted(ARCHITECTURES)}"
        )
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if not any((hf_dir / name).is_file() for name in weights):
        raise ModelSourceError(f"{source}: {hf_dir} has config.json but no weights ({weights})")
    if kinds[0] == "mlm":
        return "mlm", []
    try:
        return "classifier", config_from_hf(raw).label_names()
    except (TypeError, ValueError) as error:
        raise ModelSourceError(
            f"{source}: config.json is not a valid Perceiver: {error}"
        ) from error


# -- local folders and the Hub cache ---------------------------------------------------------------


def _local_source(source: str) -> tuple[Path, str | None]:
    """The HF directory of a local folder, and the run id its checkpoint recorded (if any)."""
    hub_id = source[len("hf://") :] if source.startswith("hf://") else None
    path = Path(source).expanduser()
    if hub_id is None and path.exists():
        return _hf_dir_in(source, path)
    hub_id = hub_id or (source if _HUB_ID.match(source) else None)
    if hub_id is not None:
        repo, _, revision = hub_id.partition("@")
        return _hub_download(source, repo, revision or None), None
    raise ModelSourceError(
        f"{source}: no such folder, and not a models:/ or runs:/ URI or an MLflow run id"
    )


def _hf_dir_in(source: str, path: Path) -> tuple[Path, str | None]:
    if not path.is_dir():
        raise ModelSourceError(f"{source} is a file; a model is a folder (config.json + weights)")
    if (path / "config.json").is_file():
        return path, None
    if (path / _HF_SUBDIR / "config.json").is_file():  # one training checkpoint
        return path / _HF_SUBDIR, _checkpoint_run_id(path)
    checkpoints = sorted(
        (int(m.group(1)), child)
        for child in path.iterdir()
        if (m := _CHECKPOINT.match(child.name)) and (child / _HF_SUBDIR / "config.json").is_file()
    )
    if checkpoints:  # a Ray Train run folder: the newest checkpoint that exported the model
        newest = checkpoints[-1][1]
        log.info("%s: using %s, the newest checkpoint with a model", source, newest.name)
        return newest / _HF_SUBDIR, _checkpoint_run_id(newest)
    if (path / "MLmodel").is_file():  # a downloaded MLflow model
        return _inner_hf_dir(source, path), None
    raise ModelSourceError(
        f"{source} is not a model folder: no config.json, no {_HF_SUBDIR}/config.json, no "
        f"checkpoint_* folder with {_HF_SUBDIR}/, no MLmodel"
    )


def _checkpoint_run_id(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / "state.json").read_text()).get("run_id")
    except (OSError, json.JSONDecodeError):
        return None


# Weights in the order they are looked for; the first the repository has is downloaded.
_HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _hub_download(source: str, repo: str, revision: str | None) -> Path:
    """The snapshot folder of a Hub model (config.json and its weights), downloaded through
    huggingface_hub into its cache, or found there: ``HF_HOME`` / ``HF_HUB_CACHE``,
    ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and the token (``HF_TOKEN`` or a login) all apply."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{constants.ENDPOINT}"
    at = f" at revision {revision}" if revision else ""

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo, filename, revision=revision))

    try:
        folder = fetch("config.json").parent
        for weights in _HUB_WEIGHTS:
            try:
                fetch(weights)
                break
            except LocalEntryNotFoundError:  # offline, not cached: an EntryNotFoundError too
                raise
            except EntryNotFoundError:
                continue
        else:
            raise ModelSourceError(
                f"{source}: the Hub repository has no weights ({' or '.join(_HUB_WEIGHTS)}){at}"
            )
    except LocalEntryNotFoundError:  # before EntryNotFoundError, which it extends
        offline = (
            "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{where} is not reachable"
        )
        raise ModelSourceError(
            f"{source}: {offline} and the model is not in the local Hub cache "
            f"({constants.HF_HUB_CACHE}); download it where the Hub is reachable "
            f"(huggingface-cli download {repo}) or pass a local folder"
        ) from None
    except GatedRepoError:  # before RepositoryNotFoundError, which it extends
        raise ModelSourceError(
            f"{source}: a gated repository on {where}: accept its conditions on the Hub and set "
            "HF_TOKEN (or run huggingface-cli login)"
        ) from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"{source}: the Hub repository has no revision {revision}") from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"{source}: no such folder, and no such model repository on {where} (a private one "
            "needs HF_TOKEN)"
        ) from None
    except EntryNotFoundError:
        raise ModelSourceError(
            f"{source}: the Hub repository has no config.json{at}: not a model"
        ) from None
    except ValueError as error:  # huggingface_hub's check of the repo id
        raise ModelSourceError(f"{source}: not a Hub model id: {error}") from None
    return folder


def _inner_hf_dir(source: str, model_dir: Path) -> Path:
    """The HF folder inside an MLflow model folder, as its MLmodel names it."""
    import yaml

    try:
        meta = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ModelSourceError(f"{source}: unreadable MLmodel: {error}") from error
    flavors = meta.get("flavors") or {}
    if "transformers" not in flavors:
        raise ModelSourceError(
            f"{source} is not a Perceiver model: an MLflow model of flavors {sorted(flavors)}, "
            "not logged with mlflow.transformers"
        )
    inner = model_dir / flavors["transformers"].get("model_binary", "model")
    if not (inner / "config.json").is_file():
        raise ModelSourceError(f"{source}: the MLflow model has no {inner.name}/config.json")
    return inner


# -- MLflow ----------------------------------------------------------------------------------------


class _MlflowSource:
    """Resolves registry, logged-model and run sources to a downloaded HF directory."""

    def __init__(self, source: str, tracking_uri: str | None, cache_dir: Path | None) -> None:
        from mlflow import MlflowClient

        self.source = source
        self.uri = _tracking_uri(source, tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.cache = cache_dir or default_cache_dir()

    def fetch(self) -> tuple[Path, RegisteredModel | None, str | None]:
        source = self.source
        logged = _LOGGED_MODEL.match(source)
        if logged:
            model_id = logged.group(1)
            model = self._call(
                lambda: self.client.get_logged_model(model_id), f"no logged model {model_id}"
            )
            return self._download_logged(model), None, model.source_run_id
        if source.startswith("models:/"):
            return self._registered()
        if source.startswith("runs:/"):
            run_id, _, name = source[len("runs:/") :].partition("/")
            return self._run_model(run_id, name.strip("/") or None)
        return self._run_model(source, None)

    def _call(self, fn: Callable[[], Any], missing: str) -> Any:
        """``fn()``, with MLflow's errors as ModelSourceError: "does not exist" as ``missing``,
        anything else (an unreachable server, a refused request) with MLflow's own words."""
        from mlflow.exceptions import MlflowException

        try:
            return fn()
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise ModelSourceError(f"{self.source}: {missing}") from error
            raise ModelSourceError(
                f"{self.source}: MLflow at {self.uri} failed: {first_line(error)[:300]}"
            ) from error
        except FileNotFoundError as error:  # a local artifact store without the files
            raise ModelSourceError(f"{self.source}: {missing}") from error

    def _registered(self) -> tuple[Path, RegisteredModel | None, str | None]:
        rest = self.source[len("models:/") :]
        name, sep, alias = rest.partition("@")
        version = None
        if not sep:
            name, _, version = rest.rpartition("/")
        if not name or not (alias or version):
            raise ModelSourceError(
                f"{self.source}: expected models:/NAME/VERSION, models:/NAME@ALIAS or models:/m-ID"
            )
        registered = self._call(
            lambda: self.client.get_registered_model(name), f"no registered model named {name!r}"
        )
        if alias:
            known = sorted(registered.aliases or {})
            mv = self._call(
                lambda: self.client.get_model_version_by_alias(name, alias),
                f"registered model {name!r} has no alias {alias!r} (its aliases: {known})",
            )
        elif version == "latest":
            versions = self._call(
                lambda: self.client.search_model_versions(f"name = '{name}'"), "no versions"
            )
            if not versions:
                raise ModelSourceError(f"{self.source}: registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = self._call(
                lambda: self.client.get_model_version(name, version),
                f"registered model {name!r} has no version {version!r}",
            )
        if mv.source.startswith("models:/m-"):
            model = self._call(
                lambda: self.client.get_logged_model(mv.source[len("models:/") :]),
                f"version {mv.version} points to a deleted logged model {mv.source}",
            )
            hf_dir = self._download_logged(model)
        else:  # a version registered from a run's artifacts (MLflow 2 style)
            uri = self.client.get_model_version_download_uri(name, mv.version)
            hf_dir = self._download(uri, _uri_key(self.uri, uri))
        return hf_dir, RegisteredModel(name, str(mv.version), mv.source), mv.run_id

    def _run_model(self, run_id: str, name: str | None) -> tuple[Path, None, str]:
        run = self._call(lambda: self.client.get_run(run_id), f"no MLflow run {run_id}")
        found = self._call(
            lambda: self.client.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}'",
            ),
            f"cannot list the models of run {run_id}",
        )
        ready = [m for m in found if str(m.status) in ("READY", "LoggedModelStatus.READY")]
        if name is not None:
            named = [m for m in ready if m.name == name]
            if named:
                return self._download_logged(_newest(named)), None, run_id
            # A model logged into the run's own artifacts (MLflow 2 style) has no entity.
            uri = f"runs:/{run_id}/{name}"
            try:
                return self._download(uri, _uri_key(self.uri, uri)), None, run_id
            except ModelSourceError:
                names = sorted({m.name for m in ready})
                raise ModelSourceError(
                    f"{self.source}: run {run_id} has no model named {name!r} "
                    f"(models logged in it: {names})"
                ) from None
        if not ready:
            raise ModelSourceError(f"{self.source}: run {run_id} has logged no model")
        return self._download_logged(_newest(ready)), None, run_id

    def _download_logged(self, model: Any) -> Path:
        return self._download(model.artifact_location, model.model_id)

    def _download(self, artifact_uri: str, key: str) -> Path:
        """The HF folder inside the model at ``artifact_uri``, downloaded once into the cache."""
        import mlflow

        target = self.cache / key
        if not (target / "MLmodel").is_file():
            self.cache.mkdir(parents=True, exist_ok=True)
            # Download beside the target and rename: an interrupted download is never mistaken
            # for a complete one, and two processes fetching the same model do not collide.
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.cache))
            try:
                # The folder lands at tmp/<last part of the URI>; the returned path says where.
                local = self._call(
                    lambda: mlflow.artifacts.download_artifacts(
                        artifact_uri=artifact_uri, dst_path=str(tmp), tracking_uri=self.uri
                    ),
                    f"no model files at {artifact_uri}",
                )
                if not (Path(local) / "MLmodel").is_file():
                    raise ModelSourceError(
                        f"{self.source}: {artifact_uri} is not an MLflow model (no MLmodel)"
                    )
                try:
                    Path(local).rename(target)
                except OSError:  # another process finished first
                    if not (target / "MLmodel").is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return _inner_hf_dir(self.source, target)


def _tracking_uri(source: str, configured: str | None) -> str:
    from pipelines.tracking.runs import resolve_tracking

    uri = resolve_tracking(configured).tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        # Opening it would create an empty store here and then report the model missing.
        raise ModelSourceError(
            f"{source}: no MLflow store at {uri}; pass --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    return uri


def _newest(models: list[Any]) -> Any:
    """The most recently logged model; equal timestamps are ordered by the training step."""

    def step(model: Any) -> int:
        value = (model.tags or {}).get("lineage.step", "")
        return int(value) if value.isdigit() else -1

    return max(models, key=lambda m: (m.creation_timestamp or 0, step(m)))


def _uri_key(tracking_uri: str, artifact_uri: str) -> str:
    return "u-" + hashlib.sha256(f"{tracking_uri}\n{artifact_uri}".encode()).hexdigest()[:32]
