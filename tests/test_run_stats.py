"""What a run says about itself: the verdict naming the limiting stage (a pure function of the figures), and the
phases and stage rates recorded in the summary, in OUT/stats and shown by ``vitok info``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vitok.run.run_stats import RunStats, StageMeter, StageRates, describe, latest_stats, verdict

STARTED = {"imports": 2.0, "plan": 0.3, "weights_read": 1.0, "first_batch_done": 3.0}


def stats(device="cuda", decode="exact", **rates) -> RunStats:
    return RunStats(dict(STARTED), StageRates(**({"workers": 15} | rates)), device=device, decode=decode)


def test_a_decode_bound_gpu_run_names_the_busy_workers_the_idle_gpu_and_what_would_help():
    line = verdict(stats(decode_busy=0.97, encoder_busy=0.38, data_wait=0.6), 100.0)
    assert line.startswith("decode-bound: 15 workers 97 % busy, GPU 38 % busy")
    assert "--decode gpu" in line and "more cores" in line
    # already decoding on the GPU: only more cores remain
    line = verdict(stats(decode="gpu", decode_busy=0.95, encoder_busy=0.5, data_wait=0.4), 100.0)
    assert line.startswith("decode-bound") and "--decode gpu" not in line and "more cores" in line


def test_an_encoder_bound_run_says_so_and_on_a_cpu_suggests_bfloat16():
    line = verdict(stats(decode_busy=0.4, encoder_busy=0.96, encoder_img_s=812.0), 100.0)
    assert line.startswith("encoder-bound: GPU 96 % busy at 812.0 img/s")
    line = verdict(stats(device="cpu", workers=0, decode_busy=0.1, encoder_busy=0.9), 100.0)
    assert line.startswith("encoder-bound: encoder 90 % busy") and "--dtype bfloat16" in line


def test_writer_input_and_loop_bound_runs():
    assert verdict(stats(writer_busy=0.95, writer_mb_s=180.0, encoder_busy=0.5), 100.0).startswith(
        "writer-bound: writing 180 MB/s")
    # waiting for images while the workers idle: reading, not decoding
    assert verdict(stats(decode_busy=0.2, encoder_busy=0.1, data_wait=0.8), 100.0).startswith("input-bound")
    assert verdict(stats(decode_busy=0.3, encoder_busy=0.25, writer_busy=0.1, data_wait=0.05), 100.0).startswith(
        "loop-bound")


def test_a_short_run_is_start_up_bound_and_names_its_largest_phases():
    line = verdict(stats(decode_busy=0.97, encoder_busy=0.3), 8.0)  # 5 s of 8 s before the first batch
    assert line.startswith("start-up-bound: 5.0 s of 8.0 s") and "imports 2.0 s" in line
    assert line.index("imports") < line.index("weights read") < line.index("plan")


def test_a_ray_run_is_judged_by_its_pools_not_by_the_drivers_wait_for_the_cluster():
    """Under --engine ray the driver waits for the cluster most of the time: that wait alone is no input-bound run;
    the busier pool names the limit, and a driver that hardly waits limits the run itself."""
    def ray(**rates) -> RunStats:
        return RunStats(dict(STARTED), StageRates(**({"workers": 6, "encoders": 2} | rates)), device="cuda",
                        engine="ray")

    line = verdict(ray(decode_busy=0.3, encoder_busy=0.7, encoder_img_s=40.0, data_wait=0.8), 100.0)
    assert line.startswith("encoder-bound: 2 encode actors (GPU) 70 % busy at 40.0 img/s each, 6 decode workers")
    assert "more GPUs" in line
    line = verdict(ray(decode_busy=0.9, encoder_busy=0.4, data_wait=0.6), 100.0)
    assert line.startswith("decode-bound: 6 decode workers 90 % busy") and "more CPUs" in line
    assert verdict(ray(decode_busy=0.2, encoder_busy=0.3, data_wait=0.05), 100.0).startswith("driver-bound")
    assert verdict(ray(decode_busy=0.1, encoder_busy=0.2, data_wait=0.9), 100.0).startswith("input-bound")
    # the actors' mean share: two actors busy 3 s each in a 4 s steady state are 75 % busy, at 1 img/s each
    meter = StageMeter("cpu", 6, encoders=2)
    meter.batch_launched(1, 0.5)  # the first batch back: the steady state starts
    meter._steady["t"] -= 4.0
    meter.batch_launched(3, 3.0)
    meter.batch_launched(3, 3.0)
    rates = meter.rates(0.0, 0, 0.0)
    assert rates.encoders == 2 and rates.encoder_busy == pytest.approx(0.75, abs=0.01)
    assert rates.encoder_img_s == pytest.approx(1.0)
    lines = describe({"phases": {"ray_init": 4.2, "plan": 0.1}, "stages": ray().stages.__dict__})
    assert lines[0] == "start-up   ray init 4.20 s, plan 0.10 s" and "encoders (2, mean)" in lines[1]


class FakeEvent:
    """A CUDA event's interface on a clock of our choosing: which batches' device time is counted, and when."""

    def __init__(self, at: float, ready: bool = True) -> None:
        self.at, self.ready = at, ready

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.ready and end.ready, "read an event that had not completed"
        return (end.at - self.at) * 1e3

    def query(self) -> bool:
        return self.ready

    def synchronize(self) -> None:
        self.ready = True


def test_device_busy_time_counts_queued_batches_once_and_never_waits_for_an_event():
    meter = StageMeter("cuda", workers=4)
    meter.batch_launched(8, 0.01, FakeEvent(0.0), FakeEvent(1.0))
    meter.batch_launched(8, 0.01, FakeEvent(0.5), late := FakeEvent(2.0, ready=False))  # queued behind the first
    meter.batch_done()  # the first came back; the second's end event has not completed: not read
    assert meter.device_busy == pytest.approx(1.0) and "first_batch_done" in meter.phases
    meter.batch_done()
    assert meter.device_busy == pytest.approx(1.0)
    late.ready = True
    meter._account(wait=False)
    assert meter.device_busy == pytest.approx(2.0)  # 1.0 -> 2.0, not 0.5 -> 2.0: the overlap counted once
    assert meter.encoded_images == 16


def photos(folder, count=6):
    folder.mkdir()
    for i in range(count):
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((60 + 8 * i, 80, 3)) * 255).astype("uint8")).save(folder / f"{i}.jpg")


def test_a_run_records_its_phases_and_stages_in_the_summary_the_stats_file_and_info(tmp_path):
    import vitok
    from vitok.cli.app import app

    verify = vitok.verify
    photos(tmp_path / "in")
    summary = vitok.extract([str(tmp_path / "in")], tmp_path / "out", model="qwen3-vl-tiny", workers=0,
                            token_budget=200)
    assert {"plan", "workers_ready", "first_batch_ready", "first_batch_done"} <= set(summary.phases)
    assert summary.phases["first_batch_ready"] <= summary.phases["first_batch_done"] <= summary.seconds
    assert summary.stages["workers"] == 0 and summary.stages["encoder_busy"] > 0
    assert summary.stages["writer_mb_s"] > 0 and 0 <= summary.stages["data_wait"] <= 1
    assert summary.bottleneck.split(":")[0] in ("start-up-bound", "encoder-bound", "decode-bound", "loop-bound",
                                                "writer-bound", "input-bound")
    recorded = latest_stats(tmp_path / "out")
    assert recorded["bottleneck"] == summary.bottleneck and recorded["images"] == 6
    assert json.loads(json.dumps(summary.to_dict()))["phases"] == summary.phases
    result = CliRunner().invoke(app, ["info", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "start-up" in result.output and "stages" in result.output and summary.bottleneck in result.output
    assert describe(recorded)[-1] == f"limit      {summary.bottleneck}"
    # the stats folder is no part of the store: verify stays clean
    report = verify(tmp_path / "out")
    assert report.clean and not report.leftovers


def test_import_time_counts_only_for_a_process_started_for_the_run(tmp_path, monkeypatch):
    """A library caller's process may be hours old: its age is no import time, and no run of it is start-up-bound
    for that reason; the CLI's process is."""
    import vitok
    from vitok.run import run_stats

    photos(tmp_path / "in", count=2)
    monkeypatch.setattr(run_stats, "process_age", lambda: 3600.0)
    monkeypatch.setitem(run_stats._ENTRY_POINT, "cli", False)
    summary = vitok.extract([str(tmp_path / "in")], tmp_path / "lib", model="qwen3-vl-tiny", workers=0)
    assert "imports" not in summary.phases and "3600" not in summary.bottleneck
    run_stats.started_by_cli()
    summary = vitok.extract([str(tmp_path / "in")], tmp_path / "cli", model="qwen3-vl-tiny", workers=0)
    assert summary.phases["imports"] == 3600.0 and summary.bottleneck.startswith("start-up-bound")
