"""What TLS and token checks cost a call: the same server and client code in three modes, measured in one run.

The server is the platform's own ``orchestrator.server.DecisionServer`` (its interceptor chain: tokens, tracing,
decode guard) around a servicer that answers ``GetServiceInfo`` from memory, so the figures are the transport and
the interceptors alone, not the cascade. Modes: plaintext without tokens (the baseline), TLS, TLS + token sent
as gRPC call credentials (what ``orchestrator.client`` builds for every client in this repo), and TLS + the same
token sent as plain per-call metadata (the server cannot tell the two apart; the client's cost differs). Each runs
``-n`` calls at concurrency 1 and ``-c``.

    python -m loadtest.tls_bench -n 2000 -c 16

Writes loadtest/results/tls-<utc>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc

from orchestrator.client import channel_credentials, client_token, open_aio_channel
from orchestrator.server import DecisionServer
from risk.v1 import decision_pb2 as pb
from risk.v1 import decision_pb2_grpc as pb_grpc
from riskcascade.core.config import SecuritySettings
from riskcascade.dev_secrets import ensure_dev_material

RESULTS = Path(__file__).resolve().parent / "results"
LOOPBACK = "127.0.0.1"
WARMUP_CALLS = 50


class InfoServicer(pb_grpc.DecisionServiceServicer):
    async def GetServiceInfo(self, request, context):  # noqa: ANN001, ANN201, N802
        return pb.ServiceInfo(model_version="bench")


TOKEN_AS_METADATA = "TLS + token as per-call metadata"


def modes(secrets: Path) -> dict[str, SecuritySettings]:
    files = {
        "tls_cert_file": secrets / "server.crt", "tls_key_file": secrets / "server.key", "ca_file": secrets / "ca.crt",
        "client_cert_file": secrets / "client.crt", "client_key_file": secrets / "client.key",
        "tokens_file": secrets / "tokens.yaml", "client_token_file": secrets / "client.token",
    }
    return {
        "plaintext, no token (baseline)": SecuritySettings(tls=False, tokens=False, **files),
        "TLS": SecuritySettings(tls=True, tokens=False, **files),
        "TLS + token": SecuritySettings(tls=True, tokens=True, **files),
        TOKEN_AS_METADATA: SecuritySettings(tls=True, tokens=True, **files),
    }


async def measure(security: SecuritySettings, n: int, concurrency: int, token_as_metadata: bool) -> dict:
    server = await DecisionServer.open(InfoServicer(), LOOPBACK, 0, security)
    await server.start()
    metadata = None
    credentials = channel_credentials(security)
    if token_as_metadata:
        credentials = grpc.ssl_channel_credentials(root_certificates=security.ca_file.read_bytes())
        metadata = (("authorization", f"Bearer {client_token(security)}"),)
    channel = open_aio_channel(f"{LOOPBACK}:{server.port}", credentials)
    stub = pb_grpc.DecisionServiceStub(channel)
    try:
        for _ in range(WARMUP_CALLS):
            await stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10, metadata=metadata)
        latencies: list[float] = []
        remaining = [n]

        async def client() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                started = time.perf_counter()
                await stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10, metadata=metadata)
                latencies.append((time.perf_counter() - started) * 1000.0)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await channel.close()
        await server.stop(0)
    q = statistics.quantiles(latencies, n=100)
    return {"c": concurrency, "n": len(latencies), "p50_ms": round(q[49], 3), "p99_ms": round(q[98], 3),
            "req_per_s": round(len(latencies) / elapsed, 1)}


async def main(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = modes(Path(tmp))
        ensure_dev_material(settings["TLS + token"])
        for concurrency in (1, args.concurrency):
            for name, security in settings.items():
                row = {"mode": name, **await measure(security, args.requests, concurrency, name == TOKEN_AS_METADATA)}
                rows.append(row)
                print(f"{name:32s} c={row['c']:<3d} p50 {row['p50_ms']:7.3f} ms  p99 {row['p99_ms']:7.3f} ms  "
                      f"{row['req_per_s']:9.1f} req/s")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    command = f"python -m loadtest.tls_bench -n {args.requests} -c {args.concurrency}"
    (RESULTS / f"tls-{stamp}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    lines = [f"# TLS and token cost per call ({stamp})", "", f"`{command}`: GetServiceInfo answered from memory by "
             "the platform's DecisionServer (tokens, tracing and decode-guard interceptors), every mode in this run.",
             "", "| mode | c | p50 ms | p99 ms | req/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['c']} | {r['p50_ms']} | {r['p99_ms']} | {r['req_per_s']:,} |" for r in rows]
    (RESULTS / f"tls-{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / f'tls-{stamp}.md'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=2000, help="calls per row")
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="concurrency of the second set of rows")
    asyncio.run(main(parser.parse_args()))
