"""modelrepo.prune_versions: old checkpoints go, served and named versions stay."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorwire.errors import InvalidArgumentError
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model


def _repo_with_versions(root: Path, count: int, **config_overrides: object) -> Path:
    state = build_model("spiral").state_dict()
    for _ in range(count):
        modelrepo.write_version(root, "m", "spiral", state, config_overrides=config_overrides or None)
    return root


def test_keeps_the_newest_and_deletes_the_rest_completely(tmp_path: Path) -> None:
    repo = _repo_with_versions(tmp_path, 6)
    assert modelrepo.prune_versions(repo, "m", 2) == [1, 2, 3, 4]
    assert modelrepo.list_versions(repo, "m") == [5, 6]
    # Nothing half-deleted is left behind, and numbering goes on after the newest.
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["5", "6", "config.json"]
    modelrepo.write_version(repo, "m", "spiral", build_model("spiral").state_dict())
    assert modelrepo.list_versions(repo, "m") == [5, 6, 7]
    assert modelrepo.prune_versions(repo, "m", 2) == [5]
    loaded = modelrepo.load_state_dict(modelrepo.weights_path(repo, "m", 7))
    assert set(loaded) == set(build_model("spiral").state_dict())


def test_zero_keeps_everything(tmp_path: Path) -> None:
    repo = _repo_with_versions(tmp_path, 3)
    assert modelrepo.prune_versions(repo, "m", 0) == []
    assert modelrepo.list_versions(repo, "m") == [1, 2, 3]


def test_versions_the_config_serves_are_never_pruned(tmp_path: Path) -> None:
    # A latest policy serving more versions than `keep`: its versions stay.
    repo = _repo_with_versions(tmp_path / "latest", 5, version_policy={"latest": {"num_versions": 3}})
    assert modelrepo.prune_versions(repo, "m", 1) == [1, 2]
    # An A/B split pointed at an old version keeps it; so does a specific policy.
    repo = _repo_with_versions(tmp_path / "ab", 5, traffic={"1": 0.1, "5": 0.9})
    assert modelrepo.prune_versions(repo, "m", 1) == [2, 3, 4]
    assert modelrepo.list_versions(repo, "m") == [1, 5]
    repo = _repo_with_versions(tmp_path / "specific", 4, version_policy={"specific": {"versions": [2]}})
    assert modelrepo.prune_versions(repo, "m", 1) == [1, 3]
    # Under an "all" policy every version is served: nothing goes.
    repo = _repo_with_versions(tmp_path / "all", 3, version_policy={"all": {}})
    assert modelrepo.prune_versions(repo, "m", 1) == []


def test_protected_versions_stay_and_a_dead_pruning_is_cleaned_up(tmp_path: Path) -> None:
    repo = _repo_with_versions(tmp_path, 4)
    leftover = repo / "m" / ".v0-deadbeef.deleting"
    leftover.mkdir()
    (leftover / "model.pt").write_bytes(b"half deleted")
    assert modelrepo.prune_versions(repo, "m", 1, protect=(2,)) == [1, 3]
    assert modelrepo.list_versions(repo, "m") == [2, 4]
    assert not leftover.exists()


def test_version_policy_is_parsed_once_and_written_back_as_json(tmp_path: Path) -> None:
    repo = _repo_with_versions(tmp_path, 3, version_policy={"specific": {"versions": [1, 3]}})
    policy = modelrepo.read_config(repo, "m")["version_policy"]
    assert policy == modelrepo.VersionPolicy("specific", versions=(1, 3))
    assert policy.select([1, 2, 3]) == [1, 3]
    assert '"specific"' in (repo / "m" / "config.json").read_text()
    assert modelrepo.VersionPolicy.parse({"latest": {"num_versions": 2}}).select([3, 1, 2]) == [2, 3]
    assert modelrepo.VersionPolicy.parse({"all": {}}).select([2, 1]) == [1, 2]


@pytest.mark.parametrize("raw, message", [
    ({"newest": {}}, "must be one of"),
    ({"latest": {"num_versions": 0}}, "num_versions must be an integer in 1.."),
    ({"latest": {"num_versions": True}}, "num_versions must be an integer"),
    ({"specific": {"versions": 3}}, "versions must be a list"),
    ({"specific": {"versions": ["²"]}}, "ASCII digits only"),
    ({"all": {}, "latest": {}}, "must be one of"),
])
def test_a_bad_version_policy_is_refused_with_its_value(tmp_path: Path, raw: object, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        _repo_with_versions(tmp_path, 1, version_policy=raw)


def test_list_models_skips_by_name_and_has_model_looks_at_one_folder(tmp_path: Path) -> None:
    state = build_model("spiral").state_dict()
    for name in ("spiral", "run-1", "run-2"):
        modelrepo.write_version(tmp_path, name, "spiral", state)
    (tmp_path / "run-3").mkdir()  # a folder, not a model
    (tmp_path / "run-4").write_text("a file")
    assert modelrepo.list_models(tmp_path) == ["run-1", "run-2", "spiral"]
    assert modelrepo.list_models(tmp_path, skip=lambda name: name.startswith("run-")) == ["spiral"]
    assert modelrepo.has_model(tmp_path, "run-1") and modelrepo.has_model(tmp_path, "spiral")
    for name in ("run-3", "run-4", "run-5", "..", "run-1/1", "../" + tmp_path.name + "/spiral", ""):
        assert not modelrepo.has_model(tmp_path, name), name
