"""soma-worker flags, environment variables and validation (worker spec §2.1–§2.2, §9 items 1, 3, 4)."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import pytest

from soma.errors import SomaConfigError
from soma.hosts import is_loopback
from soma.worker.config import (
    WorkerConfig,
    advertise_address,
    build_parser,
    check_bind,
    config_from_args,
    embedded_config,
    parse_duration,
    parse_size,
    parse_tags,
    sanitize_worker_id,
    validate_worker_id,
)

GIB = 2**30

# --------------------------------------------------------------------------- sizes (item 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8G", 8 * GIB),
        ("8g", 8 * GIB),
        ("8GB", 8 * GIB),
        ("8GiB", 8 * GIB),
        ("8 gib", 8 * GIB),
        ("1.5G", 3 * GIB // 2),
        ("512M", 512 * 2**20),
        ("1T", 2**40),
        ("1048576", 1048576),
        ("100b", 100),
        ("2K", 2048),
        ("3kb", 3072),
        (" 4 KiB ", 4096),
        (".5M", 2**19),
        ("0", 0),
        (1048576, 1048576),
    ],
)
def test_parse_size_accepts_binary_units(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["lots", "", " ", "8X", "1e3", "-1", "8 G B", "G", "1.2.3", "8GiBs", -5, 1.5, True, None]
)
def test_parse_size_rejects_everything_else(text: object) -> None:
    with pytest.raises(SomaConfigError):
        parse_size(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["8G", "8g", "8GB", "8GiB", "1.5G", "512M", "1T", "1048576"])
def test_memory_flag_accepts_the_spec_sizes(value: str) -> None:
    assert config_from_args(["--memory", value], {}).memory == parse_size(value)


def test_memory_flag_rejects_words_with_a_one_line_reason() -> None:
    with pytest.raises(SomaConfigError) as info:
        config_from_args(["--memory", "lots"], {})
    message = str(info.value)
    assert "--memory" in message and "'lots'" in message and "\n" not in message


def test_memory_flag_rejects_zero() -> None:
    with pytest.raises(SomaConfigError, match="--memory"):
        config_from_args(["--memory", "0"], {})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 604800.0), ("90", 90.0), ("1.5h", 5400.0), ("2m", 120.0), ("1w", 604800.0), ("30 s", 30.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "7y", "-3", "", "1e2", float("inf"), -1])
def test_parse_duration_rejects_garbage(text: object) -> None:
    with pytest.raises(SomaConfigError):
        parse_duration(text)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- tags (item 3)


def test_tags_flags_give_cpu_then_extras_in_order() -> None:
    config = config_from_args(["--tags", "a, b", "--tags", "c,a"], {})
    assert parse_tags(config.tags, has_gpu=False) == ["cpu", "a", "b", "c"]
    assert parse_tags(config.tags, has_gpu=True) == ["gpu", "cpu", "a", "b", "c"]


def test_tags_flag_split_by_the_shell_still_works() -> None:
    # `--tags a, b --tags c,a` unquoted reaches argv as four words.
    config = config_from_args(["--tags", "a,", "b", "--tags", "c,a"], {})
    assert parse_tags(config.tags, has_gpu=False) == ["cpu", "a", "b", "c"]


def test_parse_tags_drops_empties_and_duplicates_of_automatic_tags() -> None:
    assert parse_tags(" ,cpu, x ,,gpu", has_gpu=True) == ["gpu", "cpu", "x"]
    assert parse_tags(None, has_gpu=False) == ["cpu"]


def test_parse_tags_rejects_non_strings() -> None:
    with pytest.raises(SomaConfigError):
        parse_tags(["a", 3], has_gpu=False)  # type: ignore[list-item]


# --------------------------------------------------------------------------- bind rule and tokens (item 4)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST", "::1", "[::1]", "::ffff:127.0.0.1"]
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.com", "128.0.0.1", ""])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_wildcard_host_without_token_is_refused() -> None:
    with pytest.raises(SomaConfigError, match=r"refusing to listen on 0\.0\.0\.0 without a token.*--insecure"):
        config_from_args(["--host", "0.0.0.0"], {})


def test_wildcard_host_with_insecure_is_allowed_and_flagged() -> None:
    config = config_from_args(["--host", "0.0.0.0", "--insecure"], {})
    assert config.host == "0.0.0.0"
    assert config.insecure_bind and not config.auth


def test_default_host_is_loopback_without_token_and_wildcard_with_one() -> None:
    assert config_from_args([], {}).host == "127.0.0.1"
    with_flag = config_from_args(["--token", "t" * 32], {})
    assert with_flag.host == "0.0.0.0" and with_flag.auth and not with_flag.insecure_bind
    assert config_from_args([], {"SOMA_TOKEN": "t" * 32}).host == "0.0.0.0"


def test_empty_soma_token_counts_as_unset() -> None:
    config = config_from_args([], {"SOMA_TOKEN": ""})
    assert config.token is None and config.host == "127.0.0.1"


def test_empty_token_flag_is_an_error() -> None:
    with pytest.raises(SomaConfigError, match="--token must not be empty"):
        config_from_args(["--token", ""], {})


def test_token_flag_wins_over_environment() -> None:
    assert config_from_args(["--token", "f" * 20], {"SOMA_TOKEN": "e" * 20}).token == "f" * 20


def test_short_token_is_flagged_weak() -> None:
    assert config_from_args(["--token", "short"], {}).weak_token
    assert not config_from_args(["--token", "x" * 16], {}).weak_token
    assert not config_from_args([], {}).weak_token


def test_repr_never_shows_tokens() -> None:
    config = config_from_args(["--token", "s3cret-token-value", "--coordinator-token", "other-secret-value"], {})
    text = repr(config)
    assert "s3cret" not in text and "other-secret" not in text and "token=***" in text


def test_embedded_bind_message_is_exact() -> None:
    with pytest.raises(SomaConfigError) as info:
        embedded_config(host="0.0.0.0")
    assert str(info.value) == "refusing to listen on 0.0.0.0 without a token; pass token=... or insecure=True"
    assert isinstance(info.value, ValueError)


def test_check_bind_accepts_token_insecure_or_loopback() -> None:
    check_bind("10.1.2.3", token="t" * 16, insecure=False)
    check_bind("10.1.2.3", token=None, insecure=True)
    check_bind("localhost", token=None, insecure=False)
    with pytest.raises(SomaConfigError, match="10.1.2.3"):
        check_bind("10.1.2.3", token=None, insecure=False, embedded=True)


# --------------------------------------------------------------------------- precedence


def test_coordinator_flag_beats_environment_which_beats_default() -> None:
    env = {"SOMA_COORDINATOR": "http://env-coord:9090"}
    assert config_from_args([], {}).coordinator is None
    assert config_from_args([], env).coordinator == "http://env-coord:9090"
    assert config_from_args(["--coordinator", "http://flag:9090/"], env).coordinator == "http://flag:9090"


def test_coordinator_token_defaults_to_token() -> None:
    token = "w" * 20
    assert config_from_args(["--token", token], {}).coordinator_token == token
    env = {"SOMA_COORDINATOR_TOKEN": "c" * 20}
    assert config_from_args(["--token", token], env).coordinator_token == "c" * 20
    assert config_from_args(["--token", token, "--coordinator-token", "f" * 20], env).coordinator_token == "f" * 20


def test_bad_coordinator_url_names_its_source() -> None:
    with pytest.raises(SomaConfigError, match="SOMA_COORDINATOR"):
        config_from_args([], {"SOMA_COORDINATOR": "not a url"})
    with pytest.raises(SomaConfigError, match="--coordinator"):
        config_from_args(["--coordinator", "ftp://x"], {})


def test_python_and_log_level_from_environment(tmp_path: Path) -> None:
    config = config_from_args([], {"SOMA_PYTHON": "/opt/py/bin/python3", "SOMA_LOG_LEVEL": "DEBUG"})
    assert config.python == "/opt/py/bin/python3"
    assert config.log_level == "debug" and config.logging_level == 10
    flagged = config_from_args(["--python", "/x/python", "--log-level", "error"], {"SOMA_PYTHON": "/y"})
    assert flagged.python == "/x/python" and flagged.log_level == "error"
    assert config_from_args([], {}).python == sys.executable


def test_bad_log_level_names_the_variable() -> None:
    with pytest.raises(SomaConfigError, match="SOMA_LOG_LEVEL"):
        config_from_args([], {"SOMA_LOG_LEVEL": "loud"})


def test_data_store_from_flag_or_environment_must_be_a_directory(tmp_path: Path) -> None:
    assert config_from_args([], {"SOMA_DATA_STORE": str(tmp_path)}).data_store == tmp_path
    with pytest.raises(SomaConfigError, match="--data-store"):
        config_from_args(["--data-store", str(tmp_path / "missing")], {"SOMA_DATA_STORE": str(tmp_path)})
    with pytest.raises(SomaConfigError, match="SOMA_DATA_STORE"):
        config_from_args([], {"SOMA_DATA_STORE": str(tmp_path / "missing")})


# --------------------------------------------------------------------------- defaults and flags


def test_defaults_match_the_flag_table() -> None:
    config = config_from_args([], {})
    assert (config.port, config.max_concurrent, config.timeout, config.log_level) == (8080, 4, 3600.0, "info")
    assert config.env_dir == Path("/tmp/soma-envs") and config.work_dir == Path("/tmp/soma-work")
    assert config.cpus is None and config.memory is None and config.gpus is None and config.tags == ()
    assert config.temp_dir == Path(tempfile.gettempdir()) / f"soma-worker-{config.worker_id}-8080"
    tuning = {
        "max_queue": 64,
        "queue_timeout": 600.0,
        "drain_timeout": 30.0,
        "heartbeat_interval": 10.0,
        "store_ttl": 3600.0,
        "store_sweep": 300.0,
        "store_max_bytes": None,
        "max_upload_bytes": 4 * GIB,
        "max_message_bytes": 256 * 2**20,
        "inline_threshold": 10 * 2**20,
        "cache_bytes": GIB,
        "cache_dir": None,
        "env_timeout": 900.0,
        "max_env_builds": 2,
        "env_max_count": 20,
        "env_max_age": 7 * 86400.0,
        "use_uv": True,
        "allow_python_download": False,
        "prewarm": 1,
        "child_idle_ttl": 300.0,
        "max_idle_children": None,
        "child_max_tasks": 100,
        "child_max_idle_rss": 2 * GIB,
        "child_memory": None,
        "child_rlimit_as": None,
        "child_start_timeout": 30.0,
    }
    assert {name: getattr(config, name) for name in tuning} == tuning


def test_tuning_flags_are_parsed() -> None:
    config = config_from_args(
        [
            "--store-ttl", "1", "--store-sweep", "1", "--store-max-bytes", "10M", "--env-max-age", "7d",
            "--max-upload-bytes", "1K", "--inline-threshold", "0", "--no-uv", "--allow-python-download",
            "--prewarm", "0", "--max-idle-children", "3", "--child-memory", "1G", "--cache-dir", "/tmp/c",
            "--queue-timeout", "5", "--max-queue", "0", "--drain-timeout", "0", "--timeout", "2m",
        ],
        {},
    )  # fmt: skip
    assert (config.store_ttl, config.store_sweep, config.store_max_bytes) == (1.0, 1.0, 10 * 2**20)
    assert config.env_max_age == 604800.0 and config.max_upload_bytes == 1024 and config.inline_threshold == 0
    assert not config.use_uv and config.allow_python_download
    assert (config.prewarm, config.max_idle_children, config.child_memory) == (0, 3, GIB)
    assert config.cache_dir == Path("/tmp/c") and config.queue_timeout == 5.0 and config.max_queue == 0
    assert config.drain_timeout == 0.0 and config.timeout == 120.0


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "70000"],
        ["--port", "-1"],
        ["--port", "http"],
        ["--cpus", "0"],
        ["--gpus", "-1"],
        ["--max-concurrent", "0"],
        ["--store-ttl", "0"],
        ["--timeout", "never"],
        ["--max-env-builds", "0"],
        ["--unknown-flag"],
        ["--advertise", "nope"],
        ["--env-dir", ""],
        ["--host", ""],
        ["--insecure", "extra-positional"],
    ],
)
def test_invalid_flags_raise_one_line_config_errors(argv: list[str]) -> None:
    with pytest.raises(SomaConfigError) as info:
        config_from_args(argv, {})
    assert str(info.value) and "\n" not in str(info.value)


def test_port_zero_leaves_the_temp_dir_to_startup() -> None:
    config = config_from_args(["--port", "0"], {})
    assert config.port == 0 and config.temp_dir is None
    assert config_from_args(["-p", "0", "--temp-dir", "/tmp/mine"], {}).temp_dir == Path("/tmp/mine")


def test_help_lists_the_title_and_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(["--help"], {})
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "Soma distributed execution worker" in text
    flags = """--port --host --cpus --memory --gpus --max-concurrent --tags --token --insecure --coordinator
        --coordinator-token --advertise --id --env-dir --work-dir --temp-dir --data-store --python --timeout
        --log-level --max-queue --queue-timeout --drain-timeout --heartbeat-interval --store-ttl --store-sweep
        --store-max-bytes --max-upload-bytes --max-message-bytes --inline-threshold --cache-bytes --cache-dir
        --env-timeout --max-env-builds --env-max-count --env-max-age --no-uv --allow-python-download --prewarm
        --child-idle-ttl --max-idle-children --child-max-tasks --child-max-idle-rss --child-memory
        --child-rlimit-as --child-start-timeout --version""".split()
    missing = [flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", text)]
    assert missing == []
    assert build_parser().prog == "soma-worker"


def test_version_flag_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(["--version"], {})
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("soma-worker ")


# --------------------------------------------------------------------------- worker id


def test_worker_id_flag_is_validated() -> None:
    assert config_from_args(["--id", "w1"], {}).worker_id == "w1"
    for bad in ("", "has space", "x" * 65, "tab\t", "ü"):
        with pytest.raises(SomaConfigError, match="invalid worker id"):
            config_from_args(["--id", bad], {})


def test_sanitize_worker_id() -> None:
    assert sanitize_worker_id("my host!.local") == "my-host-.local"
    assert sanitize_worker_id("h" * 80) == "h" * 64
    assert sanitize_worker_id("", pid=42) == "worker-42"
    assert validate_worker_id(sanitize_worker_id()) == sanitize_worker_id()


def test_default_worker_id_is_the_sanitised_host_name() -> None:
    import socket

    assert config_from_args([], {}).worker_id == sanitize_worker_id(socket.gethostname())


# --------------------------------------------------------------------------- embedded Worker arguments


def test_embedded_config_accepts_sizes_and_tag_strings() -> None:
    config = embedded_config(memory="1.5G", tags="a, b,a", cpus=2, gpus=0, max_concurrent=2, worker_id="w2")
    assert config.memory == 3 * GIB // 2 and config.tags == ("a", "b")
    assert (config.cpus, config.gpus, config.max_concurrent, config.worker_id) == (2, 0, 2, "w2")
    assert config.host == "127.0.0.1" and config.python == sys.executable
    assert embedded_config(memory=1024).memory == 1024
    assert embedded_config(tags=["x", "y,z"]).tags == ("x", "y", "z")


def test_embedded_config_with_token_may_listen_anywhere() -> None:
    config = embedded_config(host="0.0.0.0", token="abc")
    assert config.auth and config.coordinator_token == "abc" and config.weak_token


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory": "lots"},
        {"memory": 1.5},
        {"port": 65536},
        {"port": -1},
        {"port": True},
        {"port": "8080"},
        {"max_concurrent": 0},
        {"cpus": "2"},
        {"worker_id": "bad id"},
        {"token": ""},
        {"log_level": "chatty"},
        {"timeout": 0},
        {"coordinator": "nowhere"},
        {"host": "0.0.0.0", "insecure": False},
    ],
)
def test_embedded_config_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(SomaConfigError):
        embedded_config(**kwargs)  # type: ignore[arg-type]


def test_embedded_config_ignores_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOMA_TOKEN", "from-the-environment-token")
    monkeypatch.setenv("SOMA_PYTHON", "/elsewhere/python")
    config = embedded_config()
    assert config.token is None and config.python == sys.executable


def test_worker_config_is_immutable() -> None:
    config = embedded_config()
    assert isinstance(config, WorkerConfig)
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- advertise


def test_advertise_address_never_uses_a_wildcard() -> None:
    assert advertise_address("10.1.2.3", 8080) == "ws://10.1.2.3:8080"
    assert advertise_address("::1", 81) == "ws://[::1]:81"
    wildcard = advertise_address("0.0.0.0", 9000)
    assert re.fullmatch(r"ws://[0-9.]+:9000", wildcard) and "0.0.0.0" not in wildcard
