"""Source resolution (Hub, mirror, S3, local) and the config loader; no Ray, no network."""

from __future__ import annotations

import pytest
from data_fixtures import write_jsonl, write_parquet

from pipelines.data import MixtureConfig, PretrainDataConfig, SourceConfig
from pipelines.data.sources import (
    detect_format,
    filesystem,
    list_files,
    patterns_for,
    resolve_root,
)


def test_hub_dataset_and_its_mirror_share_layout_and_relative_paths(shared_data):
    # Without data_dir the root is the Hub; with it, the mirror. The glob is the same.
    assert resolve_root("hf://datasets/allenai/c4", None) == "hf://datasets/allenai/c4"
    assert resolve_root("hf://datasets/allenai/c4", str(shared_data)) == str(shared_data / "c4")
    assert patterns_for("hf://datasets/allenai/c4", "en", "train", None) == [
        "en/c4-train.*.json.gz"
    ]
    c4 = list_files("hf://datasets/allenai/c4", config="en", data_dir=str(shared_data))
    assert [(f.relpath, f.format) for f in c4] == [("en/c4-train.00000-of-00001.json.gz", "json")]
    wiki = list_files(
        "hf://datasets/wikimedia/wikipedia", config="20150501.en", data_dir=str(shared_data)
    )
    assert [f.relpath for f in wiki] == [
        "20150501.en/train-00000-of-00002.parquet",
        "20150501.en/train-00001-of-00002.parquet",
    ]
    assert all(f.size > 0 and f.version for f in wiki)


def test_hub_and_s3_urls_get_their_filesystems_without_network():
    from huggingface_hub import HfFileSystem

    fs, path = filesystem("hf://datasets/allenai/c4/en")
    assert isinstance(fs, HfFileSystem) and path == "datasets/allenai/c4/en"
    fs, path = filesystem("s3://bucket/prefix/part-0.parquet")
    assert path == "bucket/prefix/part-0.parquet" and hasattr(fs, "glob")


def test_local_folder_glob_and_single_file(tmp_path):
    write_parquet(tmp_path / "d" / "b.parquet", {"text": ["x"]})
    write_jsonl(tmp_path / "d" / "sub" / "a.jsonl.gz", [{"text": "y"}])
    (tmp_path / "d" / "notes.md").write_text("not data")
    folder = list_files(str(tmp_path / "d"))
    assert [(f.relpath, f.format) for f in folder] == [
        ("b.parquet", "parquet"),
        ("sub/a.jsonl.gz", "json"),
    ]
    glob = list_files(str(tmp_path / "d" / "*.parquet"))
    assert [f.relpath for f in glob] == ["b.parquet"]
    single = list_files(str(tmp_path / "d" / "b.parquet"))
    assert [f.relpath for f in single] == ["b.parquet"]
    with pytest.raises(FileNotFoundError, match=r"\*\.txt"):
        list_files(str(tmp_path / "d" / "*.txt"))


def test_formats_and_layouts_that_cannot_be_resolved_say_why():
    assert detect_format("x/part.jsonl.gz") == "json"
    assert detect_format("x/part.txt") == "text"
    assert detect_format("x/part.csv", "parquet") == "parquet"
    with pytest.raises(ValueError, match=r"part\.csv"):
        detect_format("x/part.csv")
    with pytest.raises(ValueError, match="no known shard layout for Hub dataset 'me/mine'"):
        patterns_for("hf://datasets/me/mine", None, "train", None)
    assert patterns_for("hf://datasets/me/mine", "c", "test", "{config}/{split}/*.parquet") == [
        "c/test/*.parquet"
    ]


def test_source_config_validation_names_the_field():
    with pytest.raises(ValueError, match="weight"):
        SourceConfig(weight=0)
    with pytest.raises(ValueError, match="sample_by"):
        SourceConfig(sample_by="sentence")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct names"):
        PretrainDataConfig(sources=[SourceConfig(), SourceConfig()])


def test_data_config_loads_from_yaml_with_the_project_loader(tmp_path):
    from pipelines.config import ConfigError, load_config

    cfg = load_config(
        PretrainDataConfig,
        "pipelines/data/configs/shared_data.yaml",
        ["sources.1.weight=0.4", "task_crops=64", "mixture.max_crops=100"],
    )
    assert [(s.name, s.config, s.weight) for s in cfg.sources] == [
        ("c4", "en", 0.7),
        ("wikipedia", "20150501.en", 0.4),
    ]
    assert cfg.mixture == MixtureConfig(max_crops=100) and cfg.packing.group_size == 10
    with pytest.raises(ConfigError, match="stoping_strategy"):
        load_config(PretrainDataConfig, None, ["mixture.stoping_strategy=cycle"])
    with pytest.raises(ConfigError, match="validation_fraction"):
        load_config(PretrainDataConfig, None, ["split.validation_fraction=2"])


def test_a_remote_filesystem_goes_through_the_same_path_as_local_files(tmp_path):
    """fsspec's in-memory filesystem stands in for the Hub and S3: only the filesystem differs."""
    import fsspec

    from pipelines.data import SplitConfig, build_index_local, local_crops

    write_parquet(tmp_path / "src" / "part-0.parquet", {"text": ["remote words"] * 30})
    write_jsonl(tmp_path / "src" / "part-1.jsonl.gz", [{"text": "more text"}] * 20)
    memory = fsspec.filesystem("memory")
    for name in ("part-0.parquet", "part-1.jsonl.gz"):
        memory.pipe(f"/bucket/src/{name}", (tmp_path / "src" / name).read_bytes())

    def crops(path):
        cfg = PretrainDataConfig(
            sources=[SourceConfig(name="s", path=path)],
            split=SplitConfig(validation_fraction=0.2),
        )
        index = build_index_local(cfg)
        return [f.relpath for f in index.sources[0].files], list(local_crops(cfg, index))

    remote_files, remote = crops("memory://bucket/src")
    local_files, local = crops(str(tmp_path / "src"))
    assert remote_files == local_files == ["part-0.parquet", "part-1.jsonl.gz"]
    assert len(remote) == len(local) > 0
    for a, b in zip(remote, local, strict=True):
        for key in a:
            assert (a[key] == b[key]).all(), key
