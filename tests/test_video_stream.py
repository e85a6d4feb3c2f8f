"""Long videos in bounded memory: a video of more patches than ``--video-chunk-patches`` is decoded, patchified and
encoded in pieces of whole temporal steps, and its record equals the whole video's bit for bit (tokens, pooled rows,
frames, content id); the limits that still refuse a video from its metadata; a stream that ends before its metadata
says; kill -9 in the middle of a video cut in time. Every clip is encoded here with PyAV."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import video_clip
from test_video import QWEN3_HUB, QWEN25_HUB, needs_av, needs_torchcodec

from vitok.errors import ImageError
from vitok.inputs.video_config import MAX_VIDEO_PATCHES, VideoConfig
from vitok.inputs.video_decode import VideoInfo
from vitok.inputs.video_preprocess import VideoPreprocessor, steps_per_piece

BUDGET = 32  # patches per encoder batch: two temporal steps of the clips below (4 x 4 patches a step)
# (family, the checkpoint's video settings file, its settings, sampling) -> 12 and 7 temporal steps, the last padded
# and how the pooled stores pool (per video for one, per step for the other)
FAMILIES = [("qwen2_5_vl", "preprocessor_config.json", QWEN25_HUB, {}, dict(pool="mean")),
            ("qwen3_vl", "video_preprocessor_config.json", QWEN3_HUB, {"num_frames": 13}, dict(pool="max",
                                                                                               pool_steps=True))]


def test_pieces_keep_the_encoders_step_groups_and_fit_the_chunk():
    assert steps_per_piece(12, 16, None, 32) == 12  # never cut
    assert steps_per_piece(12, 16, 10**6, 32) == 12  # it fits
    assert steps_per_piece(12, 16, 32, 32) == 2  # two steps: the encoder's group
    assert steps_per_piece(12, 16, 100, 32) == 6  # as many as fit (6.25), a multiple of the group (2)
    assert steps_per_piece(12, 16, 40, 64) == 4  # never less than one group
    assert steps_per_piece(3, 16, 20, 64) == 3  # the encoder takes the video whole: so does the decoder


@needs_av
@needs_torchcodec
@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"])
def test_pieces_are_the_whole_videos_patches_cut_at_its_steps(tmp_path, decoder):
    path = str(video_clip(tmp_path / "clip.mp4", frames=23, size=(64, 48)))
    config = VideoConfig.from_hf_video_processor_config(QWEN25_HUB, "qwen2_vl").replace(decoder=decoder)
    whole = VideoPreprocessor(config).load(path)
    pieces = list(VideoPreprocessor(config, chunk_patches=40, group_patches=BUDGET).load_pieces(path))
    assert whole.grid_thw == (12, 4, 4) and len(pieces) == 6  # 23 frames: the last step repeats frame 22
    assert all(piece.num_patches <= 40 and piece.piece.video_grid == whole.grid_thw for piece in pieces)
    assert [p.piece.first_step for p in pieces] == [0, 2, 4, 6, 8, 10] and [p.piece.last for p in pieces][-2:] == \
        [False, True]
    assert np.array_equal(np.concatenate([p.patches.numpy() for p in pieces]), whole.patches.numpy())
    assert pieces[-1].frames == whole.frames and all(p.frames is None for p in pieces[:-1])
    fits = list(VideoPreprocessor(config, chunk_patches=whole.num_patches, group_patches=BUDGET).load_pieces(path))
    assert len(fits) == 1 and fits[0].piece is None  # a video that fits is sent whole, as before


@pytest.mark.slow
@needs_av
@needs_torchcodec
@pytest.mark.parametrize("family, filename, settings, sampling, pooled", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_a_video_cut_in_time_gives_the_record_of_the_whole_video_bit_for_bit(tmp_path, family, filename, settings,
                                                                            sampling, pooled):
    from test_families import released_folder

    import vitok

    released_folder(tmp_path / "ckpt", family)
    (tmp_path / "ckpt" / filename).write_text(json.dumps(settings))
    folder = tmp_path / "videos"
    folder.mkdir()
    video_clip(folder / "long.mp4", frames=23, size=(64, 48))
    video_clip(folder / "short.mp4", frames=4, size=(64, 48), seed=1)  # fits: whole, batched as before
    features = ("merged", "deepstack") if family == "qwen3_vl" else ("merged", "patch")
    common = dict(model=str(tmp_path / "ckpt"), workers=0, store_dtype="float32", token_budget=BUDGET, **sampling)
    for name, extra in [("tokens", dict(features=features)), ("pooled", pooled)]:
        whole = vitok.extract([str(folder)], tmp_path / f"{name}-whole", video_chunk_patches=10**6, **common, **extra)
        cut = vitok.extract([str(folder)], tmp_path / f"{name}-cut", video_chunk_patches=BUDGET, **common, **extra)
        assert whole.ok == cut.ok == 2 and cut.images_encoded == 2
        a, b = vitok.open(tmp_path / f"{name}-whole"), vitok.open(tmp_path / f"{name}-cut")
        for key in ("long.mp4", "short.mp4"):
            assert a.info(key)["grid_thw"] == b.info(key)["grid_thw"] and a.info(key)["video"] == b.info(key)["video"]
            assert a.info(key)["content_id"] == b.info(key)["content_id"]
            for feature in extra.get("features", ("merged",)):
                x, y = a.get(key, feature), b.get(key, feature)
                assert x.dtype == np.float32 and x.tobytes() == y.tobytes(), (name, key, feature)
        assert a.info("long.mp4")["grid_thw"][0] >= 7 and vitok.verify(tmp_path / f"{name}-cut").clean
    # the pieces: at least three for this budget, as the store's decode workers cut them
    config = VideoConfig.from_hf_video_processor_config(settings, family.replace("_5", "")).replace(**sampling)
    pieces = list(VideoPreprocessor(config, BUDGET, BUDGET).load_pieces(str(folder / "long.mp4")))
    assert len(pieces) >= 3 and all(p.num_patches <= BUDGET for p in pieces)
    rows = a.info("long.mp4")["grid_thw"][0] if pooled.get("pool_steps") else 1
    assert b.get("long.mp4", "merged").shape[0] == rows  # pooled: one row per step, or per video


def test_limits_judge_the_metadata_and_let_long_videos_through():
    config = VideoConfig.from_hf_video_processor_config(QWEN25_HUB, "qwen2_vl")
    pre = VideoPreprocessor(config, chunk_patches=4096, group_patches=4096)
    long = VideoInfo(frame_count=600, fps=24.0, duration=25.0, width=640, height=360)  # 25 s, every frame kept
    indices, (height, width) = pre.plan(long)
    patches = len(indices) // 2 * (height // 14) * (width // 14)
    assert 1 << 18 < patches <= MAX_VIDEO_PATCHES  # refused before it was cut in time; processed now
    for info, reason in [(VideoInfo(10**9, 24.0, 10**9 / 24, 64, 48), "claims 1000000000 frames"),
                         (VideoInfo(100, 24.0, 10**7, 64, 48), "claims 10000000 seconds, more than --max-video-seco"),
                         (VideoInfo(6000, 24.0, 250.0, 640, 360), "more than --max-video-patches")]:
        with pytest.raises(ImageError, match=reason) as caught:
            pre.plan(info)
        assert "\n" not in str(caught.value)


def faststart_clip(path, frames: int):
    """An mp4 with its index first: cut short, its metadata still claims every frame."""
    import av

    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@needs_av
@needs_torchcodec
@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"])
def test_a_stream_shorter_than_its_metadata_is_skipped_after_some_pieces_and_leaves_no_half_record(tmp_path,
                                                                                                 decoder):
    import vitok

    folder = tmp_path / "videos"
    folder.mkdir()
    whole = faststart_clip(tmp_path / "whole.mp4", 40).read_bytes()
    (folder / "cut.mp4").write_bytes(whole[: len(whole) * 3 // 4])  # the index says 40 frames; the data holds fewer
    video_clip(folder / "ok.mp4", frames=12, size=(64, 48))
    summary = vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0, num_frames=40,
                            token_budget=16, video_chunk_patches=16, video_decoder=decoder)
    store = vitok.open(tmp_path / "out")
    assert summary.ok == 1 and summary.skipped == 1 and store.keys() == ["ok.mp4"]
    reason = store.skipped["cut.mp4"]
    assert "\n" not in reason and ("frame" in reason or "decode" in reason)
    assert vitok.verify(tmp_path / "out").clean


@pytest.mark.slow
@needs_av
@needs_torchcodec
def test_kill_9_in_the_middle_of_a_video_cut_in_time_then_rerun_gives_every_video_once(tmp_path):
    from helpers import vitok as cli
    from helpers import vitok_killed_at

    import vitok

    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(3):
        video_clip(folder / f"{i}.mp4", frames=32, size=(128, 96), seed=i)
    out = tmp_path / "out"
    args = ["extract", str(folder), "-o", str(out), "--model", "qwen3-vl-tiny", "--workers", "0", "--shard-size",
            "1", "--num-frames", "32", "--token-budget", "96", "--video-chunk-patches", "96", "--store-dtype",
            "float32", "--quiet"]
    # each video is 8 pieces, one encoder call each: killed as the third video's third piece begins, once the
    # first video is published (a video's shard is committed behind the next video's last piece)
    process = vitok_killed_at("vitok.encoder.inference:Encoder.encode", 8 + 8 + 3, *args, shards=out / "shards",
                              published=1)
    assert process.returncode == -9, process.stderr
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    assert 1 <= len(finished) < 3
    killed = vitok.open(out)  # what a reader sees meanwhile: whole videos only
    for key in killed.keys():
        t, h, w = killed.info(key)["grid_thw"]
        assert t == 16 and killed[key].shape[0] == t * h * w // 4
    assert cli(*args).returncode == 0
    assert all((out / "shards" / n).stat().st_mtime_ns == t for n, t in finished.items())  # never rewritten
    vitok.extract([str(folder)], tmp_path / "whole", model="qwen3-vl-tiny", workers=0, shard_size=1, num_frames=32,
                  token_budget=96, store_dtype="float32")
    resumed, whole = vitok.open(out), vitok.open(tmp_path / "whole")
    assert resumed.keys() == whole.keys() == [f"{i}.mp4" for i in range(3)] and vitok.verify(out).clean
    for key in whole.keys():
        assert resumed[key].tobytes() == whole[key].tobytes()
        assert resumed.info(key)["video"] == whole.info(key)["video"]


@pytest.mark.slow
@needs_av
@needs_torchcodec
def test_a_decode_worker_killed_mid_video_sends_no_piece_twice_and_a_video_that_always_kills_is_skipped(
        tmp_path, monkeypatch):
    import os
    import signal

    import vitok

    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        video_clip(folder / name, frames=24, size=(64, 48), seed=len(name) + ord(name[0]))
    common = dict(model="qwen3-vl-tiny", num_frames=24, token_budget=16, video_chunk_patches=16,
                  store_dtype="float32")
    vitok.extract([str(folder)], tmp_path / "clean", workers=0, **common)
    marker = tmp_path / "killed-once"
    pieces = VideoPreprocessor.load_pieces

    def dying(self, source):  # SIGKILL, as the out-of-memory killer or a decoder crash would, after some pieces
        for number, piece in enumerate(pieces(self, source)):
            once = source.endswith("a.mp4") and number == 3 and not marker.exists()
            if once:
                marker.touch()
            if once or (source.endswith("b.mp4") and number == 2):
                os.kill(os.getpid(), signal.SIGKILL)
            yield piece

    monkeypatch.setattr(VideoPreprocessor, "load_pieces", dying)
    summary = vitok.extract([str(folder)], tmp_path / "out", workers=1, **common)
    store, clean = vitok.open(tmp_path / "out"), vitok.open(tmp_path / "clean")
    assert marker.exists() and summary.ok == 2 and store.keys() == ["a.mp4", "c.mp4"]
    assert "SIGKILL" in store.skipped["b.mp4"] and "\n" not in store.skipped["b.mp4"]
    for key in ("a.mp4", "c.mp4"):
        assert store[key].tobytes() == clean[key].tobytes() and store.info(key)["video"] == clean.info(key)["video"]
    assert not vitok.verify(tmp_path / "out").problems


@needs_av
@needs_torchcodec
def test_a_store_made_when_the_patch_limit_was_lower_resumes_with_its_own_limit(tmp_path):
    import vitok

    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(2):
        video_clip(folder / f"{i}.mp4", frames=8, size=(64, 48), seed=i)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, model="qwen3-vl-tiny", workers=0, shard_size=1, max_video_patches=1 << 18)
    header = json.loads((out / "vitok.json").read_text())
    del header["options"]["max_video_patches"]  # as vitok wrote it when 262144 was the default: not recorded
    (out / "vitok.json").write_text(json.dumps(header))
    for data in (out / "shards").glob("shard-000001.*"):  # its second shard is not done yet
        data.unlink()
    summary = vitok.extract([str(folder)], out, model="qwen3-vl-tiny", workers=0)  # the resume
    assert summary.ok == 1 and summary.already_done == 1
    assert vitok.open(out).header.settings.video["max_video_patches"] == 1 << 18


@needs_av
@needs_torchcodec
def test_videos_of_a_tar_cut_in_time_give_the_tokens_of_the_loose_videos_whole(tmp_path):
    from test_archives import write_tar

    import vitok

    loose = tmp_path / "loose"
    loose.mkdir()
    samples = []
    for index, frames in enumerate([24, 6, 20]):  # each cut in 10 pieces (6 frames: 20 sampled, frames repeated)
        key = f"{index:09d}"
        video_clip(loose / f"{key}.mp4", frames=frames, size=(64, 48), seed=index)
        samples.append((key, {"mp4": (loose / f"{key}.mp4").read_bytes(), "json": b'{"status": "success"}'}))
    write_tar(tmp_path / "00000.tar", samples)
    common = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", num_frames=20, token_budget=16)
    summary = vitok.extract([str(tmp_path / "00000.tar")], tmp_path / "tar", input_format="video",
                            video_chunk_patches=16, **common)
    vitok.extract([str(loose)], tmp_path / "files", video_chunk_patches=10**6, **common)
    tar, files = vitok.open(tmp_path / "tar"), vitok.open(tmp_path / "files")
    assert summary.ok == 3 and tar.keys() == [f"00000/{i:09d}" for i in range(3)]
    for index in range(3):
        key = f"{index:09d}"
        assert tar[f"00000/{key}"].tobytes() == files[f"{key}.mp4"].tobytes()
        assert tar.info(f"00000/{key}")["video"] == files.info(f"{key}.mp4")["video"]
