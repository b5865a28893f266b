"""The volume registry and its one rule for config and API volumes."""

from __future__ import annotations

import json

import pytest

from glide.config import Config, VolumeConfig, ensure_default_volume
from glide.errors import CorruptData
from glide.volume.registry import VolumeRegistry

G = 1 << 30


def cfg_with(tmp_path, *vols: VolumeConfig) -> Config:
    cfg = Config(data_dir=tmp_path)
    cfg.volumes = list(vols)
    ensure_default_volume(cfg)
    return cfg


def served(reg: VolumeRegistry, cfg: Config) -> dict[str, int]:
    return {v.name: v.size for v in reg.served_volumes(cfg)}


def test_fresh_data_dir_gets_the_default_volume_once(tmp_path):
    reg = VolumeRegistry.load(tmp_path)
    assert served(reg, cfg_with(tmp_path)) == {"default": G}
    reg = VolumeRegistry.load(tmp_path)
    assert reg.entries["default"].origin == "api"
    reg.record_delete("default")
    # Deleted stays deleted: a registry exists, so no default comes back.
    assert served(VolumeRegistry.load(tmp_path), cfg_with(tmp_path)) == {}


def test_config_names_volumes_no_default(tmp_path):
    reg = VolumeRegistry.load(tmp_path)
    assert served(reg, cfg_with(tmp_path, VolumeConfig("vm1", G))) == {"vm1": G}


def test_union_and_the_larger_size_wins(tmp_path):
    reg = VolumeRegistry.load(tmp_path)
    cfg = cfg_with(tmp_path, VolumeConfig("vm1", G, ublk=True), VolumeConfig("vm2", 2 * G))
    reg.served_volumes(cfg)
    reg.record_create("api1", 4096 * 10)
    reg.record_size("vm1", 3 * G, from_config=True)  # grown through the API
    reg = VolumeRegistry.load(tmp_path)
    vols = {v.name: v for v in reg.served_volumes(cfg)}
    assert {n: v.size for n, v in vols.items()} == {"vm1": 3 * G, "vm2": 2 * G, "api1": 40960}
    assert vols["vm1"].ublk  # export settings come from the config
    assert reg.from_config(cfg, "vm1") and not reg.from_config(cfg, "api1")
    # A config that grew past the registry wins too.
    cfg.volumes[0].size = 5 * G
    assert served(reg, cfg)["vm1"] == 5 * G


@pytest.mark.parametrize("text", [
    "{", "[]", '{"version": 9, "volumes": {}}', '{"version": 1, "volumes": {"a": {}}}',
    '{"version": 1, "volumes": {"a": {"size": 4095, "origin": "api", "created": 0}}}',
    '{"version": 1, "volumes": {"a": {"size": 4096, "origin": "x", "created": 0}}}',
])
def test_damaged_registry_stops_with_the_path(tmp_path, text):
    (tmp_path / "volumes.json").write_text(text)
    with pytest.raises(CorruptData, match="volumes.json"):
        VolumeRegistry.load(tmp_path)


def test_saved_atomically_and_readable(tmp_path):
    reg = VolumeRegistry.load(tmp_path)
    reg.record_create("a", 8192)
    doc = json.loads((tmp_path / "volumes.json").read_text())
    assert doc["version"] == 1 and doc["volumes"]["a"]["size"] == 8192
    assert not list(tmp_path.glob("*.tmp"))
