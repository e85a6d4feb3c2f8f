"""``--decode gpu`` against exact decoding over varied JPEGs, through the whole CLI path in batches: per image, the
token cosine of the two stores and the pixel difference of the two decoders.

    python -m vitok.bench.decode_check --device cuda --images 600 --out results/     # on a GPU (nvJPEG)
    python -m vitok.bench.decode_check --device cpu --images 8                        # torchvision's CPU decoder

On a CPU, torchvision's CPU decoder (libjpeg-turbo) stands in for nvJPEG (the device check is lifted), so the routing,
the batched device stage and the comparison run everywhere; only a GPU measures nvJPEG itself. The JPEGs vary in
size (odd dimensions included), quality, chroma subsampling, grayscale, CMYK, progressive coding and EXIF
orientation; each file's name says what it is, so the worst images can be read off the report.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUBSAMPLING = {0: "444", 1: "422", 2: "420"}


@dataclass(frozen=True)
class Variant:
    width: int
    height: int
    mode: str  # RGB, L, CMYK
    subsampling: int  # PIL: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0
    quality: int
    progressive: bool
    orientation: int  # EXIF orientation, 1 = upright

    def name(self, index: int) -> str:
        coding = "prog" if self.progressive else "base"
        return (f"{index:04d}_{self.width}x{self.height}_{self.mode}_{SUBSAMPLING[self.subsampling]}_q{self.quality}_"
                f"{coding}_o{self.orientation}.jpg")


def variants(count: int, seed: int = 0, max_side: int = 1600) -> list[Variant]:
    """``count`` JPEG variants; every 8th a grayscale, every 20th a CMYK, every 10th progressive, every 5th
    rotated by EXIF; sizes from 33 to ``max_side`` pixels a side, odd ones included."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(33, max_side + 1, 2))
        mode = "L" if i % 8 == 3 else "CMYK" if i % 20 == 7 else "RGB"
        out.append(Variant(width, height, mode, int(rng.integers(0, 3)), int(rng.integers(40, 99)), i % 10 == 5,
                           int(rng.integers(2, 9)) if i % 5 == 1 else 1))
    return out


def render(variant: Variant, seed: int) -> bytes:
    """A photo-like picture (smooth fields, edges and some noise) encoded as the variant says."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((variant.width, variant.height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)
    bands = (np.arange(variant.height) // max(4, variant.height // 7)) % 2 == 0
    pixels[bands] *= 0.8  # edges
    pixels += rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if variant.mode != "RGB":
        image = image.convert(variant.mode)
    options = {"quality": variant.quality, "progressive": variant.progressive}
    if variant.mode == "RGB":
        options["subsampling"] = variant.subsampling
    if variant.orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = variant.orientation
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _write(job: tuple[Path, Variant, int]) -> Path:
    path, variant, seed = job
    path.write_bytes(render(variant, seed))
    return path


def make_folder(folder: Path, count: int, seed: int = 0, max_side: int = 1600, processes: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / v.name(i), v, seed * 100_003 + i) for i, v in enumerate(variants(count, seed, max_side))]
    if processes <= 1:
        return [_write(job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(_write, jobs, chunksize=8))


@contextlib.contextmanager
def device_decoding_allowed(device: str):
    """On a CPU, let --decode gpu run with torchvision's CPU decoder standing in for nvJPEG."""
    if not device.startswith("cpu"):
        yield
        return
    from ..run import job

    original = job.check_decode
    job.check_decode = lambda decode, device: None
    try:
        yield
    finally:
        job.check_decode = original


def extract_cli(folder: Path, out: Path, decode: str, args) -> None:
    """One run through the CLI's own code path (typer parses the options, as for a user)."""
    from ..cli.app import app

    argv = ["extract", str(folder), "-o", str(out), "--model", args.model, "--device", args.device,
            "--decode", decode, "--features", "merged", "--store-dtype", "float32", "--quiet", "--overwrite",
            "--max-pixels", str(args.max_pixels)]
    if args.token_budget:
        argv += ["--token-budget", str(args.token_budget)]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    code = app(argv, standalone_mode=False)
    if code:
        raise SystemExit(f"vitok extract --decode {decode} exited {code}")


def token_comparison(exact_store: Path, gpu_store: Path) -> dict:
    """Per image: min and mean cosine of the merged tokens; which decoder made the GPU store's pixels."""
    import torch

    import vitok

    exact, gpu = vitok.open(exact_store), vitok.open(gpu_store)
    per_image = {}
    for key in exact.keys():
        a, b = torch.from_numpy(exact[key]).double(), torch.from_numpy(gpu[key]).double()
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        per_image[key] = {"decoder": gpu.info(key)["decoder"], "min_cosine": cosine.min().item(),
                          "mean_cosine": cosine.mean().item(), "identical": bool(np.array_equal(exact[key], gpu[key]))}
    missing = sorted(set(exact.keys()) ^ set(gpu.keys()))
    return {"images": per_image, "keys_differ": missing, "skipped_exact": dict(exact.skipped),
            "skipped_gpu": dict(gpu.skipped)}


def pixel_comparison(paths: list[Path], device: str, model: str, max_pixels: int, batch: int = 16) -> dict[str, dict]:
    """Per routed image: mean and max absolute difference of the uint8 patches, decoded in batches on ``device``
    vs exactly on the CPU."""
    import torch

    from ..encoder.checkpoint import resolve_model
    from ..inputs.gpu_decode import decode_on_device
    from ..inputs.preprocess import Preprocessor

    config = resolve_model(model).preprocess.replace(max_pixels=max_pixels)
    exact, routing = Preprocessor(config), Preprocessor(config.replace(decode="gpu"))
    routed = []
    for path in paths:
        data = path.read_bytes()
        with contextlib.suppress(Exception):
            image = routing.load(data)
            if image.jpeg is not None:
                routed.append((path, data, image))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # PIL and torch release the GIL
        references = list(pool.map(lambda item: exact.load(item[1]).patches, routed))
    out = {}
    for start in range(0, len(routed), batch):
        group = routed[start:start + batch]
        decode_on_device([image for _, _, image in group], config, torch.device(device))
        for (path, _, image), expected in zip(group, references[start:start + batch]):
            if image.patches is None or image.patches.shape != expected.shape:
                out[path.name] = {"shape_differs": True}
                continue
            diff = (image.patches.cpu().float() - expected.float()).abs()
            out[path.name] = {"mean_abs": diff.mean().item(), "max_abs": diff.max().item()}
    return out


def summarise(tokens: dict, pixels: dict[str, dict]) -> dict:
    images = tokens["images"]
    routed = {k: v for k, v in images.items() if v["decoder"] == "nvjpeg"}
    others = {k: v for k, v in images.items() if v["decoder"] != "nvjpeg"}
    worst = sorted(routed.items(), key=lambda kv: kv[1]["min_cosine"])[:5]
    pixel_values = [v for v in pixels.values() if "mean_abs" in v]
    return {
        "images": len(images), "routed_to_device": len(routed), "exact_path": len(others),
        "exact_path_identical": sum(v["identical"] for v in others.values()),
        "mean_token_cosine": float(np.mean([v["mean_cosine"] for v in routed.values()])) if routed else None,
        "worst_token_cosine": min((v["min_cosine"] for v in routed.values()), default=None),
        "worst_images": [{"key": k, **v} for k, v in worst],
        "pixel_mean_abs": float(np.mean([v["mean_abs"] for v in pixel_values])) if pixel_values else None,
        "pixel_worst_mean_abs": max((v["mean_abs"] for v in pixel_values), default=None),
        "pixel_max_abs": max((v["max_abs"] for v in pixel_values), default=None),
        "pixel_shape_differs": sum("shape_differs" in v for v in pixels.values()),
        "keys_differ": tokens["keys_differ"],
        "skipped_differ": sorted(set(tokens["skipped_exact"]) ^ set(tokens["skipped_gpu"])),
    }


def run(folder: Path, work: Path, args) -> dict:
    paths = sorted(folder.glob("*.jpg"))
    with device_decoding_allowed(args.device):
        extract_cli(folder, work / "exact", "exact", args)
        extract_cli(folder, work / "gpu", "gpu", args)
    summary = summarise(token_comparison(work / "exact", work / "gpu"),
                        pixel_comparison(paths, args.device, args.model, args.max_pixels))
    summary |= {"device": args.device, "model": args.model, "max_pixels": args.max_pixels}
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vitok.bench.decode_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="qwen3-vl-2b")
    p.add_argument("--dtype", default=None)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--max-side", type=int, default=1600)
    p.add_argument("--max-pixels", type=int, default=200704)
    p.add_argument("--token-budget", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for decode_check.json (default: print only)")
    return p


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        make_folder(folder, args.images, max_side=args.max_side, processes=min(16, os.cpu_count() or 1))
        summary = run(folder, Path(tmp), args)
    text = json.dumps(summary, indent=1)
    print(text, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "decode_check.json").write_text(text)
    bad = summary["keys_differ"] or summary["skipped_differ"] or summary["pixel_shape_differs"] or (
        summary["exact_path_identical"] != summary["exact_path"])
    return 1 if bad or (summary["worst_token_cosine"] or 1.0) < 0.99 else 0


if __name__ == "__main__":
    raise SystemExit(main())
