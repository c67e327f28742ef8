"""S3 sensor tick cost against a raw paginated listing of the same prefix, on moto's S3 server on loopback.

    python benchmarks/s3_tick.py [--objects 20000] [--repeat 3]

Prints the median wall time of (a) a plain boto3 ListObjectsV2 pagination of the prefix, (b) a steady-state
tick of our poll (listing, format filter, cursor plan; nothing new), (c) a first tick that also fingerprints
the first 200 new objects (HEAD each), plus the cursor size. moto's server is far slower than real S3 at
listing (seconds per 10k keys), so the ratio (b)/(a) is the figure to read.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from moto.server import ThreadedMotoServer

from audience_pipeline.config import FeedConfig
from audience_pipeline.cursor import Cursor, plan_tick
from audience_pipeline.polling import poll_feed
from audience_pipeline.sources import S3DropSource

BUCKET, PREFIX = "bench", "drop/"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: client.put_object(Bucket=BUCKET, Key=f"{PREFIX}a{i:07d}.csv", Body=b"u\n"),
                          range(args.objects)))
        print(f"uploaded {args.objects:,} objects in {time.monotonic() - started:.0f} s")

        def raw_listing() -> int:
            count = 0
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX):
                count += len(page.get("Contents", ()))
            return count

        feed = FeedConfig(format="repro", source=f"s3://{BUCKET}/{PREFIX}")
        source = S3DropSource(client, f"s3://{BUCKET}/{PREFIX}")
        t = time.monotonic()
        first = poll_feed("bench", feed, source, Cursor())
        first_tick = time.monotonic() - t
        # a cursor that has seen everything: the steady state of a sensor ticking every ten minutes
        steady_cursor = plan_tick(list(source.list()), Cursor(), int(source.default_lookback_seconds * 1e9),
                                  args.objects).cursor
        steady_cursor.listed = first.listed

        raw_times, tick_times = [], []
        for _ in range(args.repeat):
            t = time.monotonic()
            assert raw_listing() == args.objects
            raw_times.append(time.monotonic() - t)
            t = time.monotonic()
            result = poll_feed("bench", feed, source, steady_cursor)
            tick_times.append(time.monotonic() - t)
            assert result.listed == args.objects and not result.deliveries
        raw, tick = statistics.median(raw_times), statistics.median(tick_times)
        print(f"raw paginated listing : {raw:7.2f} s")
        print(f"steady-state tick     : {tick:7.2f} s  ({tick / raw:.2f}x the raw listing)")
        print(f"first tick (200 HEADs): {first_tick:7.2f} s")
        print(f"cursor size           : {len(steady_cursor.dumps()):,} bytes")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
