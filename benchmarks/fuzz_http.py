"""Hostile-input fuzz over real HTTP, at length (run by hand; the suite runs 40 cases in test_security.py).

Draws bodies from tests/server/hostile_inputs.py (random JSON, huge / negative / NaN numbers, deep
nesting, megabyte strings, invalid UTF-8 and lone surrogates as raw bytes, odd roles and content parts,
huge or self-referencing tool and grammar specs) for /generate, /generate_stream, /v1/chat/completions,
/v1/completions, /tokenize, and checks that every answer is a well-formed 2xx or 4xx JSON (SSE for a
stream), never a 5xx, and that /health is fine after. Writes benchmarks/results/fuzz_http.{md,json}.

    .venv/bin/python benchmarks/fuzz_http.py --cases 2000
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import httpx
from serve_process import ServeProcess, tiny_model
from soak import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
from hostile_inputs import hostile_request  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def well_formed(r: httpx.Response) -> bool:
    if r.status_code >= 400:
        body = r.json()
        return set(body) == {"error", "error_type"} and bool(body["error"])
    if "text/event-stream" in r.headers.get("content-type", ""):
        events = [line[5:] for line in r.text.splitlines() if line.startswith("data:")]
        return bool(events) and all(e.strip() == "[DONE]" or isinstance(json.loads(e), dict) for e in events)
    return isinstance(r.json(), dict | list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz_http")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="genserve-fuzz-"))
    server = ServeProcess(tiny_model(work / "tiny-llama"), work / "serve.log", "--max-total-tokens", "4096")
    by_route: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures: list[dict] = []
    try:
        client = httpx.Client(base_url=server.url, timeout=300)

        @settings(max_examples=args.cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(request=hostile_request())
        def case(request) -> None:
            route, body = request
            r = client.post(route, content=body, headers={"content-type": "application/json"})
            by_route[route][r.status_code] += 1
            try:
                ok = r.status_code < 500 and well_formed(r)
            except ValueError:
                ok = False
            if not ok and len(failures) < 20:
                failures.append({"route": route, "body": body[:500].decode(errors="replace"),
                                 "status": r.status_code, "answer": r.text[:500]})

        case()
        health = httpx.get(server.url + "/health", timeout=60).status_code
    finally:
        exit_code = server.stop()
    total = sum(sum(c.values()) for c in by_route.values())
    statuses = collections.Counter()
    for c in by_route.values():
        statuses.update(c)
    result = {"cases": total, "cpu": cpu_model(), "by_route": {k: dict(v) for k, v in by_route.items()},
              "status_codes": dict(statuses), "failures": failures, "health_after": health, "exit_code": exit_code}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [
        "# Hostile-input fuzz over real HTTP",
        "",
        f"`benchmarks/fuzz_http.py --cases {args.cases}` on {result['cpu']}, tiny random Llama: {total} cases, "
        f"{len(failures)} failures (a 5xx or a malformed answer), /health after: {health}, exit code after "
        f"SIGTERM: {exit_code}.",
        "",
        "| route | answers by status |", "|---|---|",
        *[f"| {route} | {', '.join(f'{k}: {v}' for k, v in sorted(c.items()))} |" for route, c in sorted(by_route.items())],
        "",
    ]
    if failures:
        lines += ["Failures:", "", "```", *[json.dumps(f) for f in failures], "```", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
