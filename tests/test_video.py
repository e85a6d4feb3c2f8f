"""Videos: preprocessing equal to transformers' Qwen video processors given the same decoded frames (sampling, the
pixel budget, resize, patchify, timestamps), decoding equal to transformers' ``load_video``, the tower on video
grids, the store's video records, and bad input. Every clip is encoded here with PyAV, in milliseconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import video_clip

from vitok.errors import ImageError, UsageError
from vitok.inputs.preprocess import normalize_patches
from vitok.inputs.video_config import VIDEO_PROCESSOR_DEFAULTS, VideoConfig
from vitok.inputs.video_decode import open_video, unavailable
from vitok.inputs.video_preprocess import (
    VideoPreprocessor,
    frames_to_patches,
    sample_indices,
    step_times,
    video_target_size,
)

# PyAV encodes the test clips (the test extra has it); torchcodec needs FFmpeg's shared libraries (.ci/run installs
# Debian's ffmpeg): without them the tests that decode with it skip, saying why
needs_av = pytest.mark.skipif(unavailable("pyav") is not None, reason=f"PyAV unusable here: {unavailable('pyav')}")
needs_torchcodec = pytest.mark.skipif(unavailable("torchcodec") is not None,
                                      reason=f"torchcodec unusable here: {unavailable('torchcodec')}")

# released settings (video_preprocessor_config.json of Qwen3-VL; Qwen2.5-VL ships none, so transformers reads its
# preprocessor_config.json as the video processor's)
QWEN3_HUB = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
             "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
QWEN25_HUB = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def reference_processor(rule: str, data: dict):
    if rule == "qwen2_vl":
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as cls
    else:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as cls
    return cls(**data)


def synthetic_video(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(T, 3, H, W) uint8 with smooth structure and noise (a resize has something to get wrong)."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    base = torch.stack([y * 200 + x * 40, x * 180 + 30 + 0 * y, (x + y) * 90])  # (3, H, W)
    steps = torch.arange(frames, dtype=torch.float32)[:, None, None, None] * 3
    noise = torch.randint(0, 40, (frames, 3, height, width), generator=generator)
    return ((base[None] + steps) % 216 + noise).clamp(0, 255).to(torch.uint8)


def ours(config: VideoConfig, video: torch.Tensor, fps: float | None):
    indices = sample_indices(config, len(video), fps)
    size = video_target_size(config, len(indices), video.shape[2], video.shape[3])
    patches = frames_to_patches((video[int(i)] for i in indices), config, size, len(indices))
    p = config.pixels.patch_size
    grid = (patches.shape[0] // ((size[0] // p) * (size[1] // p)), size[0] // p, size[1] // p)
    return indices, grid, normalize_patches(patches, config.pixels)


def theirs(rule: str, data: dict, video: torch.Tensor, fps: float | None, **call):
    from transformers.video_utils import VideoMetadata

    processor = reference_processor(rule, data)
    out = processor(videos=[video], video_metadata=[VideoMetadata(total_num_frames=len(video), fps=fps)],
                    return_metadata=True, return_tensors="pt", **call)
    indices = out["video_metadata"][0].frames_indices
    indices = np.arange(len(video)) if indices is None else np.asarray(indices)
    return indices, tuple(out["video_grid_thw"][0].tolist()), out["pixel_values_videos"]


CASES = [  # (id, rule, settings, frames, height, width, fps)
    ("qwen3-hub-2fps", "qwen3_vl", QWEN3_HUB, 50, 90, 120, 24.0),
    ("qwen3-odd-steps", "qwen3_vl", QWEN3_HUB, 61, 64, 48, 30.0),  # int(61/30*2) = 4 frames... min 4
    ("qwen3-fps-unknown", "qwen3_vl", QWEN3_HUB, 5, 70, 50, None),  # fps 24 assumed, as the reference
    ("qwen3-tiny-frames", "qwen3_vl", QWEN3_HUB, 30, 20, 90, 10.0),  # a side under 32: scaled up first
    ("qwen3-num-frames", "qwen3_vl", {**QWEN3_HUB, "fps": None, "num_frames": 7}, 40, 64, 64, 24.0),
    ("qwen3-budget", "qwen3_vl", {**QWEN3_HUB, "size": {"shortest_edge": 4096, "longest_edge": 32 * 32 * 40}},
     48, 160, 240, 8.0),
    ("qwen3-cap", "qwen3_vl", {**QWEN3_HUB, "cap_pixels_per_frame": True, "max_video_tokens": 6}, 48, 160, 240, 8.0),
    ("qwen3-more-asked", "qwen3_vl", {**QWEN3_HUB, "fps": None}, 3, 64, 64, 24.0),  # min 4 of 3: a repeated frame
    ("qwen2.5-every-frame", "qwen2_vl", QWEN25_HUB, 9, 60, 84, 24.0),  # do_sample_frames False: all, odd padded
    ("qwen2.5-2fps", "qwen2_vl", {**QWEN25_HUB, "do_sample_frames": True, "fps": 2}, 100, 60, 84, 24.0),
    ("qwen2.5-num-frames", "qwen2_vl", {**QWEN25_HUB, "do_sample_frames": True, "num_frames": 5}, 31, 56, 56, 24.0),
    ("qwen2.5-cap", "qwen2_vl", {**QWEN25_HUB, "do_sample_frames": True, "fps": 4, "cap_pixels_per_frame": True,
                                 "max_video_tokens": 300}, 60, 120, 160, 24.0),
    ("qwen2-class-defaults", "qwen2_vl", {}, 6, 100, 60, 25.0),
]


@pytest.mark.parametrize("rule, data, frames, height, width, fps", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_preprocessing_equals_the_reference_video_processor(rule, data, frames, height, width, fps):
    video = synthetic_video(frames, height, width)
    cap = {"cap_pixels_per_frame": bool(data.get("cap_pixels_per_frame"))}  # (its default warns in 5.24)
    expected_indices, expected_grid, expected = theirs(rule, {k: v for k, v in data.items()
                                                             if k != "cap_pixels_per_frame"}, video, fps, **cap)
    config = VideoConfig.from_hf_video_processor_config(data, rule)
    indices, grid, pixels = ours(config, video, fps)
    assert indices.tolist() == [int(i) for i in expected_indices]
    assert grid == expected_grid
    assert torch.equal(pixels, expected)  # bit for bit


def test_timestamps_are_the_qwen3_processors():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    config = VideoConfig.from_hf_video_processor_config(QWEN3_HUB, "qwen3_vl")
    indices = sample_indices(config, 240, 24.0)
    times = [int(i) / 24.0 for i in indices]
    expected = Qwen3VLProcessor._calculate_timestamps(None, indices.copy(), 24.0, 2)
    assert step_times(times, 2) == expected
    odd = sample_indices(config, 5, 24.0)[:3]  # three frames: the last repeated for its step
    assert step_times([int(i) / 24 for i in odd], 2) == Qwen3VLProcessor._calculate_timestamps(None, odd.copy(), 24, 2)


@pytest.mark.parametrize("rule", ["qwen2_vl", "qwen3_vl"])
def test_processor_defaults_table_is_the_reference_class(rule):
    processor = reference_processor(rule, {})
    for key, value in VIDEO_PROCESSOR_DEFAULTS[rule].items():
        got = getattr(type(processor), key, getattr(processor, key, None))
        got = dict(got) if key == "size" else (tuple(got) if isinstance(got, (list, tuple)) else got)
        assert got == (tuple(value) if isinstance(value, (list, tuple)) else value), key


def test_qwen3_refuses_a_single_frame_and_qwen2_needs_a_frame_rate_to_sample_by_fps():
    qwen3 = VideoConfig.from_hf_video_processor_config(QWEN3_HUB, "qwen3_vl")
    with pytest.raises(ImageError, match="at least 2"):
        video_target_size(qwen3, 1, 64, 64)
    qwen2 = VideoConfig.from_hf_video_processor_config({**QWEN25_HUB, "do_sample_frames": True, "fps": 2}, "qwen2_vl")
    with pytest.raises(ImageError, match="no frame rate"):
        sample_indices(qwen2, 40, None)
    with pytest.raises(ImageError, match="no frames to sample"):
        sample_indices(qwen2, 1, 24.0)  # the reference divides by zero here


def test_video_settings_flags_follow_the_processor():
    config = VideoConfig.from_hf_video_processor_config(QWEN3_HUB, "qwen3_vl")
    assert (config.fps, config.num_frames, config.pixels.max_pixels) == (2.0, None, 25165824)
    counted = config.replace(num_frames=16)
    assert (counted.fps, counted.num_frames, counted.do_sample_frames) == (None, 16, True)
    with pytest.raises(UsageError, match="both set"):
        VideoConfig.from_hf_video_processor_config({**QWEN3_HUB, "num_frames": 8}, "qwen3_vl")
    with pytest.raises(UsageError, match="exclusive"):
        VideoConfig(rule="qwen3_vl", pixels=config.pixels, do_sample_frames=True, fps=2.0, num_frames=8)
    with pytest.raises(UsageError, match="--min-frames 9 is larger"):
        config.replace(min_frames=9, max_frames=8)
    for bad in (0.0, -1.0, float("nan"), float("inf")):  # nan and inf reached the sampler: every video skipped
        with pytest.raises(UsageError, match="--fps must be a positive finite number"):
            config.replace(fps=bad)
        with pytest.raises(UsageError, match="--max-video-seconds must be a positive finite number"):
            config.replace(max_video_seconds=bad)
    qwen2 = VideoConfig.from_hf_video_processor_config(QWEN25_HUB, "qwen2_vl")
    assert (qwen2.pixels.min_pixels, qwen2.pixels.max_pixels, qwen2.do_sample_frames) == (3136, 12845056, False)
    assert qwen2.replace(fps=1.0).do_sample_frames  # a rate asked for is a rate sampled


# ---- decoding: frames equal to transformers' load_video with the same backend ------------------------------------

CONTAINERS = [".mp4", ".webm", ".mkv", ".mov", ".avi"]


def processor_on_file(rule: str, data: dict, path):
    """The reference end to end on a file: the processor decodes it itself (torchcodec, ``fetch_videos``)."""
    processor = reference_processor(rule, data)
    out = processor(videos=[str(path)], return_metadata=True, return_tensors="pt", cap_pixels_per_frame=False)
    metadata = out["video_metadata"][0]
    return [int(i) for i in metadata.frames_indices], tuple(out["video_grid_thw"][0].tolist()), \
        out["pixel_values_videos"], metadata


@needs_av
@needs_torchcodec
@pytest.mark.parametrize("suffix", CONTAINERS)
def test_a_video_file_equals_the_reference_end_to_end(tmp_path, suffix):
    path = video_clip(tmp_path / f"clip{suffix}", frames=27, size=(100, 70))
    indices, grid, pixels, metadata = processor_on_file("qwen3_vl", QWEN3_HUB, path)
    config = VideoConfig.from_hf_video_processor_config(QWEN3_HUB, "qwen3_vl")
    prepared = VideoPreprocessor(config).load(str(path))
    assert prepared.frames.indices == indices and prepared.grid_thw == grid
    assert prepared.frames.fps == metadata.fps and prepared.frames.frame_count == metadata.total_num_frames
    assert torch.equal(normalize_patches(prepared.patches, config.pixels), pixels)
    from_bytes = VideoPreprocessor(config).load(path.read_bytes())  # a tar member's bytes decode the same
    assert torch.equal(from_bytes.patches, prepared.patches)


@needs_av
@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".avi"])  # where the reference's PyAV reader has a frame count
def test_pyav_frames_equal_load_video_with_pyav(tmp_path, suffix):
    from transformers.video_utils import load_video

    path = video_clip(tmp_path / f"clip{suffix}", frames=30, size=(84, 60))
    sampler = reference_processor("qwen3_vl", QWEN3_HUB).sample_frames
    expected, metadata = load_video(str(path), backend="pyav", sample_indices_fn=sampler)
    with open_video(str(path), "pyav") as video:
        assert (video.info.frame_count, video.info.fps) == (metadata.total_num_frames, metadata.fps)
        frames = torch.stack(list(video.frames([int(i) for i in metadata.frames_indices], per_read=4)))
    assert torch.equal(frames, torch.from_numpy(expected).permute(0, 3, 1, 2))


@needs_av
@needs_torchcodec
@pytest.mark.parametrize("case", ["rotated", "10-bit"])
def test_rotation_and_10_bit_decode_as_the_reference(tmp_path, case):
    options = {"rotation": 90} if case == "rotated" else {"pix_fmt": "yuv420p10le"}
    path = video_clip(tmp_path / "clip.mp4", frames=10, size=(96, 64), **options)
    indices, grid, pixels, _ = processor_on_file("qwen2_vl", QWEN25_HUB, path)
    config = VideoConfig.from_hf_video_processor_config(QWEN25_HUB, "qwen2_vl")
    prepared = VideoPreprocessor(config).load(str(path))
    assert prepared.grid_thw == grid and prepared.frames.indices == indices
    assert torch.equal(normalize_patches(prepared.patches, config.pixels), pixels)
    if case == "rotated":  # torchcodec turns the frames upright, as the reference
        assert prepared.original_size == (64, 96) and any("rotation" in note for note in prepared.notes)


@needs_av
def test_videos_are_found_by_extension_and_by_content(tmp_path):
    from vitok.inputs.sources import list_inputs

    folder = tmp_path / "videos"
    folder.mkdir()
    video_clip(folder / "a.mp4", frames=4)
    video_clip(folder / "no_suffix", frames=4, container="matroska")
    (folder / "notes.bin").write_bytes(b"not a video at all" * 40)
    listing = list_inputs([str(folder)], input_format="video")
    assert listing.media == "video" and listing.keys == [["a.mp4", "no_suffix"]]
    assert list_inputs([str(folder)]).keys == [["a.mp4", "no_suffix"]]  # a folder of videos, by its extensions
    assert list_inputs([str(folder / "no_suffix")]).media == "video"  # a file named on the command line: sniffed
    (folder / "photo.png").write_bytes(b"")
    mixed = list_inputs([str(folder)])  # images win a mixed folder; the videos are reported beside them
    assert mixed.media == "image" and mixed.beside == [str(folder / "a.mp4")]
    with pytest.raises(UsageError, match="one store holds one kind"):
        list_inputs([str(folder / "a.mp4"), str(folder / "photo.png")])



def test_a_folder_read_as_videos_says_its_other_files_are_not_videos(tmp_path, caplog):
    import logging

    from vitok.inputs.sources import list_inputs
    from vitok.run.job import report_listing

    video_clip(tmp_path / "a.mp4", frames=4)
    (tmp_path / "photo.png").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="vitok.run.job"):
        report_listing(list_inputs([str(tmp_path)], input_format="video"))
    assert "ignored 1 file(s) that are not videos (by extension or content)" in caplog.text  # was: "an image extension"


@needs_av
@needs_torchcodec
@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"])
def test_a_file_name_that_is_not_utf8_decodes_as_the_same_file_under_another_name(tmp_path, decoder):
    """A folder listing gives such names decoded with surrogateescape; torchcodec took only UTF-8 paths."""
    import os

    clip = video_clip(tmp_path / "clip.mp4", frames=6)
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.mp4")
    with open(odd, "wb") as out:
        out.write(clip.read_bytes())
    config = VideoConfig.from_hf_video_processor_config(QWEN3_HUB, "qwen3_vl").replace(decoder=decoder)
    expected, got = VideoPreprocessor(config).load(str(clip)), VideoPreprocessor(config).load(odd)
    assert got.grid_thw == expected.grid_thw and got.frames.indices == expected.frames.indices
    assert torch.equal(got.patches, expected.patches)


# ---- the tower on video grids ----------------------------------------------------------------------------------

TOWERS = [("qwen2_5_vl", "qwen2_vl", QWEN25_HUB, (9, 64, 90)), ("qwen3_vl", "qwen3_vl", QWEN3_HUB, (13, 70, 96))]


@pytest.mark.parametrize("family, rule, data, shape", TOWERS, ids=[t[0] for t in TOWERS])
def test_the_tower_on_a_video_equals_the_reference_and_in_temporal_pieces(family, rule, data, shape):
    from test_families import pair, reference_outputs

    from vitok.encoder.inference import Encoder
    from vitok.inputs.video_preprocess import PreparedVideo

    reference, model = pair(family)
    config = VideoConfig.from_hf_video_processor_config({**data, "do_sample_frames": True, "fps": None,
                                                         "num_frames": shape[0]}, rule)
    indices, grid, pixels = ours(config, synthetic_video(*shape), 24.0)
    assert grid[0] >= 3  # several temporal steps
    features = ("patch", "merged", "deepstack") if family == "qwen3_vl" else ("patch", "merged")
    with torch.no_grad():
        expected = reference_outputs(reference, family, pixels, [grid])
        got = model(pixels, [grid], features=features).features
    pairs = [(got["patch"], expected["patch"]), (got["merged"], expected["merged"])]
    pairs += [(got["deepstack"][k], expected[f"deepstack{k}"]) for k in range(len(got.get("deepstack", [])))]
    for mine, reference_tensor in pairs:
        assert (mine - reference_tensor).abs().max().item() <= 1e-5
    encoder = Encoder(model, None, config.pixels, torch.device("cpu"), torch.float32, "test")
    size = video_target_size(config, len(indices), shape[1], shape[2])
    patches = frames_to_patches((synthetic_video(*shape)[int(i)] for i in indices), config, size, len(indices))
    video = PreparedVideo(patches, grid, (shape[2], shape[1]))
    whole = encoder.encode([video], features)
    pieces = encoder.encode([video], features, chunk_rows=2 * grid[1] * grid[2])  # two steps per piece
    assert pieces.rows == whole.rows and pieces.grid_thw == [grid]
    for name in features:  # the same arithmetic; the CPU's matrix kernels may round a shorter batch otherwise
        torch.testing.assert_close(pieces.features[name], whole.features[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(whole.features[name], got[name], rtol=0, atol=1e-6)


# ---- the store: one record per video, tokens equal to the reference end to end -------------------------------

def video_folder(folder, specs):
    folder.mkdir(parents=True, exist_ok=True)
    for name, frames, size, fps in specs:
        video_clip(folder / name, frames=frames, size=size, fps=fps)
    return folder


CLIPS = [("a.mp4", 12, (96, 64), 24), ("b.webm", 9, (64, 80), 10)]
CHECKPOINTS = [("qwen2_5_vl", "qwen2_vl", "preprocessor_config.json", QWEN25_HUB),
               ("qwen3_vl", "qwen3_vl", "video_preprocessor_config.json", QWEN3_HUB)]


@needs_av
@needs_torchcodec
@pytest.mark.parametrize("family, rule, filename, settings", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_extract_videos_equals_the_reference_processor_and_tower(tmp_path, family, rule, filename, settings):
    import json

    from test_families import reference_outputs, released_folder

    import vitok

    reference = released_folder(tmp_path / "ckpt", family).eval()
    (tmp_path / "ckpt" / filename).write_text(json.dumps(settings))
    folder = video_folder(tmp_path / "videos", CLIPS)
    features = ("merged", "deepstack") if family == "qwen3_vl" else ("merged",)
    summary = vitok.extract([str(folder)], tmp_path / "out", model=str(tmp_path / "ckpt"), workers=0,
                            store_dtype="float32", features=features)
    assert summary.ok == len(CLIPS)
    store = vitok.open(tmp_path / "out")
    assert store.header.settings.video["rule"] == rule and store.keys() == [c[0] for c in CLIPS]
    for name, *_ in CLIPS:
        indices, grid, pixels, metadata = processor_on_file(rule, settings, folder / name)
        with torch.no_grad():
            expected = reference_outputs(reference, family, pixels, [grid])
        info = store.info(name)
        assert tuple(info["grid_thw"]) == grid and info["video"]["indices"] == indices
        assert info["video"]["fps"] == metadata.fps and info["video"]["frame_count"] == metadata.total_num_frames
        assert np.abs(store.get(name, "merged") - expected["merged"].numpy()).max() <= 1e-5
        if family == "qwen3_vl":
            from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

            assert info["video"]["step_times"] == Qwen3VLProcessor._calculate_timestamps(None, indices, metadata.fps,
                                                                                         2)
            for k, level in enumerate(store.get(name, "deepstack")):
                assert np.abs(level - expected[f"deepstack{k}"].numpy()).max() <= 1e-5


@needs_av
@needs_torchcodec
def test_pooling_and_exports_per_video_and_per_temporal_step(tmp_path):
    import vitok

    folder = video_folder(tmp_path / "videos", [("a.mp4", 20, (64, 64), 24), ("b.mp4", 9, (96, 64), 24)])
    common = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", num_frames=6)
    vitok.extract([str(folder)], tmp_path / "tokens", features=("merged", "deepstack"), **common)
    vitok.extract([str(folder)], tmp_path / "steps", pool="mean", pool_steps=True, **common)
    vitok.extract([str(folder)], tmp_path / "whole", pool="mean", **common)
    tokens, steps, whole = (vitok.open(tmp_path / name) for name in ("tokens", "steps", "whole"))
    assert steps.header.settings.pool_by == "step" and whole.header.settings.pool_by is None
    for key in tokens.keys():
        t, h, w = tokens.info(key)["grid_thw"]
        rows = tokens.get(key).reshape(t, h * w // 4, -1)
        assert len(steps.info(key)["video"]["step_times"]) == t == 3
        np.testing.assert_allclose(steps.get(key), rows.mean(axis=1), rtol=0, atol=1e-6)
        np.testing.assert_allclose(whole.get(key)[0], rows.reshape(t * h * w // 4, -1).mean(axis=0), rtol=0,
                                   atol=1e-6)
    embeds, grid, metadata = tokens.video_embeds("a.mp4")  # vLLM's video_embeds + video_grid_thw (+ metadata)
    merged, deepstack = tokens.get("a.mp4"), tokens.get("a.mp4", "deepstack")
    assert tuple(embeds.shape) == (len(merged), merged.shape[1] * (1 + len(deepstack)))
    assert grid.tolist() == [tokens.info("a.mp4")["grid_thw"]]
    assert metadata["frames_indices"] == tokens.info("a.mp4")["video"]["indices"] and metadata["fps"] == 24.0

    import pyarrow.parquet as pq

    from vitok.consumers.export import export

    export(tmp_path / "tokens", tmp_path / "per-step", pool="mean", steps=True, dtype="float32")
    export(tmp_path / "steps", tmp_path / "from-steps", steps=True, dtype="float32")
    export(tmp_path / "steps", tmp_path / "per-video", dtype="float32")  # the steps pooled again: the video's mean
    for name in ("per-step", "from-steps"):
        vectors = np.load(tmp_path / name / "img_emb" / "img_emb_0.npy")
        table = pq.read_table(tmp_path / name / "metadata" / "metadata_0.parquet").to_pylist()
        assert [(r["key"], r["step"]) for r in table] == [("a.mp4", s) for s in range(3)] + [("b.mp4", s)
                                                                                             for s in range(3)]
        assert [r["time"] for r in table[:3]] == steps.info("a.mp4")["video"]["step_times"]
        np.testing.assert_allclose(vectors, np.concatenate([steps.get("a.mp4"), steps.get("b.mp4")]), atol=1e-6)
    per_video = np.load(tmp_path / "per-video" / "img_emb" / "img_emb_0.npy")
    np.testing.assert_allclose(per_video, np.concatenate([whole.get("a.mp4"), whole.get("b.mp4")]), atol=1e-6)


@needs_av
@needs_torchcodec
def test_the_commands_count_a_video_store_in_videos(tmp_path):
    """Progress, the summary, the stage rates and verdict, info, verify and export count videos (and temporal
    steps), not images."""
    from helpers import vitok as cli

    folder = video_folder(tmp_path / "videos", [("a.mp4", 12, (64, 64), 24), ("b.mp4", 9, (96, 64), 24)])
    out = tmp_path / "out"
    run = cli("extract", str(folder), "-o", str(out), "--model", "qwen3-vl-tiny", "--workers", "0",
              "--num-frames", "4", check=True)
    assert "2/2 videos, 1/1 shards" in run.stderr and "videos/s ->" in run.stderr
    assert "decode " in run.stderr and "videos/s (0 workers" in run.stderr
    info = cli("info", str(out), check=True).stdout
    assert "videos     2 ok" in info and "last run   2 videos in" in info and "img/s" not in info
    assert "2 videos ok" in cli("verify", str(out), check=True).stdout
    refused = cli("export", str(out), str(tmp_path / "index"))
    assert refused.returncode == 2 and "every token of each video" in refused.stderr
    assert "2 videos -> " in cli("export", str(out), str(tmp_path / "index"), "--pool", "mean", check=True).stdout
    steps = cli("export", str(out), str(tmp_path / "steps"), "--pool", "mean", "--steps", check=True).stdout
    assert steps.startswith("4 temporal steps -> ")
    for result in (run.stderr, info):
        assert " images" not in result and "img/s" not in result, result


# ---- bad input: recorded as skipped with a one-line reason, or decoded as the reference does -------------------

def variable_rate_clip(path, frames: int = 40):
    """Half the frames 33 ms apart, then 200 ms apart: an average frame rate that fits neither half."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 5, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            pts += 33 if i < frames // 2 else 200
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def audio_only_clip(path):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@needs_av
@needs_torchcodec
def test_bad_videos_are_skipped_with_their_reason_or_decoded_as_the_reference(tmp_path):
    import vitok

    folder = tmp_path / "videos"
    folder.mkdir()
    whole = video_clip(tmp_path / "whole.mp4", frames=24).read_bytes()
    (folder / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # its index (moov) is at the end: gone
    cut_mkv = video_clip(tmp_path / "whole.mkv", frames=48).read_bytes()
    (folder / "cut.mkv").write_bytes(cut_mkv[: len(cut_mkv) // 2])  # the frames before the cut decode
    audio_only_clip(folder / "audio.mp4")
    (folder / "empty.webm").write_bytes(b"")
    (folder / "text.avi").write_text("not a video")
    video_clip(folder / "one-frame.mov", frames=1)  # Qwen3-VL's processor needs two frames
    variable_rate_clip(folder / "vfr.mp4")
    summary = vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0)
    assert summary.ok + summary.skipped == 7 and summary.failed == 0
    store = vitok.open(tmp_path / "out")
    reasons = store.skipped
    assert "cannot open as a video" in reasons["cut.mp4"] and "SingleStreamDecoder" not in reasons["cut.mp4"]
    assert reasons["audio.mp4"].startswith("no video stream")
    assert reasons["empty.webm"] == "empty file (0 bytes)"
    assert "cannot open as a video" in reasons["text.avi"]
    assert "at least 2" in reasons["one-frame.mov"]
    assert all("\n" not in reason for reason in reasons.values())
    for name in ("cut.mkv", "vfr.mp4"):  # decoded as transformers decodes them: frame ordinals over the average fps
        indices, grid, _, metadata = processor_on_file("qwen3_vl", QWEN3_HUB, folder / name)
        info = store.info(name)
        assert info["status"] == "ok" and tuple(info["grid_thw"]) == grid and info["video"]["indices"] == indices
        assert info["video"]["timestamps"] == [i / metadata.fps for i in indices]


@needs_av
@needs_torchcodec
def test_limits_refuse_a_video_from_its_metadata_before_decoding(tmp_path):
    config = VideoConfig.from_hf_video_processor_config(QWEN3_HUB, "qwen3_vl")
    path = str(video_clip(tmp_path / "clip.mp4", frames=30, size=(96, 64)))
    for changes, reason in [(dict(max_video_frames=20), "claims 30 frames, more than --max-video-frames 20"),
                            (dict(max_video_patches=10), "more than --max-video-patches 10"),
                            (dict(pixels=config.pixels.replace(max_image_pixels=5000)), "exceeds the limit of 5000")]:
        with pytest.raises(ImageError, match=reason):
            VideoPreprocessor(config.replace(**changes)).load(path)


@pytest.mark.slow
@needs_av
@needs_torchcodec
def test_kill_9_in_the_middle_of_videos_then_rerun_gives_every_video_once(tmp_path):
    from helpers import vitok, vitok_killed_at

    import vitok as library

    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(5):  # other pixels each: a copy of a video encoded before would cost no encoder call
        video_clip(folder / f"{i}.mp4", frames=36, size=(128, 96), seed=i)
    out = tmp_path / "out"
    args = ["extract", str(folder), "-o", str(out), "--model", "qwen3-vl-tiny", "--workers", "0", "--shard-size",
            "1", "--num-frames", "16", "--quiet"]
    # as the third video's encoding begins, once the first is published (the second is decoded and encoded)
    killed = vitok_killed_at("vitok.encoder.inference:Encoder.encode", 3, *args, shards=out / "shards", published=1)
    assert killed.returncode == -9, killed.stderr
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    assert 1 <= len(finished) < 5
    assert vitok(*args).returncode == 0
    assert all((out / "shards" / n).stat().st_mtime_ns == t for n, t in finished.items())  # never rewritten
    library.extract([str(folder)], tmp_path / "clean", model="qwen3-vl-tiny", workers=0, shard_size=1, num_frames=16)
    resumed, clean = library.open(out), library.open(tmp_path / "clean")
    assert resumed.keys() == clean.keys() == [f"{i}.mp4" for i in range(5)] and library.verify(out).clean
    for key in clean.keys():
        np.testing.assert_array_equal(resumed[key], clean[key])
        assert resumed.info(key)["video"] == clean.info(key)["video"]


@needs_av
@needs_torchcodec
def test_video2dataset_tars_give_the_tokens_of_the_loose_videos(tmp_path, monkeypatch):
    """(a member larger than SPOOL_BYTES is copied to the temporary space rather than held in memory)"""
    import json
    import tempfile

    from test_archives import write_tar

    import vitok
    from vitok.inputs.readers import webdataset

    loose = video_folder(tmp_path / "loose", [("000000000.mp4", 12, (96, 64), 24), ("000000002.mp4", 9, (64, 64), 24)])
    samples = []
    for index in range(3):
        key = f"{index:09d}"
        meta = {"url": f"http://x/{key}.mp4", "key": key, "status": "success", "error_message": None}
        if index == 1:  # a sample video2dataset could not fetch: written without its video
            meta.update(status="failed_to_download", error_message="HTTP Error 404: Not Found")
            samples.append((key, {"txt": b"gone", "json": json.dumps(meta).encode()}))
            continue
        samples.append((key, {"mp4": (loose / f"{key}.mp4").read_bytes(), "txt": f"clip {index}".encode(),
                              "json": json.dumps(meta).encode()}))
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "00000.tar", samples)
    common = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", token_budget=1)  # one video per batch
    scratch = tmp_path / "scratch"  # where video members larger than SPOOL_BYTES are copied while decoded
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(webdataset, "SPOOL_BYTES", (loose / "000000002.mp4").stat().st_size)  # 000000000 is larger
    spooled, spool = [], webdataset.spool
    monkeypatch.setattr(webdataset, "spool", lambda handle, name: spooled.append(name) or spool(handle, name))
    summary = vitok.extract([str(tmp_path / "shards")], tmp_path / "tars", **common)  # told from its members
    assert spooled == ["000000000.mp4"] and list(scratch.iterdir()) == []
    assert summary.ok == 2 and summary.skipped == 1
    vitok.extract([str(loose)], tmp_path / "files", **common)
    tars, files = vitok.open(tmp_path / "tars"), vitok.open(tmp_path / "files")
    assert tars.header.settings.input == {**tars.header.settings.input, "kind": "wds", "media": "video"}
    assert "failed_to_download (HTTP Error 404: Not Found)" in tars.skipped["00000/000000001"]
    for key in ("000000000", "000000002"):
        info = tars.info(f"00000/{key}")
        assert info["member"] == f"{key}.mp4" and info["meta"]["caption"].startswith("clip")
        assert info["video"] == files.info(f"{key}.mp4")["video"]
        np.testing.assert_array_equal(tars[f"00000/{key}"], files[f"{key}.mp4"])


@needs_av
@needs_torchcodec
def test_a_folder_of_videos_planned_first_is_extracted_as_videos(tmp_path):
    from helpers import vitok as cli

    import vitok

    folder = video_folder(tmp_path / "videos", [("a.mp4", 8, (64, 64), 24)])
    assert cli("plan", str(folder), "-o", str(tmp_path / "out")).returncode == 0
    vitok.extract([], tmp_path / "out", model="qwen3-vl-tiny", workers=0)  # the plan's media, not the default's
    store = vitok.open(tmp_path / "out")
    assert store.header.settings.video is not None and store.info("a.mp4")["video"]["indices"] == [0, 2, 5, 7]


@needs_av
def test_video_tars_are_told_from_their_members_and_a_mixed_tar_is_refused(tmp_path):
    import json

    from helpers import vitok as cli
    from test_archives import encode, sample_images, write_tar

    from vitok.inputs.readers import ReaderOptions
    from vitok.inputs.readers.webdataset import WebDatasetReader
    from vitok.inputs.sources import list_inputs
    from vitok.storage.plan import UnitRef

    def read(tar, medium):  # the samples a decode worker is given for one planned tar
        unit = UnitRef(0, "00000", "wds", "", 0, 1, None, 0, inline={"path": str(tmp_path / tar), "stem": "00000"})
        return {s.key: s for s in WebDatasetReader(ReaderOptions(media=medium)).samples(unit)}

    clip = video_clip(tmp_path / "clip.mp4", frames=4).read_bytes()
    jpeg = encode(sample_images(1)[0], "JPEG")
    failed = json.dumps({"status": "failed_to_download", "error_message": "HTTP Error 404"}).encode()
    audio = clip[:4] + b"ftypM4A " + clip[12:]  # an m4a's box: never taken for a video by its bytes
    tars = {"videos/00000.tar": [("0", {"json": failed}), ("1", {"mp4": clip, "json": b"{}"})],  # video2dataset's
            "unnamed/00000.tar": [("0", {"bin": clip, "txt": b"a clip, its member named .bin"})],  # by content
            "thumbs/00000.tar": [("0", {"jpg": jpeg, "mp4": clip})],  # a video with its thumbnail: a video sample
            "images/00000.tar": [("0", {"jpg": jpeg, "m4a": audio})],
            "mixed/00000.tar": [("0", {"jpg": jpeg}), ("1", {"mp4": clip})]}
    for name, samples in tars.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write_tar(tmp_path / name, samples)
    media = {name.split("/")[0]: list_inputs([str(tmp_path / name.split("/")[0])]).media for name in tars
             if not name.startswith("mixed")}
    assert media == {"videos": "video", "unnamed": "video", "thumbs": "video", "images": "image"}
    with pytest.raises(UsageError, match="image and video samples .*one store holds one kind") as refused:
        list_inputs([str(tmp_path / "mixed")])
    assert "\n" not in str(refused.value) and "mixed/00000.tar [0.jpg]" in str(refused.value)
    result = cli("extract", str(tmp_path / "mixed"), "-o", str(tmp_path / "out"), "--model", "qwen3-vl-tiny")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    # a medium named: the other medium's samples are recorded as skipped, naming the flag that reads them
    listing = list_inputs([str(tmp_path / "mixed")], input_format="wds")
    assert listing.media == "image"
    for medium, skipped, flag in (("image", "00000/1", "--input-format video"),
                                  ("video", "00000/0", "--input-format wds")):
        samples = read("mixed/00000.tar", medium)
        assert samples[skipped].skip.endswith(f"extract it into another store with {flag}")
        assert [k for k, s in samples.items() if s.skip is None] == [k for k in samples if k != skipped]
    unnamed = read("unnamed/00000.tar", "video")["00000/0"]
    assert unnamed.data == clip and unnamed.member == "0.bin"


@needs_av
@needs_torchcodec
def test_remote_videos_over_http_give_the_tokens_of_the_local_files(tmp_path, monkeypatch):
    import tempfile

    from helpers import serve_folder
    from test_archives import write_tar

    import vitok
    from vitok.inputs.sources import list_inputs

    pytest.importorskip("aiohttp", reason="fsspec reads https:// through aiohttp (the test extra has it)")
    folder = video_folder(tmp_path / "site", CLIPS)
    write_tar(folder / "00000.tar", [("0", {"mp4": (folder / "a.mp4").read_bytes(), "json": b"{}"})])
    scratch = tmp_path / "scratch"  # the temporary space remote videos are streamed to
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    common = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32")
    with serve_folder(folder) as (url, requests):
        (tmp_path / "list.txt").write_text(f"{url}/a.mp4\n{url}/b.webm?sig=x/y\n{url}/gone.mp4\n")  # (signed)
        summary = vitok.extract([], tmp_path / "remote", files_from=str(tmp_path / "list.txt"), **common)
        assert summary.ok == 2 and summary.failed == 1  # not there now: recorded as failed, a later run retries it
        assert "not found" in vitok.open(tmp_path / "remote").failed[f"{url}/gone.mp4"]
        (folder / "gone.mp4").write_bytes((folder / "a.mp4").read_bytes())
        again = vitok.extract([], tmp_path / "remote", files_from=str(tmp_path / "list.txt"), **common)
        assert again.ok == 1 and again.failed == 0
        update = vitok.extract([], tmp_path / "remote", files_from=str(tmp_path / "list.txt"), update=True, **common)
        assert update.ok == 0 and update.shards_written == 0  # a URL has no mtime: taken as unchanged, not gone
        assert list_inputs([f"{url}/00000.tar"]).media == "video"  # a remote tar of videos, told from its members
        assert any(r.startswith("GET /a.mp4") for r in requests)
    assert list(scratch.iterdir()) == []  # every local copy removed once decoded
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")  # a folder of a file system that has folders (a bucket's prefix)
    memory.pipe("/vidinputs/shards/00000.tar", (folder / "00000.tar").read_bytes())
    memory.pipe("/vidinputs/clips/a.mp4", (folder / "a.mp4").read_bytes())
    tars, clips = (list_inputs([f"memory://vidinputs/{name}/"], input_format="video") for name in ("shards", "clips"))
    assert (tars.kind, tars.media, tars.paths) == ("wds", "video", ["memory://vidinputs/shards/00000.tar"])
    assert clips.media == "video" and clips.keys == [["memory://vidinputs/clips/a.mp4"]]
    with pytest.raises(UsageError, match="no videos found"):
        list_inputs(["memory://vidinputs/nothing/"], input_format="video")
    memory.rm("/vidinputs", recursive=True)
    vitok.extract([str(folder)], tmp_path / "local", **common)
    remote, local = vitok.open(tmp_path / "remote"), vitok.open(tmp_path / "local")
    assert not remote.failed and remote.info(f"{url}/gone.mp4")["video"] == local.info("a.mp4")["video"]
    for name, key in (("a.mp4", f"{url}/a.mp4"), ("b.webm", f"{url}/b.webm?sig=x/y")):
        assert remote.info(key)["source"] == key and remote.info(key)["video"] == local.info(name)["video"]
        assert remote.info(key)["source_sha256"] == local.info(name)["source_sha256"]
        np.testing.assert_array_equal(remote[key], local[name])


def test_a_remote_video_larger_than_the_temporary_space_is_not_fetched(tmp_path, small_tmpfs):
    import hashlib
    from pathlib import Path

    from helpers import serve_folder

    from vitok.errors import InputUnavailableError
    from vitok.inputs.readers.remote import fetch_to_temporary

    pytest.importorskip("aiohttp", reason="fsspec reads https:// through aiohttp (the test extra has it)")
    (tmp_path / "big.mp4").write_bytes(b"\0" * (300 << 10))  # more than the 256 KiB tmpfs holds
    (tmp_path / "small.mp4").write_bytes(b"\1" * (100 << 10))
    with serve_folder(tmp_path) as (url, requests):
        with pytest.raises(InputUnavailableError, match=r"307200 bytes, more than the \d+ bytes free .*TMPDIR"):
            fetch_to_temporary(f"{url}/big.mp4", str(small_tmpfs))
        assert not any(r.startswith("GET /big.mp4") for r in requests)  # its size asked for, its bytes never
        with pytest.raises(InputUnavailableError, match="not found"):
            fetch_to_temporary(f"{url}/gone.mp4", str(small_tmpfs))
        fetched = fetch_to_temporary(f"{url}/small.mp4", str(small_tmpfs))
    assert fetched.size == 100 << 10 and fetched.sha256 == hashlib.sha256(b"\1" * (100 << 10)).hexdigest()
    assert Path(fetched.local).read_bytes() == b"\1" * (100 << 10)
    fetched.close()
    assert list(small_tmpfs.iterdir()) == []


@needs_av
@needs_torchcodec
def test_decode_gpu_decodes_videos_exactly_on_the_cpu_saying_so(tmp_path, caplog):
    import logging

    import vitok

    folder = video_folder(tmp_path / "videos", [("a.mp4", 8, (64, 64), 24)])
    common = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", device="cpu")
    with caplog.at_level(logging.WARNING, logger="vitok"):
        vitok.extract([str(folder)], tmp_path / "gpu", decode="gpu", **common)  # (images: a CUDA device needed)
    said = [r.getMessage() for r in caplog.records if "--decode gpu" in r.getMessage()]
    assert len(said) == 1 and "videos are decoded on the CPU, exactly" in said[0]
    vitok.extract([str(folder)], tmp_path / "exact", **common)
    gpu, exact = vitok.open(tmp_path / "gpu"), vitok.open(tmp_path / "exact")
    assert gpu.header.settings.to_json() == exact.header.settings.to_json()  # the store says exact: it is
    np.testing.assert_array_equal(gpu["a.mp4"], exact["a.mp4"])
    assert gpu.info("a.mp4")["decoder"] == exact.info("a.mp4")["decoder"] == "torchcodec"
    assert vitok.extract([str(folder)], tmp_path / "gpu", **common).shards_already_done == 1  # resumed without it


def test_copies_left_by_a_killed_process_are_removed_by_the_next_one_to_copy(tmp_path, monkeypatch):
    """A process killed with SIGKILL cannot remove its copy of a video (gigabytes, maybe): the next process that
    copies an input into the same folder removes it once untouched for ORPHANED_AFTER; a copy of a live process, or
    one touched lately (a process of another PID namespace may be using it), stays."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    from conftest import ROOT

    from vitok.inputs import temporary

    killed = """
import os, signal, sys
from vitok.inputs.temporary import temporary_copy
for kind in ("member", "remote", "member"):
    with temporary_copy(kind, sys.argv[1]) as out:
        out.write(b"frames" * 1000)
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", killed, str(tmp_path)], env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 3 and all(name.startswith(("vitok-member-", "vitok-remote-")) for name in left)
    old = time.time() - temporary.ORPHANED_AFTER - 60
    for name in left[:2]:
        os.utime(tmp_path / name, (old, old))
    with temporary.temporary_copy("member", str(tmp_path)):  # what a live process of another run holds
        pass
    live = {p.name for p in tmp_path.iterdir()} - set(left)
    for name in live:
        os.utime(tmp_path / name, (old, old))
    (tmp_path / "vitok-notes.txt").write_text("not a copy")
    os.utime(tmp_path / "vitok-notes.txt", (old, old))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(temporary, "_swept", set())
    with temporary.temporary_copy("remote") as new:  # the next process to copy (here: this one, looking afresh)
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({left[2], *live, "vitok-notes.txt",
                                                                 os.path.basename(new.name)})


def test_large_video_members_are_copied_to_the_temporary_space_and_never_left_there(tmp_path, small_tmpfs,
                                                                                     monkeypatch):
    import tempfile
    import tracemalloc
    from pathlib import Path

    from test_archives import write_tar

    from vitok.inputs.readers import ReaderOptions, UnitReadError, webdataset
    from vitok.storage.plan import UnitRef

    monkeypatch.setattr(tempfile, "tempdir", str(small_tmpfs))  # 256 KiB
    monkeypatch.setattr(webdataset, "SPOOL_BYTES", 1 << 10)
    head = b"\0\0\0\x18ftypisom"  # any bytes: the reader does not decode
    write_tar(tmp_path / "00000.tar", [(str(n), {"mp4": head + bytes([n]) * size})  # the last: more than the space
                                       for n, size in ((0, 40 << 10), (1, 40 << 10), (2, 300 << 10))])
    unit = UnitRef(0, "00000", "wds", "", 0, 1, None, 0,
                   inline={"path": str(tmp_path / "00000.tar"), "stem": "00000"})
    reader = webdataset.WebDatasetReader(ReaderOptions(media="video"))
    samples = reader.samples(unit)
    first = next(samples)  # (the next sample's member is read, and copied, before this one is handed on)
    assert first.data is None and Path(first.local).read_bytes() == head + bytes([0]) * (40 << 10)
    samples.close()  # a reader stopped early: the copy it held is removed; the sample's is the taker's
    assert [p.name for p in small_tmpfs.iterdir()] == [first.local.rsplit("/", 1)[-1]]
    first.discard()
    write_tar(tmp_path / "big.tar", [("0", {"mp4": head + bytes(32 << 20)})])
    big = UnitRef(0, "big", "wds", "", 0, 1, None, 0, inline={"path": str(tmp_path / "big.tar"), "stem": "big"})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for medium in ("video", "image"):  # copied a block at a time, or (a video in a store of images) never read
        tracemalloc.start()
        for sample in webdataset.WebDatasetReader(ReaderOptions(media=medium)).samples(big):
            sample.discard()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 6 << 20, (medium, peak)  # (a few 1 MiB blocks, whatever the member's size)
    monkeypatch.setattr(tempfile, "tempdir", str(small_tmpfs))
    with pytest.raises(UnitReadError, match="cannot copy member 2.mp4 .* to the temporary space") as full:
        for sample in reader.samples(unit):
            sample.discard()
    assert full.value.failed and list(small_tmpfs.iterdir()) == []  # retried by a later run; no partial copy
