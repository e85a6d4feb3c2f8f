"""``vitok bench --sections s3``: a store written into S3 — requests and bytes per committed shard, and the commit's
throughput against a plain upload of the same bytes to the same server.

Against ``--s3-url s3://BUCKET/PREFIX`` (the client's own configuration: ``AWS_*``, a profile) when given; else a
moto server started here on loopback (``moto[server]``, the test extra), which measures the protocol's requests and
vitok's own overhead, not a network or a service. Shards are synthetic tokens of ``--s3-shard-mb`` each, written
through the real sink and commit (``storage.shards.commit`` over ``storage.s3.S3Root``); every request is counted by
the client's own events. Each shard's commit is timed beside a plain ``upload_file`` of a copy of the same bytes, on
the same client and server, the two in turn and in alternating order (neither gets the warmer cache or the quieter
moment); the row gives the ratio of the sums, the per-shard ratios' median and range, where the commit's time went
(data requests, the sidecar, any other request; the checksum's time alone, though it runs while the data is sent)
and the load average.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from .common import row


def _server():
    """A moto server on a free loopback port and its endpoint, or None without moto[server]."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None, None
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def run(args, tmp: Path) -> None:
    import os

    import numpy as np

    from ..pipeline.sink import ShardSink
    from ..pipeline.types import EncodedBatch
    from ..storage import RunHeader, get_format, new_store
    from ..storage.files import checksum
    from ..storage.format import FeatureLayout, row_offsets
    from ..storage.layout import shard_name
    from ..storage.records import ImageRecord, ModelSettings, Settings
    from ..storage.roots import store_root
    from ..version import __version__

    server, endpoint = (None, None) if args.s3_url else _server()
    if not args.s3_url and server is None:
        print("# s3: needs --s3-url or moto[server] (pip install 'vitok[test]'); skipped", flush=True)
        return
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    try:
        if server is not None:
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1")
        url = args.s3_url or "s3://vitok-bench/feats"
        root = store_root(f"{url.rstrip('/')}/{uuid.uuid4().hex[:8]}")
        client = root.client
        if server is not None:
            client.create_bucket(Bucket=root.bucket)
        counts, sent = Counter(), [0]

        def count(request, **_):
            counts[request.method] += 1
            body = request.body
            sent[0] += len(body) if isinstance(body, (bytes, bytearray)) else int(request.headers.get(
                "Content-Length") or 0)

        client.meta.events.register("before-send.s3", count)
        spent: Counter = Counter()  # seconds per kind of request of the commit (data, sidecar, other)
        began: dict = {}

        def before(model, params, **_):  # (params: the request, its path holding the key)
            kind = "sidecar" if str(params.get("url_path", "")).split("?")[0].endswith(".json") else (
                "data" if model.name in ("PutObject", "UploadPart", "CreateMultipartUpload",
                                         "CompleteMultipartUpload") else model.name)
            began[threading.get_ident()] = kind, time.perf_counter()

        def after(**_):
            kind, started = began.pop(threading.get_ident(), ("", 0.0))
            if timing[0] and kind:
                spent[kind] += time.perf_counter() - started

        timing = [False]
        client.meta.events.register("before-call.s3", before)
        client.meta.events.register("after-call.s3", after)
        dim, rows = 1024, 64
        images = max(1, int(args.s3_shard_mb * 2**20 // (rows * dim * 2)))
        settings = Settings(ModelSettings("synthetic", weights="none", config={"spatial_merge_size": 2}),
                            features=("merged",), store_dtype="float16", format="hdf5",
                            token_order={"merged": "raster"})
        root.prepare()
        new_store(root, RunHeader(settings, __version__, time.strftime("%F")))
        counts.clear()
        sent[0] = 0
        rng = np.random.default_rng(0)
        commits, plains, sizes, checksums = [], [], [], []
        load = os.getloadavg()[0]
        for shard in range(args.s3_shards):
            sink = ShardSink(root, get_format("hdf5"), shard_name(shard), {"merged": FeatureLayout(dim)}, "float16",
                             None, "bench")
            records = [ImageRecord(f"img{shard:04d}{i:06d}", "ok", "synthetic", grid=[1, 2, 2 * rows])
                       for i in range(images)]
            tokens = rng.standard_normal((images * rows, dim), dtype=np.float32).astype(np.float16)
            sink.add_batch(EncodedBatch(shard, records, {"merged": tokens}, {"merged": [rows] * images}))
            sink.writer.finish(sink.keys, {f: row_offsets(r) for f, r in sink.rows.items()},
                               np.array(sink.grids, dtype=np.int32).reshape(-1, 3))  # only the commit is timed
            sizes.append(sink.tmp.stat().st_size)
            plain = tmp / f"plain-{shard}.bin"
            shutil.copyfile(sink.tmp, plain)  # the same bytes, uploaded plainly
            started = time.perf_counter()
            checksum(sink.tmp)
            checksums.append(time.perf_counter() - started)
            for first in ((False, True) if shard % 2 else (True, False)):  # the order alternates: neither is favoured
                if first:
                    timing[0] = True
                    started = time.perf_counter()
                    sidecar = _commit(sink, RunHeader(settings, "", "").fingerprint)
                    commits.append(time.perf_counter() - started)
                    timing[0] = False
                    assert sidecar is not None
                else:
                    before_plain = dict(counts), sent[0]
                    plains.append(_plain_seconds(client, root, plain, shard))
                    counts.clear()
                    counts.update(before_plain[0])
                    sent[0] = before_plain[1]
        per_shard = {method: n / args.s3_shards for method, n in counts.items()}
        sent_per_shard = sent[0] / args.s3_shards
        total = sum(sizes)
        ratios = sorted(p / c for p, c in zip(plains, commits))
        ms = {f"{kind}_ms": 1000 * seconds / args.s3_shards for kind, seconds in spent.items()}
        row("s3", f"commit of {args.s3_shards} HDF5 shards of {total / len(sizes) / 2**20:.0f} MB "
            f"({'moto on loopback' if server else url}), each beside a plain upload of its bytes",
            requests_per_shard=sum(per_shard.values()), **{f"{m.lower()}_per_shard": v for m, v in per_shard.items()},
            mb_sent_per_shard=sent_per_shard / 2**20, shard_mb=total / len(sizes) / 2**20,
            vitok_mb_s=total / 2**20 / sum(commits), plain_mb_s=total / 2**20 / sum(plains),
            ratio=sum(plains) / sum(commits), ratio_median=ratios[len(ratios) // 2], ratio_min=ratios[0],
            ratio_max=ratios[-1], commit_ms=1000 * sum(commits) / len(commits),
            plain_ms=1000 * sum(plains) / len(plains), **ms,
            checksum_ms=1000 * sum(checksums) / len(checksums), load_average=max(load, os.getloadavg()[0]))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if server is not None:
            server.stop()


def _commit(sink, fingerprint: str):
    """``ShardSink.commit`` without finishing the data again (the bench finished it before timing)."""
    from ..storage import shards
    from ..storage.records import Sidecar, UnitInfo

    sidecar = Sidecar(shard=sink.shard, format=sink.fmt.name, data=sink.fmt.data_name(sink.shard), files={},
                      features={f: int(sum(r)) for f, r in sink.rows.items()}, records=sink.records,
                      fingerprint=fingerprint, unit=UnitInfo(kind="ray"), part="0/1")
    return sidecar if shards.commit(sink.out, sink.fmt, sink.tmp, sidecar) else None


def _plain_seconds(client, root, path: Path, shard: int) -> float:
    """Seconds to upload a file plainly: boto3's ``upload_file`` (multipart above vitok's threshold, in parts of
    vitok's size), on the same client and server; the file is removed after."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=root.multipart_bytes, multipart_chunksize=root.part_bytes)
    started = time.perf_counter()
    client.upload_file(str(path), root.bucket, root.key(f"plain/{shard}"), Config=config)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds
