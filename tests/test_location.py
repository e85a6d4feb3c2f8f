"""A store's location: a URL vitok cannot serve is refused with one line (exit 2), never taken for a local path."""

from __future__ import annotations

import os

import pytest
from helpers import TINY, make_folder, vitok

from vitok.bench.store import synthetic_store

UNSERVED = ["gs://bucket/feats", "hf://datasets/x/feats", "http://example.com/feats"]


def _nothing_local(cwd) -> None:
    """No folder named after a URL's scheme was made (``Path('gs://b/f')`` is the relative folder ``gs:/b/f``)."""
    assert not [p for p in os.listdir(cwd) if p.endswith(":")], os.listdir(cwd)


def _one_line_refusal(result, url: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitok: error: ") and url in lines[0], result.stderr


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "store"
    out.mkdir()
    synthetic_store(out, 4, 1, 8)
    return out


@pytest.mark.parametrize("url", UNSERVED)
def test_extract_and_plan_refuse_a_url_they_cannot_serve(tmp_path, url):
    imgs = make_folder(tmp_path / "imgs", 2, with_odd=False)
    for command in (["extract", str(imgs), "-o", url, *TINY], ["plan", str(imgs), "-o", url]):
        _one_line_refusal(vitok(*command, cwd=tmp_path), url)
    _nothing_local(tmp_path)


@pytest.mark.parametrize("url", UNSERVED[:1])
def test_read_commands_refuse_a_url_they_cannot_serve(tmp_path, local_store, url):
    for command in (["info", url], ["verify", url], ["export", url, str(tmp_path / "dest")],
                    ["export", str(local_store), url, "--pool", "mean"], ["viz", url, "somekey"],
                    ["extract", str(tmp_path), "-o", str(tmp_path / "out"), "--reuse", url, *TINY]):
        _one_line_refusal(vitok(*command, cwd=tmp_path), url)
    _nothing_local(tmp_path)
    assert not (tmp_path / "out").exists()


def test_the_library_refuses_a_url_it_cannot_serve(tmp_path, monkeypatch):
    import vitok
    from vitok.errors import UsageError

    monkeypatch.chdir(tmp_path)
    for call in (lambda: vitok.open("gs://bucket/feats"), lambda: vitok.verify("gs://bucket/feats"),
                 lambda: vitok.extract([str(tmp_path)], "gs://bucket/feats", model="qwen3-vl-tiny")):
        with pytest.raises(UsageError, match="gs://bucket/feats"):
            call()
    _nothing_local(tmp_path)


def test_a_file_url_is_a_local_folder(tmp_path, local_store):
    result = vitok("info", local_store.as_uri(), "--json", check=True)
    assert '"images_ok": 4' in result.stdout


@pytest.mark.parametrize("url", ["s3://bucket/picture.png", *UNSERVED[:1]])
def test_viz_refuses_a_url_for_its_picture(tmp_path, local_store, url):
    """``viz -o`` writes a local file only: a URL was written as the relative folder ``s3:/bucket/picture.png``."""
    result = vitok("viz", str(local_store), "anykey", "-o", url, cwd=tmp_path)
    _one_line_refusal(result, url)
    _nothing_local(tmp_path)


def test_viz_of_a_key_not_in_the_store_is_one_line(tmp_path, local_store):
    result = vitok("viz", str(local_store), "no/such.png", "-o", str(tmp_path / "p.png"), cwd=tmp_path)
    _one_line_refusal(result, "no/such.png")
    assert not (tmp_path / "p.png").exists()
