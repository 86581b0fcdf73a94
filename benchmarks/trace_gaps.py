"""Where the GPU waits for the host: idle gaps in a torch.profiler chrome trace, by what the host was doing.

    python benchmarks/trace_gaps.py runs/.../profile/trace_rank0.json [--min_gap_us 5] [--rows 15]

A gap is time in which no kernel, copy or memset runs on any stream. Each gap is charged to the launch of the work
that ends it: the host thread's outermost record_function range (clip_grad_norm, optimizer_step, ...) and innermost
operator at the moment of that launch. A step is host-bound where the gaps add up; a gap ended by a launch inside a
synchronising call (aten::item, aten::_local_scalar_dense) is a host sync. Prints a JSON summary.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cosmos_t2i.monitor import gpu_work  # noqa: E402


def enclosing(ranges: list, times: list) -> dict:
    """For each time, the names of the host ranges that contain it, outermost first. `ranges` are one thread's,
    properly nested, sorted by (start, -duration): one sweep with a stack of the open ranges."""
    stack, i, out = [], 0, {}
    for t in sorted(times):
        while i < len(ranges) and ranges[i]["ts"] <= t:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < ranges[i]["ts"]:
                stack.pop()
            stack.append(ranges[i])
            i += 1
        while stack and stack[-1]["ts"] + stack[-1]["dur"] < t:
            stack.pop()
        out[t] = [r["name"] for r in stack]
    return out


def gaps(trace_path: Path, min_gap_us: float = 5.0) -> dict:
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    work = gpu_work(events)
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    found, end = [], work[0]["ts"]  # (gap, the launch of the work after it or None)
    for e in work:
        if e["ts"] - end >= min_gap_us:
            found.append((e["ts"] - end, launches.get(e.get("args", {}).get("correlation"))))
        end = max(end, e["ts"] + e["dur"])
    by_thread = defaultdict(list)  # host ranges per thread, to find what launched the work after a gap
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e:
            by_thread[e["tid"]].append(e)
    names = {}
    for tid, ranges in by_thread.items():
        ranges.sort(key=lambda r: (r["ts"], -r["dur"]))
        names[tid] = enclosing(ranges, [launch["ts"] for _, launch in found if launch and launch["tid"] == tid])
    idle = defaultdict(float)
    for gap, launch in found:
        if launch is None:
            idle["(launch not in trace)"] += gap
            continue
        stack = names.get(launch["tid"], {}).get(launch["ts"], [])
        annotations = [n for n in stack if not n.startswith(("aten::", "cuda"))]
        idle[f"{annotations[0] if annotations else '-'} / {stack[-1] if stack else '-'}"] += gap
    span, total = end - work[0]["ts"], sum(idle.values())
    return {"span_ms": span / 1e3, "idle_ms": total / 1e3, "idle_share": total / span, "gaps": len(found),
            "idle_ms_by_launch_site": {k: round(v / 1e3, 3) for k, v in sorted(idle.items(), key=lambda kv: -kv[1])}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--min_gap_us", type=float, default=5.0)
    parser.add_argument("--rows", type=int, default=15, help="launch sites listed, most idle time first")
    args = parser.parse_args()
    summary = gaps(Path(args.trace), args.min_gap_us)
    summary["idle_ms_by_launch_site"] = dict(list(summary["idle_ms_by_launch_site"].items())[:args.rows])
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
