"""`transferkit serve` under load on loopback: 1, 4 and 16 concurrent clients, each sending single images.

    python benchmarks/serve.py [--work DIR] [--requests 300] [--seconds 60] [--repeats 5] [--pair-seconds 6]
                               [--max-batch N] [--sweep 1,2,8]

The server is the real CLI (`transferkit serve MODEL.onnx --port 0`, ONNX engine) in its own process. The
model is efficientnet_lite0 (ImageNet weights, a 2-class head; the head's values do not change the cost)
exported to ONNX at its own 224 px; the images are real ELPV cells (300×300 PNG) sent as multipart files
(and, in three more pairs on the same server, as raw bodies).
Each phase is bounded by a number of requests and by time, and the script stops the server itself.

Reported per phase: throughput, p50/p99 latency, errors (must be 0), the mean batch the server formed and
how busy its engine was (from /health), CPU per image and the server's RSS. The engine's bare rate is the
same ONNX model with the same session options and layout as the server's (lanes side by side, threads per
lane, no spinning) run in this process on already preprocessed batches (no decoding, no HTTP), by batch
size; the one-pass layout (one lane, all cores) is printed beside it. --sweep repeats the bare/served
pairs at other --max-batch values, each with a server of its own, so the default is chosen on measured
throughput; so do the one-pass layout and a server with its access log on. The served CPU is split by
thread (inference lanes, decode pool, event loop: their OS-level names) and the clients. The target (16 clients at >= 80% of the bare
rate at the server's --max-batch) compares images per second, as the issue states it; the two alternate in
equal time slices so that each ratio compares neighbours, and each pair records how many cores other
processes took meanwhile: on a shared box the served phase, with more threads, can win a larger share of
the cores than the bare one, so a verdict reached beside other work says so.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).parent))
from common import (benchmark_parser, elpv, environment_line, proc_cpu_seconds, table, thread_cpu_by_role,  # noqa: E402
                    publish)

CLIENTS = (1, 4, 16)
PAIR_REQUESTS = 20_000  # the served half of a pair is bounded by --pair-seconds first, and by this
SHARED_CORES = 0.25  # others' mean cores above which a pair was measured beside other work


def main() -> None:
    from transferkit.serve import ServeOptions

    ap = benchmark_parser(__doc__, model=True)
    ap.add_argument("--requests", type=int, default=300, help="requests per phase (at most)")
    ap.add_argument("--seconds", type=float, default=60, help="seconds per phase (at most)")
    ap.add_argument("--repeats", type=int, default=5, help="alternations of bare engine / 16 clients")
    ap.add_argument("--pair-seconds", type=float, default=6, help="seconds of each half of an alternation")
    ap.add_argument("--max-batch", type=int, default=ServeOptions.max_batch)
    ap.add_argument("--max-wait-ms", type=float, default=ServeOptions.max_wait_ms)
    ap.add_argument("--sweep", default="1,2,8", help="other --max-batch values to pair (empty: none)")
    ap.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    work = Path(args.work)
    model = export_model(args.model, work / f"serve-{args.model}.onnx")
    images = [(p.name, p.read_bytes()) for p in sorted((elpv(work / "elpv2", 2) / "val").rglob("*.png"))[:64]]
    by_batch = {n: bare_rate(model, images, n, seconds=4) for n in (1, 2, 4, 8, 16)}
    print("bare (images/s, CPU ms/image) by batch size:", by_batch, flush=True)
    one_pass = {n: bare_rate(model, images, n, seconds=4, lanes=1) for n in (1, 2, 4, 8, 16)}
    print("bare, one lane over all cores:", one_pass, flush=True)
    spinning = bare_rate(model, images, args.max_batch, seconds=4, spinning=True)
    print("bare with ORT's default spinning threads:", spinning, flush=True)
    with serving(model, work, args.max_batch, args.max_wait_ms) as server:
        rows = serve_phases(server, images, args)
        pairs = alternate(server, model, images, args, args.max_batch)
        # The same server fed each image as the raw body (Content-Type image/png): no multipart to build or parse.
        raw_pairs = alternate(server, model, images, args, args.max_batch, repeats=min(args.repeats, 3), raw=True)
    sweep = {args.max_batch: pairs, "raw body": raw_pairs}
    for max_batch in sorted({int(v) for v in args.sweep.split(",") if v.strip()} - {args.max_batch}):
        with serving(model, work, max_batch, args.max_wait_ms) as server:
            run_clients(server["url"], bodies_of(images)[:4], clients=2, requests=8, seconds=30)  # warm-up
            sweep[max_batch] = alternate(server, model, images, args, max_batch, repeats=min(args.repeats, 3))
    # The layout before lanes, for the record: one pass over all cores (--lanes 1), its bare rate alike.
    with serving(model, work, args.max_batch, args.max_wait_ms, "--lanes", "1") as server:
        run_clients(server["url"], bodies_of(images)[:4], clients=2, requests=8, seconds=30)  # warm-up
        sweep["1 lane"] = alternate(server, model, images, args, args.max_batch, repeats=min(args.repeats, 3),
                                    lanes=1)
    # What the per-request access log (off by default) costs.
    with serving(model, work, args.max_batch, args.max_wait_ms, "--access-log") as server:
        run_clients(server["url"], bodies_of(images)[:4], clients=2, requests=8, seconds=30)  # warm-up
        sweep["access log"] = alternate(server, model, images, args, args.max_batch, repeats=min(args.repeats, 3),
                                        access_log=True)
    report(args, rows, pairs, by_batch, one_pass, spinning, sweep, len(images))


@contextlib.contextmanager
def serving(model: Path, work: Path, max_batch: int, max_wait_ms: float, *options: str):
    server = start_server(model, work, max_batch, max_wait_ms, *options)
    try:
        yield server
    finally:
        server["proc"].terminate()
        server["proc"].wait(timeout=60)


def export_model(name: str, path: Path) -> Path:
    """The backbone with ImageNet weights and a 2-class head, exported once with transferkit's metadata."""
    if path.is_file():
        return path
    import torch

    from transferkit.export import export_onnx
    from transferkit.models.adapt import build_model
    from transferkit.models.registry import get_spec

    spec = get_spec(name)
    model = build_model(spec, 2, pretrained=True).eval()
    meta = {"classes": ["functional", "defective"], "architecture": name,
            "preprocessing": spec.preprocessing.to_dict()}
    size = spec.preprocessing.input_size
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_onnx(model, meta, path, torch.randn(1, 3, size, size))


def bare_rate(model: Path, images: list, batch: int, seconds: float = 10, spinning: bool = False,
              lanes: int | None = None, threads: int | None = None) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the ONNX engine alone on preprocessed batches (the best a server
    could do); the CPU time is this process's, all its threads. By default laid out as the server lays it
    out (`lanes` threads calling one session side by side, `threads` intra-op threads each, idle threads
    sleeping instead of spinning)."""
    from transferkit.onnx_predict import OnnxClassifier
    from transferkit.serve.model import onnx_layout

    lanes, threads = onnx_layout(lanes, threads)
    clf = OnnxClassifier(model, threads=threads, spinning=spinning)
    inputs = [clf.preprocess_bytes(data, name) for name, data in images[:batch]]
    clf.probs_of(inputs)  # warm-up
    done, lock = [0], threading.Lock()
    t0, cpu0 = time.perf_counter(), time.process_time()

    def lane() -> None:
        while time.perf_counter() - t0 < seconds:
            clf.probs_of(inputs)
            with lock:
                done[0] += len(inputs)

    workers = [threading.Thread(target=lane) for _ in range(lanes)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return done[0] / (time.perf_counter() - t0), 1000 * (time.process_time() - cpu0) / done[0]


def start_server(model: Path, work: Path, max_batch: int, max_wait_ms: float, *options: str) -> dict:
    log = work / "serve-benchmark.log"
    command = [sys.executable, "-m", "transferkit", "serve", str(model), "--port", "0", "--host", "127.0.0.1",
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), *options]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for word in log.read_text().split():
            if word.startswith("http://127.0.0.1:"):
                return {"proc": proc, "url": urlsplit(word)}
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()}")


def serve_phases(server: dict, images: list, args) -> list[dict]:
    """One phase per client count; the server's RSS after a warm-up and after each phase."""
    bodies = bodies_of(images)
    run_clients(server["url"], bodies[:4], clients=2, requests=8, seconds=30)  # warm-up (first batches)
    rows = [{"clients": "warm-up", "server RSS MB": rss_mb(server["proc"].pid)}]
    for clients in CLIENTS:
        rows.append(phase(server, bodies, clients, args.requests, args.seconds))
        print(rows[-1], flush=True)
    return rows


def phase(server: dict, bodies: list, clients: int, requests: int, seconds: float) -> dict:
    """One bounded phase; CPU ms per image counts the server's process and this one (the clients)."""
    pid = server["proc"].pid
    before, cpu0, roles0, clients0 = health(server["url"]), cpu_snapshot(pid), cpu_by_role(pid), time.process_time()
    latencies, errors, rate, wall = run_clients(server["url"], bodies, clients, requests, seconds)
    after, cpu1, roles1, clients1 = health(server["url"]), cpu_snapshot(pid), cpu_by_role(pid), time.process_time()
    batches = after["batches"] - before["batches"]
    per_image = lambda seconds: 1000 * seconds / max(1, len(latencies))  # noqa: E731
    roles = {f"{role} CPU ms/image": per_image(roles1.get(role, 0.0) - roles0.get(role, 0.0)) for role in ROLES}
    return {"clients": clients, "requests": len(latencies) + errors, "errors": errors, "images/s": rate,
            "p50 ms": 1000 * percentile(latencies, 50), "p99 ms": 1000 * percentile(latencies, 99),
            "mean batch": (after["images"] - before["images"]) / batches if batches else 0.0,
            "engine busy": (after["inference_s"] - before["inference_s"]) / wall / after.get("lanes", 1),
            "CPU ms/image": 1000 * (cpu1["ours"] - cpu0["ours"]) / max(1, len(latencies)),
            "others' cores": others_cores(cpu0, cpu1),
            "server RSS MB": rss_mb(pid), **roles, "clients CPU ms/image": per_image(clients1 - clients0)}


def alternate(server: dict, model: Path, images: list, args, max_batch: int, repeats: int | None = None,
              lanes: int | None = None, raw: bool = False, access_log: bool = False) -> list[dict]:
    """Bare engine rate at `max_batch` and `lanes` (the server's), then 16 clients, each for --pair-seconds,
    `repeats` times: the box may be shared, so each ratio is taken between neighbours in time, with the
    cores others took."""
    bodies, pairs = bodies_of(images, raw), []
    for rep in range(repeats or args.repeats):
        load, cpu0 = os.getloadavg()[0], cpu_snapshot(server["proc"].pid)
        bare, bare_cpu = bare_rate(model, images, max_batch, seconds=args.pair_seconds, lanes=lanes)
        bare_others = others_cores(cpu0, cpu_snapshot(server["proc"].pid))
        served = phase(server, bodies, CLIENTS[-1], PAIR_REQUESTS, args.pair_seconds)
        pairs.append({"max batch": max_batch, "lanes": lanes or "default", "body": "raw" if raw else "multipart",
                      "access log": "on" if access_log else "off",
                      "repeat": rep + 1, "load": load, "bare images/s": bare,
                      "16 clients images/s": served["images/s"], "errors": served["errors"],
                      "fraction": served["images/s"] / bare, "p50 ms": served["p50 ms"],
                      "engine busy": served["engine busy"],
                      "others' cores (bare)": bare_others, "others' cores (served)": served["others' cores"],
                      "bare CPU ms/image": bare_cpu, "16 clients CPU ms/image": served["CPU ms/image"],
                      **{k: served[k] for k in ROLE_COLUMNS}})
        print(pairs[-1], flush=True)
    return pairs


def bodies_of(images: list, raw: bool = False) -> list[tuple[bytes, str]]:
    return [(data, "image/png") if raw else multipart(name, data) for name, data in images]


def run_clients(url, bodies: list, clients: int, requests: int,
                seconds: float) -> tuple[list[float], int, float, float]:
    """`clients` threads, each on its own keep-alive connection, sending one image per request until
    `requests` were sent in all or `seconds` passed. Returns (latencies of the 200s, errors, images/s, wall).

    The rate counts the answers that arrived while the clients were sending, over that time: the requests
    still in flight at the deadline neither count nor lengthen the phase (the ramp-up does count)."""
    lock = threading.Lock()
    sent, latencies, finished, errors = [0], [], [], [0]
    deadline = time.perf_counter() + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        i = k
        while time.perf_counter() < deadline:
            with lock:
                if sent[0] >= requests:
                    break
                sent[0] += 1
            body, content_type = bodies[i % len(bodies)]
            i += clients
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": content_type})
                response = conn.getresponse()
                ok = response.status == 200 and json.loads(response.read())["predictions"][0]["error"] is None
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
            done = time.perf_counter()
            with lock:
                if ok:
                    latencies.append(done - t0)
                    finished.append(done)
                errors[0] += 0 if ok else 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    end = min(deadline, max(finished, default=deadline))
    return latencies, errors[0], sum(f <= end for f in finished) / (end - t0), wall


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def health(url) -> dict:
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", "/health")
    answer = json.loads(conn.getresponse().read())
    conn.close()
    return answer


def cpu_snapshot(server_pid: int) -> dict:
    """Wall clock, the machine's busy CPU seconds, and ours (this process's and the server's)."""
    return {"wall": time.perf_counter(), "box": box_busy_seconds(),
            "ours": time.process_time() + proc_cpu_seconds(Path(f"/proc/{server_pid}/stat"))}


def others_cores(before: dict, after: dict) -> float:
    """Cores other processes took between two snapshots: the machine's busy CPU time minus ours."""
    busy = (after["box"] - before["box"]) - (after["ours"] - before["ours"])
    return max(0.0, busy) / (after["wall"] - before["wall"])


def box_busy_seconds() -> float:
    """CPU seconds all processes on the machine spent so far, all cores (Linux /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal (guest is inside user)


# The server's threads by what they do, from their OS-level names (transferkit/threads.py): the inference
# lanes, the decode pool, and the rest (the event loop: HTTP, multipart, batching, JSON).
ROLES = ("lanes", "decode", "event loop")
ROLE_COLUMNS = [f"{role} CPU ms/image" for role in ROLES] + ["clients CPU ms/image"]


def cpu_by_role(pid: int) -> dict:
    """CPU seconds so far of the server's threads, summed by role."""
    return thread_cpu_by_role(pid, {"tk-infer": "lanes", "tk-decode": "decode"}, "event loop")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def report(args, rows: list[dict], pairs: list[dict], by_batch: dict, one_pass: dict, spinning: tuple,
           sweep: dict, n_images: int) -> None:
    from transferkit.serve.model import onnx_layout

    lanes, threads = onnx_layout(None, None)
    fraction = statistics.median(p["fraction"] for p in pairs)
    all_pairs = [p for ps in sweep.values() for p in ps]
    errors = sum(r.get("errors", 0) for r in rows) + sum(p["errors"] for p in all_pairs)
    others = max(max(p["others' cores (bare)"], p["others' cores (served)"]) for p in all_pairs)
    overhead = statistics.median(p["16 clients CPU ms/image"] / p["bare CPU ms/image"] for p in pairs)
    ceiling = statistics.median(p["bare CPU ms/image"] / p["16 clients CPU ms/image"] for p in pairs)
    best_bare = max(rate for rates in (by_batch, one_pass) for rate, _ in rates.values())
    by_batch_sweep = {mb: ps for mb, ps in sweep.items() if isinstance(mb, int)}
    raw_fraction = statistics.median(p["fraction"] for p in sweep["raw body"])
    logged_fraction = statistics.median(p["fraction"] for p in sweep["access log"])
    best_served = max(by_batch_sweep, key=lambda mb: statistics.median(p["16 clients images/s"] for p in sweep[mb]))
    best_served_rate = statistics.median(p["16 clients images/s"] for p in sweep[best_served])
    verdict = "met" if fraction >= 0.8 and errors == 0 else "NOT met"
    if others > SHARED_CORES:
        verdict += (f"; measured beside other work (other processes took up to {others:.2f} cores in a pair), "
                    "so the served and bare halves may have had different shares of the cores: confirm on a "
                    "quiet box")
    rates = lambda table_: ", ".join(f"{n}: {rate:.1f} images/s ({cpu:.1f} CPU ms/image)"  # noqa: E731
                                     for n, (rate, cpu) in table_.items())
    sweep_rows = [{"max batch": ps[0]["max batch"], "lanes": ps[0]["lanes"], "body": ps[0]["body"],
                   "access log": ps[0]["access log"], "pairs": len(ps),
                   **{k: statistics.median(p[k] for p in ps) for k in
                      ("bare images/s", "16 clients images/s", "fraction", "p50 ms", "engine busy",
                       "16 clients CPU ms/image")}} for _, ps in sorted(sweep.items(), key=lambda kv: str(kv[0]))]
    text = (f"## Serving: `transferkit serve` on loopback\n\n{environment_line()}. "
            f"Command: `python benchmarks/serve.py --requests {args.requests} --seconds {args.seconds:g} "
            f"--repeats {args.repeats} --pair-seconds {args.pair_seconds:g} --sweep {args.sweep}`. {args.model} "
            f"exported to ONNX (224 px), ONNX engine in its default layout ({lanes} lanes × {threads} thread: "
            f"forward passes side by side), --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}; "
            f"{n_images} ELPV val images (300×300 grey PNG), one per request as multipart, each client on a "
            "keep-alive connection; clients and server share the same cores. images/s: answers that arrived "
            "while the clients were sending, over that time. engine busy: the share of the phase the server's "
            "lanes spent in forward passes. CPU ms/image: the server's and the clients' CPU time per answered "
            "image; lanes / decode / event loop: the server's threads by what they do (inference lanes, decode "
            "pool, the rest: HTTP, multipart, batching, JSON), clients: this process. others' cores: CPU that other processes on the machine took meanwhile, in cores.\n\n"
            + table(rows, ["clients", "requests", "errors", "images/s", "p50 ms", "p99 ms", "mean batch",
                           "engine busy", "CPU ms/image", *ROLE_COLUMNS, "others' cores", "server RSS MB"])
            + "\n\nBare engine (the same ONNX model, session options and layout in the benchmark's process, on "
              f"preprocessed batches: no decoding, no HTTP), by batch size: {rates(by_batch)}. The same in one "
              f"lane over all cores (the layout before lanes): {rates(one_pass)}. With ONNX Runtime's default "
              f"spinning threads (which the server turns off because they take the cores from decoding) at "
              f"batch {args.max_batch}: {spinning[0]:.1f} images/s ({spinning[1]:.1f} CPU ms/image).\n\n"
              f"Target: 16 clients reach ≥ 80% of the bare engine's images/s at the same batch size "
              f"(--max-batch {args.max_batch}), layout and threads. The two alternate in {args.pair_seconds:g} s "
              "halves, so each fraction compares neighbours in time (load: the 1-minute load average when the "
              "pair started). The CPU columns show what serving adds per image: decoding, HTTP and the "
              "clients themselves, which the bare engine does not do.\n\n"
            + table(pairs, ["repeat", "load", "bare images/s", "16 clients images/s", "errors", "fraction",
                            "engine busy", "others' cores (bare)", "others' cores (served)", "bare CPU ms/image",
                            "16 clients CPU ms/image"])
            + "\n\nWhere the served CPU goes (the server's threads by their OS-level names, and the clients in "
              "this process), per answered image, medians of the pairs: "
            + ", ".join(f"{k.replace(' CPU ms/image', '')} {statistics.median(p[k] for p in pairs):.2f} ms"
                        for k in ROLE_COLUMNS)
            + f" (the bare engine: {statistics.median(p['bare CPU ms/image'] for p in pairs):.2f} ms). With all of "
              f"it on the same cores, serving can reach at most the bare CPU over the served CPU per image: "
              f"{ceiling:.2f} of the bare rate here, and only with the cores never idle."
            + "\n\nBy --max-batch, the one-pass layout (`--lanes 1`, its bare rate in the same layout) and a server "
              "with `--access-log` (a line per request, off by default), each with a server of its own, and the "
              "default server fed raw image bodies (`Content-Type: image/png`, one image as the body) instead of "
              "multipart; medians of its pairs:\n\n"
            + table(sweep_rows, ["max batch", "lanes", "body", "access log", "pairs", "bare images/s",
                                 "16 clients images/s",
                                 "fraction", "p50 ms", "engine busy", "16 clients CPU ms/image"])
            + f"\n\nThroughput fraction at --max-batch {args.max_batch}: median **{fraction:.2f}** (from "
              f"{min(p['fraction'] for p in pairs):.2f} to {max(p['fraction'] for p in pairs):.2f}); serving "
              f"(with its clients) costs {overhead:.2f}× the bare engine's CPU per image; {errors} errors in all "
              f"(target {verdict}). Against the best bare rate this engine reached at any batch size or layout "
              f"({best_bare:.1f} images/s), the best served rate (--max-batch {best_served}, "
              f"{best_served_rate:.1f} images/s) is {best_served_rate / best_bare:.2f}. With raw image bodies "
              f"(the same server and clients), the median fraction is {raw_fraction:.2f}; with `--access-log`, "
              f"{logged_fraction:.2f}.")
    publish("serve", text, record=not args.no_record)


if __name__ == "__main__":
    main()
