"""The data scan on a large folder: checking every file in forked processes and finding look-alike pairs in a
k-d tree, against the scan's previous way (threads for the checks, dHash buckets for the pairs), and a re-scan
that finds every file in the folder's scan record (data/scan_record.py), one sitting.

    python benchmarks/scan.py --work DIR [--images 10000,100000] [--repeats 2] [--no-record]

The folder: benchmarks/large_folder.py's generated 64×64 grey gratings under noise (10 classes, 80/20 split;
small PNGs, where the check of a file is mostly Python). Each measurement is `scan_dataset(DIR)` in a fresh
Python process with torch imported first (as a `transferkit train` scans); the two ways alternate, and each
row is the median of --repeats. "threads + buckets" sets folders.checks.SCAN_PROCESSES_FROM and
fingerprint.NEAR_SEARCH_FROM above the folder's size, which is the code before the change; both run with the
scan record off (TRANSFERKIT_SCAN_CACHE=off). "re-scan" is the scan as it is with a record made by two untimed
scans before (in a folder under --work). The pairs columns time `same_picture_pairs` alone on the scan's own
fingerprints, both ways, in the same process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, environment_line, publish, table  # noqa: E402
from large_folder import generate  # noqa: E402

MEASURE = """
import json, sys, time
import torch  # noqa: F401 - a training run has it loaded when it scans
from transferkit.data import fingerprint, folders
if sys.argv[2] == "before":
    folders.checks.SCAN_PROCESSES_FROM = fingerprint.NEAR_SEARCH_FROM = 10 ** 12
t = time.perf_counter()
scan = folders.scan_dataset(sys.argv[1])
result = {"scan s": time.perf_counter() - t, "images": len(scan.train) + len(scan.val)}
if sys.argv[2] == "re-scan":
    from transferkit.data.scan_record import ScanRecord, scan_settings
    settings = scan_settings(folders.checks.MIN_SIDE, folders.checks.SCAN_SHORTER_SIDE)
    result["recorded"] = len(ScanRecord(scan.root, settings).entries)
if sys.argv[3] == "pairs":
    for way, near_from in (("pairs s, buckets", 10 ** 12), ("pairs s, k-d tree", 2)):
        fingerprint.NEAR_SEARCH_FROM = near_from
        t = time.perf_counter()
        result[way + " (found)"] = len(fingerprint.same_picture_pairs(scan.fingerprints))
        result[way] = time.perf_counter() - t
print(json.dumps(result))
"""


def measure(data: Path, way: str, pairs: bool, records: Path) -> dict:
    env = dict(os.environ, TRANSFERKIT_SCAN_CACHE=str(records) if way == "re-scan" else "off")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(data), way, "pairs" if pairs else "-"],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = benchmark_parser(__doc__, work=None, work_help="folder for the generated images (reused when complete)")
    ap.add_argument("--images", default="10000,100000")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md as it is")
    args = ap.parse_args()
    machine = environment_line()
    rows = []
    for n in (int(x) for x in args.images.split(",")):
        data = generate(Path(args.work) / f"gratings-{n}", n)
        records = Path(args.work) / "scan-records"
        for _ in range(2):  # the record; the second also records files modified just before the first
            measure(data, "re-scan", False, records)
        runs = {"before": [], "after": [], "re-scan": []}
        for r in range(args.repeats):
            for way in runs:
                runs[way].append(measure(data, way, (r == 0 and way == "after"), records))
                print(n, way, runs[way][-1], flush=True)
        before, after, again = (statistics.median(x["scan s"] for x in runs[way]) for way in runs)
        first = runs["after"][0]
        rows.append({"images": n, "threads + buckets s": before, "processes + k-d tree s": after,
                     "speed-up": before / after, "re-scan s": again, "re-scan speed-up": after / again,
                     "pairs s, buckets": first["pairs s, buckets"],
                     "pairs s, k-d tree": first["pairs s, k-d tree"],
                     "pairs found (buckets / k-d tree)":
                         f"{first['pairs s, buckets (found)']} / {first['pairs s, k-d tree (found)']}"})
    text = (f"## Data scan at scale\n\n{machine}. Command: `python benchmarks/scan.py --work DIR --images "
            f"{args.images} --repeats {args.repeats}` (generated 64×64 grey PNG gratings, 10 classes; each scan in "
            "a fresh process with torch imported; medians of the repeats, the ways alternated; the first two with "
            "the scan record off; re-scan: every file found unchanged in the folder's scan record; the pairs "
            "columns: `same_picture_pairs` alone on the scan's fingerprints).\n\n"
            + table(rows, ["images", "threads + buckets s", "processes + k-d tree s", "speed-up", "re-scan s",
                           "re-scan speed-up", "pairs s, buckets",
                           "pairs s, k-d tree", "pairs found (buckets / k-d tree)"]))
    publish("scan", text, record=not args.no_record)


if __name__ == "__main__":
    main()
