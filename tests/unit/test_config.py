"""Configuration parsing: clear errors for bad input, defaults that run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from glide.cli.main import _base_config, build_parser, config_from_args
from glide.config import (
    DEFAULT_COMMIT_DEADLINE,
    Config,
    ConfigError,
    load_file,
    parse_duration,
    parse_size,
    validate,
)


def test_sizes_and_durations() -> None:
    assert parse_size("4096", "x") == 4096
    assert parse_size("256M", "x") == 256 << 20
    assert parse_size("1GiB", "x") == 1 << 30
    assert parse_size("2 TB", "x") == 2 << 40
    assert parse_duration("250ms", "x") == 0.25
    assert parse_duration("5s", "x") == 5.0
    for bad in ("-1", "1Q", "lots", ""):
        with pytest.raises(ConfigError):
            parse_size(bad, "x")
    with pytest.raises(ConfigError):
        parse_duration("0s", "x")


def test_defaults_validate(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    cfg = config_from_args(args)
    assert [v.name for v in cfg.volumes] == ["default"]
    assert cfg.nbd_tcp == "127.0.0.1:10809"
    assert cfg.unix_socket_path() == str(tmp_path / "nbd.sock")


def test_toml_file(tmp_path: Path) -> None:
    f = tmp_path / "glidefs.toml"
    f.write_text(
        f'data_dir = "{tmp_path}/d"\n'
        '[nbd]\ntcp = ""\n'
        '[cache]\nwal_budget = "512M"\nflush_interval = "2s"\n'
        '[[volume]]\nname = "a"\nsize = "1G"\n'
        '[[volume]]\nname = "b"\nsize = 8192\n'
    )
    cfg = load_file(f)
    validate(cfg)
    assert cfg.nbd_tcp is None
    assert cfg.wal_budget == 512 << 20
    assert [(v.name, v.size) for v in cfg.volumes] == [("a", 1 << 30), ("b", 8192)]


@pytest.mark.parametrize(
    "text,match",
    [
        ("[[volume]]\nname='a'\nsize='1000'\n", "multiple of 4096"),
        ("[[volume]]\nname='a/b'\nsize='1G'\n", "volume name"),
        ("[[volume]]\nname='a'\nsize='1G'\n[[volume]]\nname='a'\nsize='1G'\n", "twice"),
        ("bogus = 1\n", "unknown keys"),
        ("[cache]\nwal_budget = '1M'\n", "wal_budget"),
        ("[nbd]\ntcp = 'localhost'\n", "HOST:PORT"),
        ("this is = not toml [", "config file"),
        ("[cache]\ncheckpoint_interval = '5s'\n", "unknown keys in \\[cache\\]"),
        ("[cache]\nsize = '1M'\n", "cache.size"),
        ("[store]\nkind = 'ftp'\n", "store.kind"),
        ("[store]\nkind = 's3'\n", "store.bucket is required"),
        ("[store]\nbucket = 'b'\n", "do not apply to a local store"),
        ("[store]\nkind = 's3'\nbucket = 'b'\naddressing_style = 'x'\n", "addressing_style"),
        ("[store]\nkind = 's3'\nbucket = 'b'\nread_timeout = '0s'\n", "positive"),
        ("[store]\ncommit_deadline = '0s'\n", "store.commit_deadline: duration must be positive"),
        ("[store]\ncommit_deadline = 'soon'\n", "store.commit_deadline: cannot read"),
        ("[store]\ncommit_deadline = true\n", "store.commit_deadline: expected a duration"),
        ("[store]\ncommit_deadline = inf\n", "store.commit_deadline: duration must be finite"),
        ("[store]\ncommit_deadline = nan\n", "store.commit_deadline: duration must be positive"),
        ('pid_file = "run/glidefs.pid"\n', "must be an absolute path"),
        ("pid_file = 1\n", "pid_file must be a path"),
        ('pid_file = "/"\n', "is a directory"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        validate(load_file(f))


def test_store_config_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[store]\nkind = "s3"\nbucket = "bkt"\nprefix = "glide/"\n'
                 'endpoint_url = "http://minio:9000"\nread_timeout = "10s"\nmax_attempts = 3\n'
                 '[cache]\nsize = "10G"\n')
    cfg = load_file(f)
    validate(cfg)
    assert (cfg.store.kind, cfg.store.bucket, cfg.store.prefix) == ("s3", "bkt", "glide/")
    assert cfg.store.endpoint_url == "http://minio:9000" and cfg.store.read_timeout == 10.0
    assert cfg.cache_size == 10 << 30
    # the embedded default: a directory inside the data directory
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    cfg = config_from_args(args)
    assert cfg.store.kind == "local" and cfg.store.describe(cfg.data_dir) == str(tmp_path / "store")
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--store",
                                      "s3://b/p/q", "--s3-endpoint", "http://h:1"])
    cfg = config_from_args(args)
    assert (cfg.store.kind, cfg.store.bucket, cfg.store.prefix) == ("s3", "b", "p/q")
    assert cfg.store.endpoint_url == "http://h:1"
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--store", "/x/y"])
    assert config_from_args(args).store.path == Path("/x/y")
    for bad in ("s3://", "gs://bucket"):
        args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--store", bad])
        with pytest.raises(ConfigError, match="--store"):
            config_from_args(args)


def test_commit_deadline(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    assert config_from_args(args).store.commit_deadline == DEFAULT_COMMIT_DEADLINE == 600
    for table in ('kind = "local"', 'kind = "s3"\nbucket = "b"'):
        f = tmp_path / "c.toml"
        f.write_text(f'[store]\n{table}\ncommit_deadline = "90s"\n')
        cfg = load_file(f)
        validate(cfg)
        assert cfg.store.commit_deadline == 90.0
        # the flag wins over the file, for every command that flushes or collects
        for command in (["serve"], ["volume", "drain", "vol0"], ["gc"]):
            args = build_parser().parse_args([*command, "--config", str(f), "--data-dir",
                                              str(tmp_path), "--commit-deadline", "250ms"])
            assert _base_config(args).store.commit_deadline == 0.25
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path),
                                      "--commit-deadline", "0s"])
    with pytest.raises(ConfigError, match="--commit-deadline"):
        config_from_args(args)
    cfg = Config()
    cfg.store.commit_deadline = 0.0  # built in code, not parsed: validate still checks
    with pytest.raises(ConfigError, match="store.commit_deadline"):
        validate(cfg)


def test_example_config_in_deploy_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "glidefs.toml"
    cfg = load_file(example)
    validate(cfg)
    assert [v.name for v in cfg.volumes] == ["vm1", "db1"]
    assert cfg.volumes[0].ublk and cfg.volumes[0].ublk_id == 0


def test_api_and_log_sections(tmp_path: Path) -> None:
    tf = tmp_path / "token"
    p = tmp_path / "c.toml"
    p.write_text(f'[api]\nlisten = "127.0.0.1:9810"\ntoken_file = "{tf}"\n'
                 '[log]\nformat = "json"\n')
    cfg = load_file(p)
    validate(cfg)
    assert cfg.api.listen == "127.0.0.1:9810" and cfg.api.token_file == tf
    assert cfg.log_format == "json"
    assert cfg.admin_socket_path() == str(cfg.data_dir / "admin.sock")


@pytest.mark.parametrize("text, message", [
    ('[api]\nlisten = "127.0.0.1:9810"\n', "needs api.token_file"),
    ('[api]\nlisten = "nowhere"\ntoken_file = "/t"\n', "HOST:PORT"),
    ('[api]\nport = 1\n', "unknown keys in [api]"),
    ('[log]\nformat = "xml"\n', "log format must be text or json"),
    ('[log]\nlevel = "debug"\n', "unknown keys in [log]"),
])
def test_api_and_log_errors(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(load_file(p))


def test_api_flags(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "serve", "--data-dir", str(tmp_path), "--api-listen", "127.0.0.1:9811",
        "--api-token-file", str(tmp_path / "t"), "--log-format", "json"])
    cfg = config_from_args(args)
    assert cfg.api.listen == "127.0.0.1:9811" and cfg.log_format == "json"
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path),
                                      "--api-listen", "127.0.0.1:9811"])
    with pytest.raises(ConfigError, match="never served on TCP without a bearer token"):
        config_from_args(args)


def test_admin_socket_path_too_long(tmp_path: Path) -> None:
    cfg = Config(data_dir=tmp_path / ("x" * 100), nbd_unix="/tmp/short.sock")
    with pytest.raises(ConfigError, match="admin socket path"):
        validate(cfg)


def test_pid_file(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    assert config_from_args(args).pid_file is None
    p = tmp_path / "c.toml"
    p.write_text(f'pid_file = "{tmp_path}/run/glidefs.pid"\n')
    assert load_file(p).pid_file == tmp_path / "run" / "glidefs.pid"
    # The flag wins over the file, and a relative flag is taken from the cwd.
    args = build_parser().parse_args(["serve", "--config", str(p), "--data-dir", str(tmp_path),
                                      "--pid-file", "x.pid"])
    assert config_from_args(args).pid_file == Path.cwd() / "x.pid"
    # Offline commands validate the daemon's config while /run/glidefs is absent.
    p.write_text('pid_file = "/nonexistent-run-dir/glidefs.pid"\n')
    validate(load_file(p))



def test_snapshot_settings(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[snapshot]\nhook_timeout = "5s"\nmax_quiesce = "250ms"\n'
                 '[[volume]]\nname = "a"\nsize = "1G"\nsnapshot_every = "1h"\n'
                 'snapshot_prefix = "hourly-"\n')
    cfg = load_file(p)
    assert (cfg.snapshot.hook_timeout, cfg.snapshot.max_quiesce) == (5.0, 0.25)
    assert cfg.volumes[0].snapshot_every == 3600 and cfg.volumes[0].snapshot_prefix == "hourly-"
    for bad, why in (('[snapshot]\nhook_timeout = "0s"\n', "positive"),
                     ('[snapshot]\nfreeze = 1\n', "unknown keys in [snapshot]"),
                     ('[[volume]]\nname = "a"\nsize = "1G"\nsnapshot_prefix = "-x"\n',
                      "snapshot_prefix"),
                     ('[[volume]]\nname = "a"\nsize = "1G"\nsnapshot_every = "soon"\n',
                      "snapshot_every"),
                     ('[[volume]]\nname = "a"\nsize = "1G"\nublk_idd = 1\n', "unknown keys")):
        p.write_text(bad)
        with pytest.raises(ConfigError, match=re.escape(why)):
            load_file(p)


def test_example_replication_job_parses_when_uncommented(tmp_path: Path) -> None:
    """The commented [[replication]] example in deploy/glidefs.toml is a
    valid job once uncommented (its credentials file aside)."""
    example = Path(__file__).resolve().parents[2] / "deploy" / "glidefs.toml"
    text = example.read_text()
    block = text[text.index("# [[replication]]"):]
    creds = tmp_path / "offsite.credentials"
    creds.write_text("[offsite]\naws_access_key_id = a\naws_secret_access_key = b\n")
    uncommented = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    p = tmp_path / "c.toml"
    p.write_text(uncommented.replace("/etc/glidefs/offsite.credentials", str(creds)))
    (job,) = load_file(p).replication
    assert job.name == "offsite" and job.target.kind == "s3" and job.target.bucket == "backups"
    assert job.bandwidth == 50 << 20 and job.interval == 900 and job.watchdog == 300
    assert job.matches("db1") and not job.matches("vm1")
    assert job.credentials() == ("a", "b")
    assert [r.describe() for r in job.keep_source or []] == ["not_replicated",
                                                              "last_n 48 ^hourly-"]


def test_sequential_cutoff_from_file_and_flag(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[cache]\nsequential_cutoff = "16M"\n')
    assert load_file(f).sequential_cutoff == 16 << 20
    f.write_text('[cache]\nsequential_cutoff = "lots"\n')
    with pytest.raises(ConfigError, match="cache.sequential_cutoff"):
        load_file(f)
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    assert config_from_args(args).sequential_cutoff == 4 << 20  # the default
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path),
                                      "--sequential-cutoff", "0"])
    assert config_from_args(args).sequential_cutoff == 0  # cache everything


def test_sync_nice_from_file_and_flag(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[cache]\nsync_nice = 5\n")
    assert load_file(f).sync_nice == 5
    for bad in ("20", "-1", "true", '"high"'):
        f.write_text(f"[cache]\nsync_nice = {bad}\n")
        with pytest.raises(ConfigError, match="cache.sync_nice"):
            load_file(f)
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    assert config_from_args(args).sync_nice == 10  # the default
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--sync-nice", "0"])
    assert config_from_args(args).sync_nice == 0
