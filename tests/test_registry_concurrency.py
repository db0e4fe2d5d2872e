"""Registry server in its own process, SQLite and PostgreSQL: 200 concurrent submissions are stored
exactly once, and a crash (SIGKILL) in the middle of a load loses nothing that was acknowledged.

PostgreSQL runs only when DSV41_TEST_POSTGRES_URL is set (CI starts a server with .ci/postgres.sh);
the URL is handed to the registry process as DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import httpx
import pytest
from dsv41.audit import signing as S
from dsv41.registry import merkle
from dsv41.registry.testing import free_port, postgres_url_or_skip, shared_fixture, signed_submission, variant
from dsv41.release.identity import Identity

N = 200


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer_dir):
    _, rep = shared_fixture(tmp_path_factory, tiny_tokenizer_dir)
    return json.loads((rep / "report.json").read_text()), (rep / "samples.jsonl").read_bytes()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    return postgres_url_or_skip()


class Server:
    def __init__(self, database_url: str, home):
        self.database_url, self.home = database_url, home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        env = {**os.environ, "DATABASE_URL": self.database_url, "DSV41_REGISTRY_HOME": str(self.home)}
        self.proc = subprocess.Popen([sys.executable, "-m", "dsv41.registry", "registry", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("registry exited: " + self.proc.stderr.read().decode()[-2000:])
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("registry did not start")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


async def _post_all(url: str, bodies: list[bytes], *, on_ack=None) -> list:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def one(body):
            r = await client.post(url + "/reports", content=body, headers={"content-type": "application/json"})
            if on_ack and r.status_code in (200, 201):
                on_ack(r.json())
            return r.status_code, r.json()

        return await asyncio.gather(*(one(b) for b in bodies), return_exceptions=True)


def test_concurrent_submissions_and_crash(database_url, tmp_path, base):
    report, samples = base
    alice = Identity.generate(name="alice")
    reports = [variant(report, i) for i in range(N + 60)]
    bodies = [json.dumps(signed_submission(r, samples, alice)).encode() for r in reports]
    server = Server(database_url, tmp_path / "home").start()
    try:
        assert httpx.post(server.url + "/auditors", json=alice.public.to_dict()).status_code == 201
        # 200 distinct reports plus 50 of them again, all at once, in random order
        rng = random.Random(0)
        batch = list(range(N)) + rng.sample(range(N), 50)
        rng.shuffle(batch)
        results = asyncio.run(_post_all(server.url, [bodies[i] for i in batch]))
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors[:3]
        by_id: dict[str, list] = {}
        for status, body in results:
            by_id.setdefault(body["id"], []).append((status, body))
        assert set(by_id) == {r["report_id"] for r in reports[:N]}
        for rid, answers in by_id.items():
            statuses = sorted(s for s, _ in answers)
            assert statuses == [200] * (len(answers) - 1) + [201], (rid, statuses)  # stored once, then duplicates
            assert len({b["log_index"] for _, b in answers}) == 1
        assert sorted(b["log_index"] for (s, b) in results if s == 201) == list(range(N))
        listing = httpx.get(server.url + "/reports", params={"limit": 1000}).json()
        assert listing["total"] == N and len({x["id"] for x in listing["reports"]}) == N
        head_before = httpx.get(server.url + "/log/root").json()
        head, _ = S.verify_tree_head(head_before)
        assert head["tree_size"] == N

        # crash: SIGKILL the server while 60 more submissions are in flight
        acked: list[dict] = []
        killer_armed = {"done": False}

        def on_ack(body):
            acked.append(body)
            if len(acked) >= 10 and not killer_armed["done"]:
                killer_armed["done"] = True
                server.kill()

        asyncio.run(_post_all(server.url, bodies[N:], on_ack=on_ack))
        assert killer_armed["done"], "the server finished before it could be killed"
        server = Server(database_url, tmp_path / "home").start()
        for body in acked:
            r = httpx.get(server.url + f"/reports/{body['id']}")
            assert r.status_code == 200, f"acknowledged report {body['id']} was lost in the crash"
            assert r.json()["log_index"] == body["log_index"] and r.json()["signature_status"] == "verified"
        entries = httpx.get(server.url + "/log/entries", params={"start": 0, "end": 1000}).json()["entries"]
        assert [e["index"] for e in entries] == list(range(len(entries))) and len(entries) >= N + len(acked)
        # the log after the crash extends the one before it
        now = httpx.get(server.url + "/log/root").json()
        head2, _ = S.verify_tree_head(now, pinned=head_before["log_identity"]["fingerprint"])
        proof = httpx.get(server.url + "/log/consistency", params={"first": N, "second": head2["tree_size"]}).json()
        merkle.verify_consistency(N, head2["tree_size"], bytes.fromhex(head["root_hash"]),
                                  bytes.fromhex(head2["root_hash"]), [bytes.fromhex(h) for h in proof["proof"]])
        # resubmitting everything completes the set; nothing is stored twice
        results = asyncio.run(_post_all(server.url, bodies[N:]))
        assert all(not isinstance(r, Exception) and r[0] in (200, 201) for r in results)
        assert httpx.get(server.url + "/reports", params={"limit": 1}).json()["total"] == N + 60
    finally:
        server.stop()
