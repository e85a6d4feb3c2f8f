"""Joining a Ray cluster (--engine ray): an address that cannot name one is a usage error before anything starts,
an address where no cluster answers is given up within --connect-timeout, and each failure is one line naming the
address and the fix. Addresses are on loopback, at free ports; every real run is bounded so that a hang fails."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from helpers import in_process, png_folder

pytest.importorskip("ray")

BOUND = 90  # seconds: a run past this hangs (what an address where nothing listens did)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**changes: str) -> dict[str, str]:
    """This process's environment without the Ray settings a developer may have (address, token), plus changes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    return env | {"PYTHONPATH": str(ROOT)} | changes


def extract(tmp_path, *flags: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``vitok extract`` of one image with --engine ray as a real process (Ray's native code runs in it)."""
    sources = tmp_path / "imgs" if (tmp_path / "imgs").exists() else png_folder(tmp_path / "imgs", 1)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "vitok", "extract", str(sources), "-o", str(tmp_path / "out"),
                             "--model", "qwen3-vl-tiny", "--engine", "ray", *flags], capture_output=True, text=True,
                            env=env or clean_env(RAY_AUTH_MODE="disabled"), timeout=BOUND)
    return result, time.perf_counter() - started


@pytest.fixture
def no_connection(monkeypatch):
    """In this process, an attempt to join or start Ray fails the test at once instead of waiting."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError(f"ray.init was called ({args}, {kwargs}): the error should have come first")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")


def cli(tmp_path, *flags: str, env: dict | None = None):
    """``vitok extract`` with --engine ray in this process (see ``no_connection``)."""
    return in_process("extract", str(tmp_path), "-o", str(tmp_path / "out"), "--engine", "ray", *flags, env=env)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run's last line, checked to be vitok's own one-line error (no internal error, no traceback)."""
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("vitok: error: "), result.stderr
    return line


@pytest.mark.parametrize("address, says", [
    ("", "names no Ray cluster"),
    ("127.0.0.1:notaport", "port 'notaport' is not a number"),
    ("127.0.0.1", "needs a port"),
    ("127.0.0.1:0", "port 0 is not in 1..65535"),
    ("127.0.0.1:70000", "port 70000 is not in 1..65535"),
    ("http://127.0.0.1:8265", "the dashboard"),
    ("ray://", "needs a host and a port"),
])
def test_an_address_that_cannot_name_a_cluster_is_a_usage_error_before_anything_starts(tmp_path, no_connection,
                                                                                       address, says):
    import ray

    result = cli(tmp_path, "--address", address)
    line = one_error_line(result)
    assert result.returncode == 2 and f"--address {address!r}" in line and says in line, result.stderr
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_a_bad_ray_address_variable_is_named_as_such(tmp_path, no_connection):
    import ray

    result = cli(tmp_path, env={"RAY_ADDRESS": "127.0.0.1:notaport"})
    line = one_error_line(result)
    assert result.returncode == 2 and "RAY_ADDRESS '127.0.0.1:notaport'" in line and "not a number" in line
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


@pytest.mark.skipif(importlib.util.find_spec("grpc") is not None, reason="the Ray Client extra is installed")
def test_a_ray_client_address_without_the_client_extra_names_the_package(tmp_path, no_connection):
    result = cli(tmp_path, "--address", f"ray://127.0.0.1:{free_port()}")
    line = one_error_line(result)
    assert result.returncode == 2 and "pip install 'ray[client]'" in line and "ray://127.0.0.1:" in line


def test_auto_without_a_cluster_on_this_node_says_how_to_start_one(tmp_path, no_connection, monkeypatch):
    """No cluster started here (the machine may run other people's: Ray's search is told it found none)."""
    import ray._private.services as services

    monkeypatch.setattr(services, "find_gcs_addresses", lambda: set())
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    result = cli(tmp_path, "--address", "auto")
    line = one_error_line(result)
    assert result.returncode == 1 and "no Ray cluster found for --address auto" in line and "ray start --head" in line
    assert not (tmp_path / "out").exists()


def test_an_address_where_nothing_listens_is_given_up_at_once(tmp_path):
    port = free_port()
    result, seconds = extract(tmp_path, "--address", f"127.0.0.1:{port}")
    line = one_error_line(result)
    assert result.returncode == 1, result.stderr
    assert line.startswith(f"vitok: error: no Ray cluster at 127.0.0.1:{port} (") and "ray start --head" in line
    assert "connection refused, nothing listens there" in line
    assert not (tmp_path / "out").exists()
    assert seconds < 30, f"{seconds:.0f} s to give up on a refused connection"


@pytest.mark.slow  # the timeout itself, and a process of its own
def test_a_listener_that_is_not_a_ray_cluster_is_given_up_after_the_connect_timeout(tmp_path):
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never says a word
        listener.bind(("", 0))  # every interface: Ray dials a loopback address as this node's own address
        listener.listen(8)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        result, seconds = extract(tmp_path, "--address", address, "--connect-timeout", "2")
    line = one_error_line(result)
    assert result.returncode == 1 and f"no Ray cluster at {address}" in line and "within 2 s" in line, result.stderr
    assert "--connect-timeout" in line and not (tmp_path / "out").exists()
    assert seconds < 30, f"{seconds:.0f} s with --connect-timeout 2"


def test_token_authentication_without_a_token_is_a_usage_error(tmp_path):
    home = tmp_path / "home"
    home.mkdir()  # no ~/.ray/auth_token there
    env = clean_env(RAY_AUTH_MODE="token", HOME=str(home))
    result, _ = extract(tmp_path, "--address", f"127.0.0.1:{free_port()}", env=env)
    line = one_error_line(result)
    assert result.returncode == 2 and "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN" in line, result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_token_mode_is_a_usage_error(tmp_path, no_connection):
    result = cli(tmp_path, "--address", f"127.0.0.1:{free_port()}", env={"RAY_AUTH_MODE": "tokens"})
    line = one_error_line(result)
    assert result.returncode == 2 and "RAY_AUTH_MODE 'tokens'" in line and "disabled, token" in line


def test_the_connect_timeout_needs_the_ray_engine():
    from vitok.errors import UsageError
    from vitok.run.options import make_options

    with pytest.raises(UsageError, match="--connect-timeout .* needs --engine ray"):
        make_options(connect_timeout=5)
    assert make_options(engine="ray", connect_timeout=5).connect_timeout == 5
