"""Model sources and the registry against a real MLflow server: tiny models logged and registered
through pipelines.tracking.registry, then resolved and loaded from every source form, with the
loaded weights compared to the saved ones; the errors of each kind of missing or wrong source; and
promotion with aliases."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fixtures_train import free_port

from pipelines.tracking import registry
from pipelines.tracking.models import ModelSourceError, load_model, resolve_model
from pipelines.tracking.registry import Lineage, RegisteredModel

LABELS = ["neg", "pos"]


@dataclass(frozen=True)
class TinyModels:
    """A tiny MLM and a tiny classifier, saved and registered; what the tests resolve."""

    uri: str  # the tracking server
    mlm_dir: Path
    cls_dir: Path
    mlm: RegisteredModel
    cls: RegisteredModel
    mlm_run: str
    cls_run: str


def save_tiny(kind: str, path: Path, seed: int, initializer_range: float = 0.02) -> Path:
    """A seeded tiny model in HF format (perceiver_core.hf.save_pretrained).

    With the default initialisation every text scores about 0.5 for each label; a larger
    ``initializer_range`` gives a random classifier whose labels differ between texts.
    """
    from perceiver_core.config import get_preset
    from perceiver_core.hf import save_pretrained
    from perceiver_core.model import PerceiverForMaskedLM, PerceiverForSequenceClassification

    torch.manual_seed(seed)
    if kind == "mlm":
        model = PerceiverForMaskedLM(get_preset("tiny", initializer_range=initializer_range))
    else:
        config = get_preset(
            "tiny",
            num_labels=2,
            id2label=dict(enumerate(LABELS)),
            initializer_range=initializer_range,
        )
        model = PerceiverForSequenceClassification(config)
    return save_pretrained(model, path)


def new_run(uri: str, name: str, experiment: str = "model-tests") -> str:
    from mlflow import MlflowClient

    from pipelines.tracking import runs

    client = MlflowClient(uri)
    return client.create_run(
        runs.experiment_id(client, experiment, None), run_name=name
    ).info.run_id


def lineage(run_id: str, step: int = 1, **extra: object) -> Lineage:
    return Lineage(run_id, step, "data-fp", "config-hash", "test-code", **extra)  # type: ignore[arg-type]


def register_tiny(uri: str, root: Path, prefix: str) -> TinyModels:
    """Both tiny models logged and registered as ``{prefix}-mlm`` / ``{prefix}-cls``; the
    classifier's lineage names the MLM as its parent."""
    mlm_dir = save_tiny("mlm", root / "mlm", seed=0)
    cls_dir = save_tiny("classifier", root / "cls", seed=1)
    mlm_run, cls_run = new_run(uri, "pretrain"), new_run(uri, "finetune")
    mlm = registry.log_and_register(uri, mlm_dir, f"{prefix}-mlm", lineage(mlm_run, task="mlm"))
    cls = registry.log_and_register(
        uri,
        cls_dir,
        f"{prefix}-cls",
        lineage(cls_run, 7, parent=mlm.registry_uri, task="imdb", metrics={"accuracy": 0.75}),
    )
    return TinyModels(uri, mlm_dir, cls_dir, mlm, cls, mlm_run, cls_run)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from perceiver_core.hf import hf_to_ours, load_state_dict

    state = load_state_dict(path)
    return hf_to_ours(state) if any(k.startswith("perceiver.") for k in state) else state


def assert_same_weights(model: torch.nn.Module, saved: Path) -> None:
    expected = weights(saved)
    actual = model.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key].cpu(), value), key


@pytest.fixture(scope="module")
def tiny(mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return register_tiny(mlflow_server.uri, tmp_path_factory.mktemp("tiny-models"), "models")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(autouse=True)
def private_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls without ``cache_dir`` download here, not into the user's ~/.cache."""
    monkeypatch.setenv("PERCEIVER_MODEL_CACHE", str(tmp_path / "default-cache"))


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# -- logging and registering -----------------------------------------------------------------------


def test_versions_carry_lineage_task_and_signature(tiny: TinyModels) -> None:
    import mlflow

    c = client(tiny.uri)
    tags = c.get_model_version(tiny.cls.name, tiny.cls.version).tags
    assert tags["lineage.run_id"] == tiny.cls_run
    assert tags["lineage.step"] == "7"
    assert tags["lineage.parent"] == f"models:/models-mlm/{tiny.mlm.version}"
    assert tags["lineage.task"] == "imdb"
    assert float(tags["metric.accuracy"]) == 0.75
    # The metrics also show where users look: on the version's logged model (what the registry
    # page shows for a version), and on the run it links to.
    logged = c.get_logged_model(tiny.cls.model_uri.removeprefix("models:/"))
    assert {(m.key, m.value, m.step) for m in logged.metrics} == {("val/accuracy", 0.75, 7)}
    assert c.get_run(tiny.cls_run).data.metrics == {"val/accuracy": 0.75}
    assert "lineage.parent" not in c.get_model_version(tiny.mlm.name, tiny.mlm.version).tags

    mlflow.set_tracking_uri(tiny.uri)
    info = mlflow.models.get_model_info(tiny.cls.registry_uri)
    assert info.flavors["transformers"]["task"] == "text-classification"
    assert info.signature.inputs.input_types() == [mlflow.types.DataType.string]
    outputs = info.signature.outputs.to_dict()
    assert [(o["name"], o["type"]) for o in outputs] == [("label", "string"), ("score", "double")]
    mlm_info = mlflow.models.get_model_info(tiny.mlm.registry_uri)
    assert mlm_info.flavors["transformers"]["task"] == "fill-mask"
    assert mlm_info.signature is not None
    assert mlm_info.signature.outputs.input_types() == [mlflow.types.DataType.string]


def test_registration_is_idempotent_per_run_and_step(tiny: TinyModels) -> None:
    again = registry.log_and_register(
        tiny.uri, tiny.cls_dir, tiny.cls.name, lineage(tiny.cls_run, 7, task="imdb")
    )
    assert again.version == tiny.cls.version
    assert len(client(tiny.uri).search_model_versions(f"name = '{tiny.cls.name}'")) == 1


# -- resolving and loading every source form -------------------------------------------------------


def ray_run_folder(tiny: TinyModels, root: Path) -> Path:
    """A Ray Train run folder: two exports (the newest one is the classifier) and a newer
    checkpoint without an export."""
    run = root / "ray-run"
    for step, src in ((10, tiny.mlm_dir), (20, tiny.cls_dir)):
        ckpt = run / f"checkpoint_{step:08d}"
        shutil.copytree(src, ckpt / "hf")
        (ckpt / "state.json").write_text(json.dumps({"run_id": f"run-at-{step}"}))
    (run / "checkpoint_00000030").mkdir()
    (run / "checkpoint_00000030" / "state.json").write_text("{}")
    return run


SOURCES = {
    # name: (source built from the fixture, expected kind, registered?, run id attribute)
    "version": (lambda t, _: t.cls.registry_uri, "classifier", True, "cls_run"),
    "alias": (lambda t, _: f"models:/{t.cls.name}@champion", "classifier", True, "cls_run"),
    "latest": (lambda t, _: f"models:/{t.mlm.name}/latest", "mlm", True, "mlm_run"),
    "logged-model": (lambda t, _: t.cls.model_uri, "classifier", False, "cls_run"),
    "runs-uri": (lambda t, _: f"runs:/{t.mlm_run}/model-step1", "mlm", False, "mlm_run"),
    "run-id": (lambda t, _: t.cls_run, "classifier", False, "cls_run"),
    "hf-dir": (lambda t, _: str(t.mlm_dir), "mlm", False, None),
    "checkpoint": (
        lambda t, root: str(root / "ray-run" / "checkpoint_00000010"),
        "mlm",
        False,
        "10",
    ),
    "ray-run": (lambda t, root: str(root / "ray-run"), "classifier", False, "20"),
    "mlflow-download": (lambda t, root: str(root / "downloaded"), "classifier", False, None),
}


@pytest.fixture(scope="module")
def local_root(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlflow

    root = tmp_path_factory.mktemp("local-sources")
    ray_run_folder(tiny, root)
    # What `mlflow artifacts download -u models:/...` leaves: MLmodel, model/, components/.
    logged = client(tiny.uri).get_logged_model(tiny.cls.model_uri[len("models:/") :])
    local = mlflow.artifacts.download_artifacts(
        logged.artifact_location, dst_path=str(root / "download"), tracking_uri=tiny.uri
    )
    Path(local).rename(root / "downloaded")
    registry.set_alias(client(tiny.uri), tiny.cls.name, "champion", tiny.cls.version)
    return root


@pytest.mark.parametrize("form", list(SOURCES))
def test_every_source_form_loads_the_registered_weights(
    tiny: TinyModels, local_root: Path, cache: Path, form: str
) -> None:
    make, kind, registered, run = SOURCES[form]
    source = make(tiny, local_root)
    resolved = resolve_model(source, tracking_uri=tiny.uri, cache_dir=cache)
    assert resolved.source == source
    assert resolved.kind == kind
    assert resolved.label_names == (LABELS if kind == "classifier" else [])
    assert (resolved.hf_dir / "config.json").is_file()
    if registered:
        expected = tiny.cls if kind == "classifier" else tiny.mlm
        assert resolved.registered == expected
    else:
        assert resolved.registered is None
    if run is None:
        assert resolved.run_id is None
    elif run.isdigit():  # a checkpoint's state.json
        assert resolved.run_id == f"run-at-{run}"
    else:
        assert resolved.run_id == getattr(tiny, run)

    loaded = load_model(source, tracking_uri=tiny.uri, cache_dir=cache)
    assert loaded.kind == kind and loaded.label_names == resolved.label_names
    assert not loaded.model.training
    assert_same_weights(loaded.model, tiny.cls_dir if kind == "classifier" else tiny.mlm_dir)


def test_a_transformers_saved_directory_loads(tmp_path: Path) -> None:
    """The layout of a Hub download: written by transformers itself, not by perceiver_core."""
    import transformers

    saved = save_tiny("classifier", tmp_path / "ours", seed=3)
    hf = transformers.PerceiverForSequenceClassification.from_pretrained(saved)
    hf.save_pretrained(tmp_path / "hub")
    loaded = load_model(str(tmp_path / "hub"), expect="classifier")
    assert loaded.label_names == LABELS
    assert_same_weights(loaded.model, saved)


_RESOLVE_EACH = r"""
import json, sys
from pipelines.tracking.models import ModelSourceError, resolve_model
for source in sys.argv[1:]:
    try:
        r = resolve_model(source)
        print(json.dumps([source, "ok", r.kind, str(r.hf_dir)]))
    except ModelSourceError as error:
        print(json.dumps([source, "error", str(error)]))
"""


def resolve_each(sources: list[str], **env: str) -> dict[str, list[str]]:
    """``resolve_model`` of each source in a fresh process (huggingface_hub reads its settings
    from the environment when it is imported): ``[status, kind, folder]`` or ``[status, error]``."""
    import subprocess
    import sys

    from fixtures_train import REPO

    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    out = subprocess.run(
        [sys.executable, "-c", _RESOLVE_EACH, *sources],
        cwd=REPO,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    return {row[0]: row[1:] for row in rows}


def test_a_hub_id_is_downloaded_from_the_hub_and_then_found_offline(
    tiny: TinyModels, tmp_path: Path
) -> None:
    """Hub ids (``org/name``, ``@revision``, ``hf://``) download through huggingface_hub from a
    Hub on 127.0.0.1 (``HF_ENDPOINT``) into ``HF_HOME``; every way that fails is one line."""
    from hub_server import FakeHub, HubRepo

    from perceiver_core.hf import load_state_dict

    bin_only = tmp_path / "bin-only"
    shutil.copytree(tiny.mlm_dir, bin_only)
    torch.save(load_state_dict(bin_only / "model.safetensors"), bin_only / "pytorch_model.bin")
    (bin_only / "model.safetensors").unlink()
    not_a_model = tmp_path / "no-config"
    not_a_model.mkdir()
    repos = {
        "org/tiny": HubRepo(tiny.mlm_dir, {"main": "a" * 40, "v1": "b" * 40}),
        "org/cls": HubRepo(tiny.cls_dir),
        "org/gated": HubRepo(tiny.mlm_dir, gated=True),
        "org/bin-only": HubRepo(bin_only),
        "org/no-config": HubRepo(not_a_model),
    }
    home = tmp_path / "hf-home"
    with FakeHub(repos) as hub:
        got = resolve_each(
            [
                *("org/tiny", "org/tiny@v1", "hf://org/cls", "org/bin-only"),
                *("org/tiny@nope", "org/missing", "org/gated", "org/no-config"),
            ],
            HF_ENDPOINT=hub.url,
            HF_HOME=str(home),
        )
    snapshots = home / "hub" / "models--org--tiny" / "snapshots"
    assert got["org/tiny"] == ["ok", "mlm", str(snapshots / ("a" * 40))]
    assert got["org/tiny@v1"] == ["ok", "mlm", str(snapshots / ("b" * 40))]
    assert got["hf://org/cls"][:2] == ["ok", "classifier"]
    assert got["org/bin-only"][:2] == ["ok", "mlm"]  # weights_only: plain tensors load
    assert_same_weights(_mlm(got["org/bin-only"][2]), tiny.mlm_dir)
    errors = {k: v[1] for k, v in got.items() if v[0] == "error"}
    assert errors == {
        "org/tiny@nope": "org/tiny@nope: the Hub repository has no revision nope",
        "org/missing": f"org/missing: no such folder, and no such model repository on {hub.url} "
        "(a private one needs HF_TOKEN)",
        "org/gated": f"org/gated: a gated repository on {hub.url}: accept its conditions on the "
        "Hub and set HF_TOKEN (or run huggingface-cli login)",
        "org/no-config": "org/no-config: the Hub repository has no config.json: not a model",
    }
    # With a token the gated repository downloads; offline, what was downloaded is found and
    # what was not is one line; an unreachable endpoint says so.
    with FakeHub(repos) as hub:
        gated = resolve_each(["org/gated"], HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_TOKEN="t")
    assert gated["org/gated"][:2] == ["ok", "mlm"]
    offline = resolve_each(["org/tiny", "org/other"], HF_HOME=str(home), HF_HUB_OFFLINE="1")
    assert offline["org/tiny"] == ["ok", "mlm", str(snapshots / ("a" * 40))]
    assert offline["org/other"] == [
        "error",
        f"org/other: HF_HUB_OFFLINE is set and the model is not in the local Hub cache "
        f"({home / 'hub'}); download it where the Hub is reachable (huggingface-cli download "
        "org/other) or pass a local folder",
    ]
    nowhere = f"http://127.0.0.1:{free_port()}"
    unreachable = resolve_each(["org/other"], HF_ENDPOINT=nowhere, HF_HOME=str(home))
    assert unreachable["org/other"][1].startswith(f"org/other: {nowhere} is not reachable and")


def _mlm(folder: str) -> torch.nn.Module:
    from perceiver_core.hf import from_pretrained
    from perceiver_core.model import PerceiverForMaskedLM

    return from_pretrained(PerceiverForMaskedLM, folder, strict=True)


def test_tracking_uri_defaults_to_the_environment(
    tiny: TinyModels, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny.uri)
    assert resolve_model(tiny.mlm.registry_uri, cache_dir=cache).kind == "mlm"


def test_downloads_are_cached_by_logged_model(tiny: TinyModels, tmp_path: Path) -> None:
    first = resolve_model(tiny.cls.registry_uri, tracking_uri=tiny.uri, cache_dir=tmp_path)
    weights_file = first.hf_dir / "model.safetensors"
    stamp = weights_file.stat().st_mtime_ns
    again = resolve_model(tiny.cls.model_uri, tracking_uri=tiny.uri, cache_dir=tmp_path)
    assert again.hf_dir == first.hf_dir
    assert weights_file.stat().st_mtime_ns == stamp  # not downloaded again
    assert [p.name for p in tmp_path.iterdir()] == [tiny.cls.model_uri[len("models:/") :]]


# -- errors ----------------------------------------------------------------------------------------


def not_a_model(root: Path) -> str:
    folder = root / "bert"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return str(folder)


ERRORS = {
    "missing-name": (lambda t, _: "models:/no-such-model/1", "no registered model named"),
    "missing-version": (lambda t, _: f"models:/{t.cls.name}/99", "has no version '99'"),
    "missing-alias": (lambda t, _: f"models:/{t.cls.name}@nope", "has no alias 'nope'"),
    "missing-logged": (lambda t, _: "models:/m-0123456789abcdef", "no logged model"),
    "missing-run": (lambda t, _: "0" * 32, f"no MLflow run {'0' * 32}"),
    "missing-run-uri": (lambda t, _: f"runs:/{'0' * 32}/model", "no MLflow run"),
    "missing-run-model": (lambda t, _: f"runs:/{t.cls_run}/nothing", "has no model named"),
    "missing-folder": (lambda t, root: str(root / "absent"), "no such folder"),
    "empty-folder": (lambda t, root: str(root), "is not a model folder"),
    "bert": (lambda t, root: not_a_model(root), "is not a Perceiver model"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_a_bad_source_fails_fast_and_says_why(
    tiny: TinyModels, cache: Path, tmp_path: Path, case: str
) -> None:
    make, message = ERRORS[case]
    source = make(tiny, tmp_path)
    started = time.monotonic()
    with pytest.raises(ModelSourceError) as raised:
        resolve_model(source, tracking_uri=tiny.uri, cache_dir=cache)
    assert time.monotonic() - started < 10  # no retrying on a missing model
    assert source in str(raised.value)
    assert message in str(raised.value)


def test_wrong_kind_is_refused_both_ways(tiny: TinyModels, cache: Path) -> None:
    with pytest.raises(ModelSourceError) as raised:
        load_model(tiny.cls.registry_uri, tracking_uri=tiny.uri, expect="mlm")
    assert str(raised.value) == (
        f"{tiny.cls.registry_uri} is a classifier (PerceiverForSequenceClassification); "
        "this needs a masked-language model"
    )
    with pytest.raises(ModelSourceError, match=r"is a masked-language model \(PerceiverForMa"):
        resolve_model(str(tiny.mlm_dir), expect="classifier")


def test_a_missing_local_store_is_named_not_created(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ModelSourceError, match="no MLflow store at"):
        resolve_model("models:/x/1", tracking_uri=store)
    assert not (tmp_path / "mlflow.db").exists()


def test_an_unreachable_server_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(ModelSourceError, match="MLflow"):
        resolve_model("models:/x/1", tracking_uri="http://127.0.0.1:9")


# -- aliases and promotion -------------------------------------------------------------------------


def test_promotion_moves_champion_and_challenger(tiny: TinyModels) -> None:
    c = client(tiny.uri)
    name = "models-promotion"
    c.create_registered_model(name)

    def version(accuracy: float, loss: float) -> str:
        tags = lineage("r", metrics={"accuracy": accuracy, "loss": loss}).tags()
        model_id = tiny.cls.model_uri[len("models:/") :]
        return c.create_model_version(
            name, source=tiny.cls.model_uri, tags=tags, model_id=model_id
        ).version

    def aliases() -> dict[str, str | None]:
        return {a: registry.get_alias(c, name, a) for a in ("champion", "challenger")}

    v1, v2, v3 = version(0.70, 0.5), version(0.60, 0.2), version(0.70, 0.4)
    assert aliases() == {"champion": None, "challenger": None}

    first = registry.promote(c, name, v1, metric="accuracy", higher_is_better=True)
    assert first == registry.PromotionDecision(True, v1, None, 0.70, None)
    assert aliases() == {"champion": v1, "challenger": None}
    assert c.get_model_version(name, v1).tags["promotion.previous_champion"] == "none"

    worse = registry.promote(c, name, v2, metric="accuracy", higher_is_better=True)
    assert worse == registry.PromotionDecision(False, v2, v1, 0.60, 0.70)
    assert aliases() == {"champion": v1, "challenger": v2}
    tags = c.get_model_version(name, v2).tags
    assert tags["promotion.decision"] == "challenger"
    assert float(tags["promotion.champion_score"]) == 0.70
    assert float(tags["promotion.challenger_score"]) == 0.60
    assert tags["promotion.previous_champion"] == v1

    equal = registry.promote(c, name, v3, metric="accuracy", higher_is_better=True)
    assert equal.promoted and equal.champion_before == v1
    assert aliases() == {"champion": v3, "challenger": v2}
    assert c.get_model_version(name, v3).tags["promotion.decision"] == "champion"

    before = c.get_model_version(name, v3).tags
    again = registry.promote(c, name, v3, metric="accuracy", higher_is_better=True)
    assert again.promoted and again.champion_before == v3
    assert aliases() == {"champion": v3, "challenger": v2}
    assert c.get_model_version(name, v3).tags == before

    # Lower is better for a loss: the challenger v2 (0.2) beats v3 (0.4) and stops challenging.
    by_loss = registry.promote(c, name, v2, metric="loss", higher_is_better=False)
    assert by_loss == registry.PromotionDecision(True, v2, v3, 0.2, 0.4)
    assert aliases() == {"champion": v2, "challenger": None}

    with pytest.raises(ValueError, match=r"no usable tag metric\.f1"):
        registry.promote(c, name, v1, metric="f1", higher_is_better=True)


def test_alias_helpers(tiny: TinyModels) -> None:
    c = client(tiny.uri)
    assert registry.get_alias(c, "no-such-model", "champion") is None
    registry.set_alias(c, tiny.mlm.name, "pretrained", tiny.mlm.version)
    assert registry.get_alias(c, tiny.mlm.name, "pretrained") == tiny.mlm.version


def test_default_model_names() -> None:
    assert registry.default_model_name("imdb") == "perceiver-imdb"
    assert registry.default_model_name("glue/sst2") == "perceiver-sst2"
    assert registry.default_model_name("files") == "perceiver-files"
    assert registry.default_model_name("mlm") == "perceiver-mlm"
    with pytest.raises(ValueError):
        registry.default_model_name("/")


def test_a_registered_language_model_fills_text_longer_than_its_positions(
    tiny: TinyModels,
) -> None:
    """``pyfunc`` (and so ``mlflow models serve``) truncates to the model's positions, as recorded
    with the logged model: a long text fills exactly as its covered prefix does."""
    import mlflow

    mlflow.set_tracking_uri(tiny.uri)
    model = mlflow.pyfunc.load_model(tiny.mlm.registry_uri)
    positions = json.loads((tiny.mlm_dir / "config.json").read_text())["max_position_embeddings"]
    text = "The film was [MASK] good, " + "and the cast was fine. " * 20
    assert len(text.encode()) > positions
    covered = positions - 2 + len("[MASK]") - 1  # [CLS], [SEP]; "[MASK]" is one token
    long, prefix = model.predict([text, text[:covered]])
    assert isinstance(long, str) and long == prefix  # the predicted byte (without: IndexError)
