"""syncd.config: layering, validation messages and path resolution."""

from pathlib import Path

import pytest

from syncd.config import Settings, load_config, resolve_sqlite_uri
from syncd.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run every test from an empty folder, away from the config files."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_defaults(tmp_path: Path) -> None:
    settings = load_config(env={})
    cwd = tmp_path / "cwd"
    assert settings.tracking_uri == f"sqlite:///{cwd}/mlflow.db"
    assert settings.state_dir == cwd / ".syncd"
    assert settings.ledger_url is None
    assert settings.ledger_url_resolved == f"sqlite:///{cwd}/.syncd/ledger.db"
    assert settings.health_addr == "127.0.0.1:9464"
    assert settings.health_endpoint == ("127.0.0.1", 9464)
    assert settings.roots == []
    assert (settings.watch.mode, settings.watch.rescan_interval) == ("auto", 60)
    assert settings.watch.poll_interval == 2
    assert settings.writer.linger_ms == 150
    assert settings.writer.max_backlog_events == 100_000
    assert settings.writer.drain_timeout == 10
    assert settings.timeouts.http == 30
    assert (settings.log.format, settings.log.level) == ("auto", "info")


def test_yaml_values(tmp_path: Path) -> None:
    config = write(
        tmp_path / "etc" / "config.yaml",
        """
tracking_uri: http://mlflow.internal:5000
state_dir: /var/lib/syncd
ledger_url: postgresql+psycopg://syncd@db/syncd
health_addr: "[::1]:9000"
roots:
  - path: /data/runs
    experiment: vision
  - path: s3://bucket/runs
    pattern: "*/run_record.jsonl"
  - /scratch/runs        # shorthand for {path: ...}
watch: {mode: polling, poll_interval: 0.5}
writer: {linger_ms: 0}
log: {format: json, level: DEBUG}
""",
    )
    settings = load_config(config, env={})
    assert settings.tracking_uri == "http://mlflow.internal:5000"
    assert settings.state_dir == Path("/var/lib/syncd")
    assert settings.ledger_url_resolved == "postgresql+psycopg://syncd@db/syncd"
    assert settings.health_endpoint == ("::1", 9000)
    assert [root.path for root in settings.roots] == [
        "/data/runs",
        "s3://bucket/runs",
        "/scratch/runs",
    ]
    assert settings.roots[0].experiment == "vision"
    assert settings.roots[1].pattern == "*/run_record.jsonl"
    assert settings.roots[2].pattern == "**/run_record.jsonl"
    assert (settings.watch.mode, settings.watch.poll_interval) == ("polling", 0.5)
    assert settings.watch.rescan_interval == 60  # untouched keys keep their default
    assert settings.writer.linger_ms == 0
    assert (settings.log.format, settings.log.level) == ("json", "debug")


def test_env_beats_yaml_and_overrides_beat_env(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.yaml",
        "watch: {mode: inotify, rescan_interval: 5}\nlog: {level: warning}\n",
    )
    env = {"SYNCD_WATCH__MODE": "polling", "SYNCD_LOG__LEVEL": "error"}
    settings = load_config(config, env=env)
    assert settings.watch.mode == "polling"  # env beats the file...
    assert settings.watch.rescan_interval == 5  # ...key by key, not section by section
    assert settings.log.level == "error"

    settings = load_config(
        config, overrides={"watch.mode": "auto", "log": {"level": "debug"}}, env=env
    )
    assert settings.watch.mode == "auto"
    assert settings.log.level == "debug"
    assert settings.watch.rescan_interval == 5


def test_env_argument_replaces_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCD_LOG__LEVEL", "debug")
    assert load_config().log.level == "debug"  # env=None: os.environ
    assert load_config(env={}).log.level == "info"  # an explicit mapping is all there is


def test_none_override_means_not_given() -> None:
    env = {"SYNCD_HEALTH_ADDR": "0.0.0.0:9100"}
    settings = load_config(overrides={"health_addr": None}, env=env)
    assert settings.health_addr == "0.0.0.0:9100"


def test_mlflow_tracking_uri_fallback(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert load_config(env=env).tracking_uri == "http://mlflow:5000"

    config = write(tmp_path / "config.yaml", "tracking_uri: http://from-file:5000\n")
    assert load_config(config, env=env).tracking_uri == "http://from-file:5000"

    env["SYNCD_TRACKING_URI"] = "http://from-syncd-env:5000"
    assert load_config(env=env).tracking_uri == "http://from-syncd-env:5000"
    flags = {"tracking_uri": "http://from-flag:5000"}
    assert load_config(overrides=flags, env=env).tracking_uri == "http://from-flag:5000"


def test_state_dir_from_env() -> None:
    settings = load_config(env={"SYNCD_STATE_DIR": "/var/lib/syncd"})
    assert settings.state_dir == Path("/var/lib/syncd")
    assert settings.ledger_url_resolved == "sqlite:////var/lib/syncd/ledger.db"


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yaml", "roots: []\nwach:\n  mode: polling\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, env={})
    message = str(info.value)
    assert "unknown key 'wach'" in message
    assert str(config) in message
    assert "line 2" in message


def test_unknown_nested_key_is_dotted(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yaml", "watch:\n  mdoe: polling\n")
    with pytest.raises(ConfigError, match=r"unknown key 'watch\.mdoe'"):
        load_config(config, env={})


def test_bad_enum_names_dotted_key_and_value(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yaml", "watch:\n  mode: fast\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, env={})
    message = str(info.value)
    assert message.startswith("watch.mode: Input should be 'auto', 'inotify' or 'polling'")
    assert "'fast'" in message
    assert str(config) in message


def test_bad_value_from_env_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"SYNCD_WRITER__LINGER_MS": "9000"})
    assert "writer.linger_ms" in str(info.value)
    assert "SYNCD_WRITER__LINGER_MS" in str(info.value)


def test_bad_root_in_env_json() -> None:
    with pytest.raises(ConfigError, match="SYNCD_ROOTS"):
        load_config(env={"SYNCD_ROOTS": "[not json"})
    with pytest.raises(ConfigError, match=r"roots\[0\]\.path"):
        load_config(env={"SYNCD_ROOTS": '[{"path": "gs://bucket/runs"}]'})


@pytest.mark.parametrize(
    "addr", ["localhost", "127.0.0.1:0", "127.0.0.1:65536", "host:http", "::1:80", ":9464"]
)
def test_bad_health_addr(addr: str) -> None:
    with pytest.raises(ConfigError, match="health_addr"):
        load_config(overrides={"health_addr": addr}, env={})


@pytest.mark.parametrize("addr", ["", "off", "OFF"])
def test_health_addr_can_be_disabled(addr: str) -> None:
    assert load_config(overrides={"health_addr": addr}, env={}).health_endpoint is None


def test_relative_paths_in_file_resolve_against_its_folder(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    config = write(
        etc / "config.yaml",
        """
tracking_uri: sqlite:///db/mlflow.db
state_dir: state
ledger_url: sqlite:///ledger.db?timeout=5
roots: [runs, {path: ../data/runs}, s3://bucket/prefix]
""",
    )
    settings = load_config(config, env={})  # cwd is tmp_path/"cwd" (autouse fixture)
    assert settings.tracking_uri == f"sqlite:///{etc}/db/mlflow.db"
    assert settings.state_dir == etc / "state"
    assert settings.ledger_url == f"sqlite:///{etc}/ledger.db?timeout=5"
    assert [root.path for root in settings.roots] == [
        str(etc / "runs"),
        str(tmp_path / "data" / "runs"),
        "s3://bucket/prefix",
    ]


def test_relative_paths_from_env_and_flags_resolve_against_cwd(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    config = write(tmp_path / "etc" / "config.yaml", "state_dir: state\n")
    settings = load_config(
        config,
        overrides={"tracking_uri": "sqlite:///flag.db"},
        env={"SYNCD_STATE_DIR": "env-state"},
    )
    assert settings.state_dir == cwd / "env-state"
    assert settings.tracking_uri == f"sqlite:///{cwd}/flag.db"


def test_resolve_sqlite_uri() -> None:
    base = Path("/srv/syncd")
    assert resolve_sqlite_uri("sqlite:///a/b.db", base) == "sqlite:////srv/syncd/a/b.db"
    assert resolve_sqlite_uri("sqlite:////abs/b.db", base) == "sqlite:////abs/b.db"
    assert resolve_sqlite_uri("sqlite:///:memory:", base) == "sqlite:///:memory:"
    assert resolve_sqlite_uri("http://host/x.db", base) == "http://host/x.db"
    assert resolve_sqlite_uri("sqlite+pysqlite:///x.db", base) == (
        "sqlite+pysqlite:////srv/syncd/x.db"
    )


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yaml", "watch:\n  mode: polling\n   bad: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, env={})
    message = str(info.value)
    assert str(config) in message
    assert "line 3" in message


def test_missing_or_non_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", env={})
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- a\n- b\n"), env={})


def test_empty_file_and_null_sections_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "empty.yaml", ""), env={}).watch.mode == "auto"
    config = write(tmp_path / "nulls.yaml", "tracking_uri: null\nwatch:\nlog: {level: null}\n")
    settings = load_config(config, env={"MLFLOW_TRACKING_URI": "http://m:5000"})
    assert settings.tracking_uri == "http://m:5000"
    assert settings.log.level == "info"


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yaml", "watch: {mode: fast}\ntimeouts: {http: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, env={})
    assert "watch.mode" in str(info.value)
    assert "timeouts.http" in str(info.value)


def test_settings_is_the_returned_type() -> None:
    assert isinstance(load_config(env={}), Settings)
