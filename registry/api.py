"""The registry's HTTP API (FastAPI). ``create_app()`` reads ``DATABASE_URL`` / ``DSV41_REGISTRY_HOME``.

=====================================  ============================================================
``POST /reports``                      submit ``{"report", "signature", "samples_jsonl"}``: 201 accepted,
                                       200 duplicate (nothing stored again), 4xx with a message otherwise
``GET /reports``                       summaries (``limit``, ``offset``, ``model``, ``auditor``)
``GET /reports/{id}``                  one report with its signature and its signature status
``GET /reports/{id}/samples``          the samples file (JSON lines, served as a download)
``GET /leaderboard?metric=T/M``        reports ranked by a metric (``group``, default ``all``)
``GET /metrics``                       metric names present in the registry
``POST /auditors`` / ``GET``           register / list auditor public identities
``POST /releases`` / ``GET``           register (admin token) / list model releases by weight hashes
``GET /log/root``                      signed tree head of the transparency log
``GET /log/proof/{id}``                inclusion proof (``tree_size`` optional)
``GET /log/consistency``               consistency proof ``first`` -> ``second``
``GET /log/entries``                   log leaves ``start``..``end``
=====================================  ============================================================
"""

from __future__ import annotations

from dsv41.registry.service import RegistryService
from dsv41.registry.validation import RegistryError, parse_json
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"detail": message, "code": code}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise RegistryError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes",
                                    code="too_large")
        except ValueError:
            raise RegistryError(400, "invalid Content-Length header", code="bad_request") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RegistryError(413, f"request body exceeds the limit of {limit} bytes", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_json_type(request: Request) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json":
        raise RegistryError(415, f"send the body as application/json (got {ctype!r})", code="media_type")


def create_app(service: RegistryService | None = None) -> FastAPI:
    service = service or RegistryService.from_env()
    app = FastAPI(title="dsv41 audit registry", version="1", docs_url="/docs", redoc_url=None)
    app.state.registry = service

    @app.exception_handler(RegistryError)
    async def _registry_error(_request, exc: RegistryError):
        return _error(exc.status, exc.message, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"parameter '{loc}': {err.get('msg')}")
        return _error(400, "; ".join(parts) or "invalid request", "bad_query")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "http")

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if not request.url.path.endswith(("/docs", "/openapi.json")):
            response.headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
        return response

    @app.get("/")
    def index():
        return {"service": "dsv41 audit registry", "log_id": service.identity.fingerprint,
                "database": service.db.dialect, "max_body_bytes": service.max_body_bytes,
                "endpoints": ["/reports", "/leaderboard?metric=TASK/METRIC", "/metrics", "/auditors", "/releases",
                              "/log/root", "/log/proof/{id}", "/log/consistency?first=N", "/log/entries"]}

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.post("/reports", status_code=201)
    async def post_report(request: Request):
        _check_json_type(request)
        body = await _read_body(request, service.max_body_bytes)
        doc = await run_in_threadpool(parse_json, body)
        status, out = await run_in_threadpool(service.submit, doc)
        return JSONResponse(out, status_code=status)

    @app.get("/reports")
    def list_reports(limit: int = Query(100), offset: int = Query(0), model: str | None = None,
                     auditor: str | None = None):
        return service.list_reports(limit=limit, offset=offset, model=model, auditor=auditor)

    @app.get("/reports/{report_id}")
    def get_report(report_id: str):
        return service.get_report(report_id)

    @app.get("/reports/{report_id}/samples")
    def get_samples(report_id: str):
        data = service.get_samples(report_id)
        return Response(data, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{report_id}.samples.jsonl"'})

    @app.get("/leaderboard")
    def leaderboard(metric: str = Query(...), group: str = Query("all"), limit: int = Query(500)):
        return service.leaderboard(metric, group=group, limit=limit)

    @app.get("/metrics")
    def metrics():
        return {"metrics": service.metric_names()}

    @app.post("/auditors", status_code=201)
    async def post_auditor(request: Request):
        _check_json_type(request)
        body = await _read_body(request, 1024 * 1024)
        status, out = await run_in_threadpool(service.register_auditor, parse_json(body))
        return JSONResponse(out, status_code=status)

    @app.get("/auditors")
    def auditors():
        return {"auditors": service.list_auditors()}

    @app.post("/releases", status_code=201)
    async def post_release(request: Request):
        auth = request.headers.get("authorization", "")
        service.check_admin(auth[7:] if auth.lower().startswith("bearer ") else None)
        _check_json_type(request)
        body = await _read_body(request, 4 * 1024 * 1024)
        status, out = await run_in_threadpool(service.register_release, parse_json(body))
        return JSONResponse(out, status_code=status)

    @app.get("/releases")
    def releases():
        return {"releases": service.list_releases()}

    @app.get("/log/root")
    def log_root():
        return service.signed_tree_head()

    @app.get("/log/proof/{report_id}")
    def log_proof(report_id: str, tree_size: int | None = None):
        return service.inclusion_proof(report_id, tree_size)

    @app.get("/log/consistency")
    def log_consistency(first: int = Query(...), second: int | None = None):
        return service.consistency_proof(first, second)

    @app.get("/log/entries")
    def log_entries(start: int = Query(0), end: int | None = None):
        return service.log_entries(start, end)

    return app
