"""Stored tokens flowing into what consumes them: a Qwen3-VL language model trained on cached features (the vision
tower never runs), vLLM's precomputed embeddings, bulk reads, retrieval exports, webdataset sidecars, pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import rel_error
from helpers import make_folder, photo

import vitok
from vitok.bench.train import END, IMAGE, START


def tiny_qwen3_vl(seed: int = 0):
    from vitok.bench.train import tiny_qwen3_vl as build

    return build(seed)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A tiny full Qwen3-VL model saved as a checkpoint, and a store of three images made with its own tower."""
    from transformers import Qwen2VLImageProcessor

    root = tmp_path_factory.mktemp("cache")
    model = tiny_qwen3_vl()
    model.save_pretrained(root / "model")
    processor = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3, size={"shortest_edge": 4096, "longest_edge": 96 * 96})
    processor.save_pretrained(root / "model")
    for i, size in enumerate([(64, 64), (96, 64), (64, 96)]):
        photo(root / "imgs" / f"{i}.png", size=size, seed=i)
    vitok.extract([str(root / "imgs")], root / "store", model=str(root / "model"), features=["merged", "deepstack"],
                  store_dtype="float32", workers=0)
    return model, processor, root


def assert_cached_step_equals(model, batch, reference) -> None:
    """The model on the collator's ``batch`` (the vision tower made to fail if it runs) gives the logits, loss and
    language-model gradients of ``reference``, the step on pixels just taken (its gradients still on the model)."""
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if "language_model" in n}

    def no_tower(*args, **kwargs):
        raise AssertionError("the vision tower ran")

    model.zero_grad()
    model.model.visual.forward = no_tower
    try:
        cached_out = model(**batch)
        cached_out.loss.backward()
    finally:
        del model.model.visual.forward
    assert rel_error(cached_out.logits, reference.logits) <= 1e-5
    assert abs(cached_out.loss.item() - reference.loss.item()) <= 1e-5 * abs(reference.loss.item())
    for name, grad in expected.items():
        assert rel_error(dict(model.named_parameters())[name].grad, grad) <= 1e-4, name


def test_language_model_on_cached_features_equals_the_model_on_pixels(cached):
    from PIL import Image

    from vitok.integrations.transformers import CachedImagesCollator

    model, processor, root = cached
    store = vitok.open(root / "store")
    samples = [
        {"input_ids": [5, 6, START, IMAGE, END, 7, 8, 9], "images": ["0.png"], "labels": [5, 6, 0, 0, 0, 7, 8, 9]},
        {"input_ids": [10, START, IMAGE, END, 11, START, IMAGE, END, 12], "images": ["1.png", "2.png"],
         "labels": [10, 0, 0, 0, 11, 0, 0, 0, 12]},
    ]
    batch = CachedImagesCollator(store, model.config, pad_token_id=0)(samples)
    images = [Image.open(root / "imgs" / key).convert("RGB") for s in samples for key in s["images"]]
    pixels = processor(images=images, return_tensors="pt")
    assert torch.equal(pixels["image_grid_thw"], batch["image_grid_thw"])
    text = {k: v for k, v in batch.items() if k != "mm_encoder_outputs"}

    model.zero_grad()
    reference = model(**text, pixel_values=pixels["pixel_values"])
    reference.loss.backward()
    assert_cached_step_equals(model, batch, reference)


def test_vllm_image_embeds_layout(cached):
    model, _, root = cached
    store = vitok.open(root / "store")
    embeds, grid = store.image_embeds("1.png")
    merged, deepstack = store.get("1.png", "merged"), store.get("1.png", "deepstack")
    assert embeds.shape == (merged.shape[0], 48 * 3) and grid.tolist() == [store.info("1.png")["grid"]]
    assert torch.equal(embeds[:, :48], torch.from_numpy(merged))  # the merger first, then level 0, 1, ...
    assert torch.equal(embeds[:, 96:], torch.from_numpy(deepstack[1]))
    assert embeds.shape[0] == int(np.prod(grid[0].tolist())) // 4
    assert store.image_embeds("0.png", dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_image_embeds_names_what_is_missing(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=2, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0)
    store = vitok.open(tmp_path / "out")
    with pytest.raises(KeyError, match="lacks deepstack"):
        store.image_embeds(store.keys()[0])


@pytest.mark.slow
def test_bulk_reads_equal_key_by_key_reads(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=9, with_odd=False)
    for fmt in ("hdf5", "npy"):
        tokens = tmp_path / f"tokens-{fmt}"
        vitok.extract([str(folder)], tokens, model="qwen3-vl-tiny", workers=0, shard_size=4, format=fmt)
        store = vitok.open(tokens)
        seen = []
        for keys, data, offsets in store.iter_shards():
            for i, key in enumerate(keys):
                np.testing.assert_array_equal(data[offsets[i]:offsets[i + 1]], store[key])
            seen += keys
        assert sorted(seen) == store.keys()
        pooled = tmp_path / f"pooled-{fmt}"
        vitok.extract([str(folder)], pooled, model="qwen3-vl-tiny", workers=0, shard_size=100, format=fmt, pool="mean")
        keys, array = vitok.open(pooled).array()
        assert array.shape == (9, 96)
        np.testing.assert_array_equal(array[3], vitok.open(pooled)[keys[3]][0])
    raw_keys, raw = vitok.open(tmp_path / "pooled-npy").array(dtype=None)
    assert isinstance(raw, np.memmap) and raw.dtype == np.float16  # one NPY shard: memory-mapped, no copy


def test_pack_tokens_collates_ragged_tokens_with_cu_seqlens(tmp_path):
    from vitok.storage.store import pack_tokens

    folder = make_folder(tmp_path / "imgs", count=4, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0)
    dataset = vitok.open(tmp_path / "out").torch_dataset()
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=pack_tokens)
    keys, tokens, cu = next(iter(loader))
    sizes = [dataset[i][1].shape[0] for i in range(3)]
    assert cu.tolist() == [0, *np.cumsum(sizes).tolist()] and cu.dtype == torch.int32
    assert tokens.shape == (sum(sizes), 96) and keys == [dataset[i][0] for i in range(3)]


def test_block_n_equals_the_reference_hidden_state(reference_pair):
    reference, _, ours = reference_pair
    grids = [(1, 6, 8), (1, 4, 4)]
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), ours.config.patch_dim)
    with torch.no_grad():
        states = reference(pixels, torch.tensor(grids), output_hidden_states=True).hidden_states
        got = ours(pixels, grids, features=("block:0", "block:-2", "patch")).features
    assert rel_error(got["block:0"], states[1]) <= 1e-5  # hidden_states[0] is the input of block 0
    assert rel_error(got["block:1"], states[2]) <= 1e-5 and rel_error(got["patch"], states[-1]) <= 1e-5


def test_block_features_through_extract(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    summary = vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0,
                            features=["block:-1", "patch"], store_dtype="float32")
    store = vitok.open(tmp_path / "out")
    assert store.features == ["block:1", "patch"] and summary.ok == 3
    key = store.keys()[0]
    np.testing.assert_array_equal(store.get(key, "block:1"), store.get(key, "patch"))  # the last block is patch


@pytest.mark.slow
def test_retrieval_export_reads_back_with_embedding_reader(tmp_path):
    embedding_reader = pytest.importorskip("embedding_reader")
    folder = make_folder(tmp_path / "imgs", count=7, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0, shard_size=3)
    from vitok.consumers.export import export_embedding_reader

    written = export_embedding_reader(tmp_path / "out", tmp_path / "index", pool="mean", normalize="l2")
    assert written == 7
    reader = embedding_reader.EmbeddingReader(str(tmp_path / "index" / "img_emb"), file_format="parquet_npy",
                                              meta_columns=["key", "source"],
                                              metadata_folder=str(tmp_path / "index" / "metadata"))
    assert reader.count == 7 and reader.dimension == 96
    store = vitok.open(tmp_path / "out")
    for embeddings, meta in reader(batch_size=10, start=0, end=reader.count):
        for vector, key in zip(embeddings, meta["key"]):
            expected = store[key].mean(0)
            np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=2e-3)
            assert abs(np.linalg.norm(vector) - 1) < 1e-3


def test_export_of_a_store_made_from_tars_keeps_keys_members_and_captions(tmp_path):
    """Retrieval metadata must lead back to the input: the archive, the member and its caption, row for row."""
    pq = pytest.importorskip("pyarrow.parquet")
    from test_archives import encode, sample_images, write_tar

    images = sample_images(4)
    write_tar(tmp_path / "00007.tar", [(f"s{i}", {"jpg": encode(image, "JPEG"), "txt": f"a caption {i}".encode()})
                                       for i, image in enumerate(images)])
    vitok.extract([str(tmp_path / "00007.tar")], tmp_path / "out", model="qwen3-vl-tiny", workers=0, pool="mean",
                  features=["merged"])
    from vitok.consumers.export import export_embedding_reader

    assert export_embedding_reader(tmp_path / "out", tmp_path / "index") == 4
    table = pq.read_table(tmp_path / "index" / "metadata" / "metadata_0.parquet").to_pylist()
    vectors = np.load(tmp_path / "index" / "img_emb" / "img_emb_0.npy")
    store = vitok.open(tmp_path / "out")
    assert sorted(row["key"] for row in table) == [f"00007/s{i}" for i in range(4)]  # (rows in the shard's order)
    for row, vector in zip(table, vectors):
        i = int(row["key"][-1])
        assert row["caption"] == f"a caption {i}" and row["source"].endswith("00007.tar")
        assert row["member"] == f"s{i}.jpg"
        np.testing.assert_allclose(vector.astype(np.float32), store[row["key"]][0].astype(np.float32), atol=2e-3)


def test_export_cli_needs_a_pool_for_token_stores(tmp_path):
    from helpers import vitok as run_vitok

    folder = make_folder(tmp_path / "imgs", count=2, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0)
    result = run_vitok("export", str(tmp_path / "out"), str(tmp_path / "index"))
    assert result.returncode == 2 and "--pool" in result.stderr
    result = run_vitok("export", str(tmp_path / "out"), str(tmp_path / "index"), "--pool", "max")
    assert result.returncode == 0 and (tmp_path / "index" / "img_emb" / "img_emb_0.npy").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # webdataset leaves its tar open
def test_webdataset_output_joins_the_input_tars_by_key(tmp_path):
    webdataset = pytest.importorskip("webdataset")
    from test_archives import encode, sample_images, write_tar

    images = sample_images(6)
    for shard in range(2):
        write_tar(tmp_path / f"{shard:05d}.tar", [(f"{shard}{i:04d}", {"jpg": encode(images[3 * shard + i], "JPEG"),
                                                                       "txt": f"caption {i}".encode()})
                                                  for i in range(3)])
    out = tmp_path / "out"
    vitok.extract([str(tmp_path / "{00000..00001}.tar")], out, model="qwen3-vl-tiny", workers=0, format="wds",
                  features=["merged", "deepstack"], store_dtype="float32")
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ["00000.tar", "00001.tar"]
    dataset = webdataset.WebDataset(str(out / "shards" / "00001.tar"), shardshuffle=False)
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == ["10000", "10001", "10002"]
    store = vitok.open(out)
    for sample in samples:
        record = json.loads(sample["json"])
        assert record["key"] == f"00001/{sample['__key__']}" and record["meta"]["caption"].startswith("caption")
        info = store.info(record["key"])  # the member is complete: written after its row and token counts were set
        assert (record["row"], record["tokens"]) == (info["row"], info["tokens"]) and record["tokens"]["merged"] > 0
        merged = np.load(__import__("io").BytesIO(sample["merged.npy"]))
        np.testing.assert_array_equal(merged, store.get(record["key"], "merged"))
    store.close()
    assert vitok.verify(out).clean


@pytest.mark.slow
def test_pictures_of_patch_tokens(tmp_path):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "imgs"
    photo(folder / "a.png", size=(96, 64))
    vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0, features=["patch"])
    from vitok.consumers.viz import token_picture

    figure = tmp_path / "fig.png"
    token_picture(vitok.open(tmp_path / "out"), "a.png", figure)
    from PIL import Image

    with Image.open(figure) as picture:
        assert picture.size[0] > 300
    from helpers import vitok as run_vitok

    result = run_vitok("viz", str(folder / "a.png"), "--model", "qwen3-vl-tiny", "-o", str(tmp_path / "f2.png"))
    assert result.returncode == 0, result.stderr


def test_faiss_script_finds_each_image_as_its_own_neighbour(tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("embedding_reader")
    import subprocess
    import sys

    from conftest import ROOT

    folder = make_folder(tmp_path / "imgs", count=6, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0, pool="mean")
    from vitok.consumers.export import export_embedding_reader

    export_embedding_reader(tmp_path / "out", tmp_path / "index", normalize="l2", dtype="float32")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "faiss_index.py"), str(tmp_path / "index")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "100.0%" in result.stdout, result.stdout + result.stderr


# ---- videos: training from cached video features, equal to the model on the processor's pixels -----------------

QWEN3_VIDEO = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
               "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
QWEN3_IMAGE = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
               "image_std": [0.5] * 3, "size": {"shortest_edge": 4096, "longest_edge": 96 * 96}}
# Qwen2.5-VL ships no video processor file: its preprocessor_config.json is read as both processors'
QWEN25_PROCESSOR = {"min_pixels": 3136, "max_pixels": 96 * 96, "patch_size": 14, "temporal_patch_size": 2,
                    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711]}


def tiny_qwen2_5_vl(seed: int = 0):
    """A randomly initialised full Qwen2.5-VL (windowed tower, M-RoPE with time) small enough for a CPU test."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vitok.bench.train import VIDEO

    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=80, num_heads=4, out_hidden_size=48,
                           window_size=56, fullatt_block_indexes=[1], patch_size=14, tokens_per_second=2),
        text_config=dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)
    return model


def qwen3_vl_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN3_IMAGE), tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(**QWEN3_VIDEO))


def qwen2_5_vl_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN25_PROCESSOR), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(**QWEN25_PROCESSOR))


# family: (model, checkpoint files, processor, video grids of a.mp4 and b.mp4). Qwen3-VL samples at 2 fps (6 and 5
# frames: an odd count is padded); Qwen2.5-VL keeps every frame (24 and 20)
VIDEO_FAMILIES = {
    "qwen3_vl": (tiny_qwen3_vl, {"video_preprocessor_config.json": QWEN3_VIDEO,
                                 "preprocessor_config.json": QWEN3_IMAGE}, qwen3_vl_processor, ([3, 4, 6], [3, 4, 4])),
    "qwen2_5_vl": (tiny_qwen2_5_vl, {"preprocessor_config.json": QWEN25_PROCESSOR}, qwen2_5_vl_processor,
                   ([12, 4, 6], [10, 4, 4])),
}


def char_tokenizer():
    """A tokenizer of one token per character, with the Qwen vision special tokens at the tiny model's ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vitok.bench.train import VIDEO

    special = {IMAGE: "<|image_pad|>", VIDEO: "<|video_pad|>", START: "<|vision_start|>", END: "<|vision_end|>"}
    free = (i for i in range(128) if i not in special)
    vocab = {chr(c): next(free) for c in range(32, 127)}
    vocab["[PAD]"] = next(free)
    vocab.update({text: i for i, text in special.items()})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.add_special_tokens([AddedToken(text, special=True) for text in special.values()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]")


@pytest.fixture(scope="module", params=list(VIDEO_FAMILIES))
def cached_videos(request, tmp_path_factory):
    """A tiny full model of the family saved as a checkpoint, two clips, and a store of them and a store of two
    images, made with its own tower."""
    from helpers import video_clip

    from vitok.inputs.video_decode import unavailable

    for decoder in ("pyav", "torchcodec"):  # PyAV encodes the clips, torchcodec decodes them (as the processor)
        if unavailable(decoder):
            pytest.skip(f"{decoder} unusable here: {unavailable(decoder)}")
    build, files, processor, grids = VIDEO_FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = build()
    model.save_pretrained(root / "model")
    for name, data in files.items():
        (root / "model" / name).write_text(json.dumps(data))
    (root / "vids").mkdir()
    video_clip(root / "vids" / "a.mp4", frames=24, size=(96, 64), fps=8)
    video_clip(root / "vids" / "b.mp4", frames=20, size=(64, 64), fps=8, seed=1)
    for i, size in enumerate([(64, 64), (96, 64)]):
        photo(root / "imgs" / f"{i}.png", size=size, seed=i)
    features = ["merged", "deepstack"] if request.param == "qwen3_vl" else ["merged"]
    common = dict(model=str(root / "model"), features=features, store_dtype="float32", workers=0)
    assert vitok.extract([str(root / "vids")], root / "video-store", **common).ok == 2
    assert vitok.extract([str(root / "imgs")], root / "image-store", **common).ok == 2
    return model, root, processor, grids


@pytest.mark.slow  # about 15 s a family on 2 cores: two extractions, the processor, two passes of the model
def test_language_model_on_cached_video_features_equals_the_model_on_the_processors_pixels(cached_videos):
    from PIL import Image

    from vitok.integrations.transformers import CachedVideosCollator

    model, root, make_processor, (grid_a, grid_b) = cached_videos
    tokenizer = char_tokenizer()
    processor = make_processor(tokenizer)
    video = "<|vision_start|><|video_pad|><|vision_end|>"  # as the chat template writes a video
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"Q: {video} what?", f"{image} and {video}<|video_pad|> then"]  # a bare placeholder too
    samples = [{"input_ids": tokenizer.encode(text, add_special_tokens=False), "videos": videos, "images": images}
               for text, videos, images in ((texts[0], ["a.mp4"], []), (texts[1], ["b.mp4", "a.mp4"], ["1.png"]))]
    for sample in samples:
        sample["labels"] = list(sample["input_ids"])
    collate = CachedVideosCollator(vitok.open(root / "video-store"), model.config, tokenizer=tokenizer,
                                   pad_token_id=tokenizer.pad_token_id, images=vitok.open(root / "image-store"))
    batch = collate(samples)
    if model.config.model_type == "qwen3_vl":  # the step times are text: without the tokenizer, a clear refusal
        with pytest.raises(ValueError, match="pass the model's tokenizer"):
            CachedVideosCollator(vitok.open(root / "video-store"), model.config)
    reference_inputs = processor(text=texts, images=[Image.open(root / "imgs" / "1.png").convert("RGB")],
                                 videos=[str(root / "vids" / name) for name in ("a.mp4", "b.mp4", "a.mp4")],
                                 padding=True, return_tensors="pt", cap_pixels_per_frame=False)
    reference_inputs.pop("video_metadata", None)
    # the collator's expansion is the processor's (Qwen3-VL: timestamps as text, a vision start/end pair per step)
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw", "image_grid_thw"):
        assert torch.equal(batch[name], reference_inputs[name]), name
    assert batch["video_grid_thw"].tolist() == [grid_a, grid_b, grid_a]
    if "second_per_grid_ts" in reference_inputs:  # Qwen2.5-VL: M-RoPE's time step per video
        assert torch.equal(batch["second_per_grid_ts"], torch.as_tensor(reference_inputs["second_per_grid_ts"]))

    model.zero_grad()
    reference = model(**reference_inputs, labels=batch["labels"])
    reference.loss.backward()
    assert_cached_step_equals(model, batch, reference)


def test_the_video_collator_names_what_it_lacks(cached):
    from vitok.bench.train import VIDEO
    from vitok.integrations.transformers import CachedImagesCollator, CachedVideosCollator

    model, _, root = cached
    images = vitok.open(root / "store")
    with pytest.raises(KeyError, match="this store holds images; videos come from a store of videos"):
        CachedVideosCollator(images, model.config, tokenizer=char_tokenizer())
    collate = CachedImagesCollator(images, model.config)
    with pytest.raises(ValueError, match="given no store of videos"):
        collate([{"input_ids": [5, START, VIDEO, END], "videos": ["0.png"]}])
    with pytest.raises(ValueError, match="1 image placeholder.* for 2 image key"):
        collate([{"input_ids": [5, START, IMAGE, END], "images": ["0.png", "1.png"]}])


def test_the_collators_refuse_malformed_samples_naming_the_fault(cached, tmp_path):
    from vitok.integrations.transformers import CachedImagesCollator, CachedVideosCollator

    model, _, root = cached
    collate = CachedImagesCollator(vitok.open(root / "store"), model.config)
    ids = [5, START, IMAGE, END, 6]
    for labels in (ids[:2], [*ids, 7, 8]):  # shorter: an IndexError; longer: the labels were shifted silently
        with pytest.raises(ValueError, match=f"labels has {len(labels)} entries for 5 input_ids"):
            collate([{"input_ids": ids, "labels": labels, "images": ["0.png"]}])
    with pytest.raises(ValueError, match="must be a list of keys; got the string '0.png'"):
        collate([{"input_ids": ids, "images": "0.png"}])  # was: "1 image placeholder(s) ... for 5 image key(s)"
    with pytest.raises(ValueError, match="no samples to collate"):
        collate([])
    vitok.extract([str(root / "imgs")], tmp_path / "pooled", model=str(root / "model"), pool="mean", workers=0)
    with pytest.raises(KeyError, match="must hold every merged token"):  # was: "extract DeepStack features too"
        CachedImagesCollator(vitok.open(tmp_path / "pooled"), model.config)
    with pytest.raises(KeyError, match="this store holds images"):
        CachedVideosCollator(vitok.open(tmp_path / "pooled"), model.config, tokenizer=char_tokenizer())
