"""vitok.consumers.vllm_client: requests that hit vLLM's encoder cache, built from a vllm-ec export or from the store
it was exported from; checked against the export's own files and, where vLLM imports, against vLLM's hashing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from helpers import make_folder, photo

import vitok
from vitok.consumers.export import export
from vitok.consumers.vllm_client import IMAGE_PAD, VllmCache

PROMPT = f"<|im_start|>user\n<|vision_start|>{IMAGE_PAD}<|vision_end|>Describe it.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A store of five images (one a copy of another, one named with a byte that is not UTF-8), exported by key and
    by content."""
    root = tmp_path_factory.mktemp("vllm")
    folder = make_folder(root / "imgs", count=4, with_odd=False)
    (folder / "copy.png").write_bytes((folder / "a" / "img01.png").read_bytes())
    photo(folder / "x.png", seed=9)
    try:
        os.rename(os.fsencode(folder / "x.png"), os.fsencode(folder) + b"/caf\xe9.png")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    vitok.extract([str(folder)], root / "out", model="qwen3-vl-tiny", workers=0, features=["merged", "deepstack"])
    export(root / "out", root / "ec", "vllm-ec")
    export(root / "out", root / "ec-content", "vllm-ec", key="content")
    return root


def test_the_store_and_its_export_name_every_image_alike(exported):
    for mode, dest in (("store", "ec"), ("content", "ec-content")):
        from_export = VllmCache.from_export(exported / dest)
        from_store = VllmCache.from_store(exported / "out", key=mode)
        assert from_export.entries == from_store.entries and len(from_export) == 6
        for entry in from_export.entries.values():
            assert (exported / dest / entry.uuid / "encoder_cache.safetensors").exists()  # the connector's hit test
            t, h, w = entry.image_grid_thw
            assert entry.tokens == t * h * w // 4
    by_key, by_content = VllmCache.from_export(exported / "ec"), VllmCache.from_export(exported / "ec-content")
    assert by_key["copy.png"].uuid != by_key["a/img01.png"].uuid
    assert by_content["copy.png"].uuid == by_content["a/img01.png"].uuid  # equal pixels, one entry
    assert by_key[b"caf\xe9.png"] == by_key["caf\udce9.png"]  # exact bytes or the surrogate-escaped name


def test_a_grid_only_request_carries_uuids_and_grids_and_nothing_vllm_would_hash(exported):
    import torch

    cache = VllmCache.from_export(exported / "ec")
    keys = ["a/img01.png", "caf\udce9.png"]
    request = cache.request(PROMPT + PROMPT, keys)
    assert set(request) == {"prompt", "multi_modal_data", "multi_modal_uuids"}  # no mm_processor/media_io kwargs
    assert request["multi_modal_uuids"] == {"image": [cache[k].uuid for k in keys]}
    grid = request["multi_modal_data"]["image"]["image_grid_thw"]
    assert list(request["multi_modal_data"]["image"]) == ["image_grid_thw"]  # no pixels, no embeddings
    assert grid.dtype == torch.long and grid.tolist() == [list(cache[k].image_grid_thw) for k in keys]
    lines = {row["uuid"]: row for row in map(json.loads, (exported / "ec" / "uuids.jsonl").read_text().splitlines())}
    assert all(lines[cache[k].uuid]["image_grid_thw"] == [list(cache[k].image_grid_thw)] for k in keys)
    with_pixels = cache.request(PROMPT, ["a/img01.png"], images=["<the image>"])
    assert with_pixels["multi_modal_data"] == {"image": ["<the image>"]}
    tokens = cache.request([1, 2, 3], ["a/img01.png"])
    assert tokens["prompt_token_ids"] == [1, 2, 3] and "prompt" not in tokens
    with pytest.raises(ValueError, match="placeholder"):
        cache.request(PROMPT, keys)  # one placeholder for two images
    with pytest.raises(KeyError, match="nosuch"):
        cache.request(PROMPT, ["nosuch.png"])
    assert cache.chat_part("a/img01.png", "https://example/x.png") == {
        "type": "image_url", "image_url": {"url": "https://example/x.png"}, "uuid": cache["a/img01.png"].uuid}


def test_images_left_out_of_the_export_are_left_out_of_the_store_view(exported, tmp_path):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(exported / "out", copy)
    sidecar = next((copy / "shards").glob("*.json"))
    data = json.loads(sidecar.read_text())
    bad = next(r for r in data["records"] if r["status"] == "ok")
    bad["nonfinite"] = 3
    sidecar.write_text(json.dumps(data))
    export(copy, tmp_path / "ec", "vllm-ec")
    assert VllmCache.from_store(copy).entries == VllmCache.from_export(tmp_path / "ec").entries
    assert bad["key"] not in VllmCache.from_store(copy)


def test_reading_an_export_imports_no_torch(exported):
    code = ("import sys; from vitok.consumers.vllm_client import VllmCache; c = VllmCache.from_export(sys.argv[1]); "
            "c.chat_part(c.keys()[0], 'u'); assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code, str(exported / "ec")], capture_output=True, text=True,
                            timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


def test_vllm_hashes_the_request_to_the_entry_names(exported):
    pytest.importorskip("vllm", reason="vLLM is not installed: its hashing code cannot be run here")
    from vllm.model_executor.models.qwen3_vl import Qwen3VLMultiModalDataParser
    from vllm.multimodal.parse import parse_mm_uuids
    from vllm.multimodal.processing.inputs import ProcessorInputs

    cache = VllmCache.from_export(exported / "ec")
    keys = ["a/img01.png", "caf\udce9.png"]
    request = cache.request(PROMPT + PROMPT, keys)
    parser = Qwen3VLMultiModalDataParser(2, video_needs_metadata=True, allow_missing_mm_embeddings=True)  # a consumer
    items = parser.parse_mm_data(request["multi_modal_data"])
    uuids = parse_mm_uuids(request["multi_modal_uuids"])
    model = "Qwen/Qwen3-VL-2B-Instruct"
    hashes = ProcessorInputs([0], items, uuids).get_mm_hashes(model, "blake3")
    assert hashes["image"] == [cache[k].uuid for k in keys]  # the uuids, verbatim: every entry is found
    kwargs = {"images_kwargs": {"max_pixels": 65536}}  # what a per-request processor kwarg does: every one misses
    missed = ProcessorInputs([0], items, uuids, hf_processor_mm_kwargs=kwargs).get_mm_hashes(model, "blake3")
    assert not set(missed["image"]) & set(hashes["image"])
