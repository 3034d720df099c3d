"""Documents, ingest jobs and feedback: the routes that change or report on what the index holds.

Every route is tenant-scoped by the caller; a document, job or answer the
caller may not see is answered exactly like one that does not exist (404).
Changing the index (upload, delete, groups) needs no re-embedding where the
content is unchanged, and changes the index version, which retires every
cached answer built on the old one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse

from ragline.serve.db import Job
from ragline.serve.identity import Principal
from ragline.serve.jobs import remove_upload, store_upload
from ragline.serve.models import (
    AccessPatch,
    DocumentOut,
    DocumentPage,
    FeedbackOut,
    FeedbackRequest,
    IngestRequest,
    JobOut,
    JobPage,
    PageLimit,
    PageOffset,
)
from ragline.serve.service import ApiError, Caller, Service, not_found
from ragline.store.base import EVERYONE, DocumentRecord

UPLOAD_CHUNK = 1 << 20
JOB_SCAN_PAGE = 200
"""Jobs read from the database at a time while gathering a page of those a caller may see."""


def document_out(record: DocumentRecord) -> dict[str, Any]:
    source, root = Path(record.source), Path(record.root)
    name = source.relative_to(root).as_posix() if source != root and source.is_relative_to(root) else source.name
    return {
        "id": record.doc_id, "name": name, "tenant": record.tenant, "groups": list(record.groups),
        "status": record.status, "error": record.error, "size": record.size, "chunks": len(record.chunk_ids),
        "updated_at": record.updated_at,
    }


def documents_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["documents"])
    settings = service.settings

    async def visible(principal: Principal, doc_id: str) -> DocumentRecord:
        record = await to_thread.run_sync(service.ragline.store.document, doc_id)
        if record is None or not principal.scope.allows(record.tenant, record.groups):
            raise not_found("document")
        return record

    async def submitted(
        principal: Principal, kind: str, source: str, content_key: str, groups: list[str], filename: str = ""
    ) -> JSONResponse:
        """Queue a job (202), or answer with the one already queued for the same content (200)."""
        job, created = await service.database(
            service.db.jobs.submit(principal.tenant, kind, source, content_key, groups, filename), "jobs"
        )
        service.runner.nudge()
        return JSONResponse(job.to_dict(), status_code=202 if created else 200)

    def upload_groups(principal: Principal, groups: str | None) -> list[str]:
        """The groups of an upload: as asked (an admin any, others only their own), else the uploader's."""
        wanted = sorted({group.strip() for group in (groups or "").split(",") if group.strip()})
        if principal.admin:
            return wanted or [EVERYONE]
        own = sorted(principal.groups or ()) or [EVERYONE]
        if not wanted:
            return own
        foreign = set(wanted) - set(own) - {EVERYONE}
        if foreign:
            raise ApiError(403, "forbidden", f"you may share only with your own groups, not {', '.join(sorted(foreign))}")
        return wanted

    @router.post("/documents", status_code=202, response_model=JobOut, responses={200: {"model": JobOut}})
    async def upload(
        principal: Caller,
        file: Annotated[UploadFile, File(description="the document (PDF, HTML, Markdown, reST, text, DOCX, notebook)")],
        groups: Annotated[str | None, Form(description='comma-separated access groups; "*" is the whole tenant')] = None,
    ) -> Any:
        """Upload a document; it is indexed by a job (202 with the job). The same content, name and groups
        again return the job already queued or done (200); other groups make another document (who may read
        one is changed by PATCH)."""
        service.readiness.require("store", "embedder")
        access = upload_groups(principal, groups)
        limits = settings.serve.limits

        async def chunks() -> AsyncIterator[bytes]:
            while data := await file.read(UPLOAD_CHUNK):
                yield data

        stored = await store_upload(
            settings.data_dir, principal.tenant, access, file.filename or "document", chunks(),
            int(limits.max_upload_mb * 1048576), limits.upload_types,
        )
        content_key = f"upload:{stored.doc_id}"  # the same bytes, name and groups: one document
        latest = await service.database(service.db.jobs.latest(principal.tenant, content_key), "jobs")
        if latest is not None and latest.status == "succeeded":
            record = await to_thread.run_sync(service.ragline.store.document, stored.doc_id)
            if record is not None and record.status == "indexed":
                if not principal.scope.allows(record.tenant, record.groups):  # re-indexing would undo a PATCH
                    raise ApiError(409, "conflict", "this file was uploaded for these groups before, and an admin "
                                   "has since changed who may read it; ask an admin to share it with you")
                return JSONResponse(latest.to_dict(), status_code=200)
        return await submitted(principal, "upload", stored.relative, content_key, access, stored.filename)

    @router.get("/documents", response_model=DocumentPage)
    async def list_documents(
        principal: Caller, limit: PageLimit = 50, offset: PageOffset = 0
    ) -> dict[str, Any]:
        """The documents the caller may read, by name."""
        service.readiness.require("store")
        records = await to_thread.run_sync(lambda: service.ragline.store.documents(principal.scope))
        items = sorted((document_out(record) for record in records), key=lambda item: (item["name"], item["id"]))
        return {"items": items[offset : offset + limit], "total": len(items), "limit": limit, "offset": offset}

    @router.get("/documents/{doc_id}", response_model=DocumentOut)
    async def get_document(principal: Caller, doc_id: str) -> dict[str, Any]:
        service.readiness.require("store")
        return document_out(await visible(principal, doc_id))

    @router.delete("/documents/{doc_id}", status_code=204)
    async def delete_document(principal: Caller, doc_id: str) -> None:
        """Remove a document's chunks, keyword entries and manifest row (cached answers retire with the
        index version). A document of a configured source comes back at its next ingest unless removed there."""
        service.readiness.require("store")
        record = await visible(principal, doc_id)
        service.require_admin(principal)
        await to_thread.run_sync(service.ragline.store.delete_document, doc_id)
        await to_thread.run_sync(remove_upload, settings.data_dir, record.tenant, record.root)

    @router.patch("/documents/{doc_id}", response_model=DocumentOut)
    async def change_access(principal: Caller, doc_id: str, patch: AccessPatch) -> dict[str, Any]:
        """Change who may read a document, at once and without re-embedding it."""
        service.readiness.require("store")
        record = await visible(principal, doc_id)
        service.require_admin(principal)
        groups = sorted(set(patch.groups))
        await to_thread.run_sync(service.ragline.store.set_access, doc_id, record.tenant, groups)
        return {**document_out(record), "groups": groups}

    @router.post("/ingest", status_code=202, response_model=JobOut, responses={200: {"model": JobOut}})
    async def ingest(principal: Caller, request: IngestRequest) -> Any:
        """Re-index a source of the server's config (an admin of its tenant); a run already queued is returned."""
        service.require_admin(principal)
        source = next(
            (s for s in settings.ingest.sources if s.label == request.source and s.tenant == principal.tenant), None
        )
        if source is None:
            names = [s.label for s in settings.ingest.sources if s.tenant == principal.tenant]
            raise ApiError(
                404, "not_found", f"no source named {request.source!r}; this tenant has: {', '.join(names) or 'none'}"
            )
        return await submitted(principal, "source", source.label, f"source:{source.label}", source.groups)

    async def job_visible(principal: Principal, job: Job) -> bool:
        """Whether the caller may see a job: by its document's groups now (a PATCH changes them), else by the
        groups it was submitted with."""
        if principal.scope.groups is None:
            return principal.scope.allows(job.tenant, job.groups)
        record = await to_thread.run_sync(service.ragline.store.document, job.doc_id) if job.doc_id else None
        groups = record.groups if record is not None else job.groups
        return principal.scope.allows(job.tenant, groups)

    @router.get("/jobs", response_model=JobPage)
    async def list_jobs(principal: Caller, limit: PageLimit = 50, offset: PageOffset = 0) -> dict[str, Any]:
        """The tenant's jobs, newest first (for callers who are not admins, those of documents they may read)."""
        visible: list[Job] = []
        page, position = JOB_SCAN_PAGE, 0
        while len(visible) < offset + limit:
            jobs = await service.database(service.db.jobs.list(principal.tenant, page, position), "jobs")
            visible += [job for job in jobs if await job_visible(principal, job)]
            position += page
            if len(jobs) < page:
                break
        return {"items": [job.to_dict() for job in visible[offset : offset + limit]], "limit": limit, "offset": offset}

    @router.get("/jobs/{job_id}", response_model=JobOut)
    async def get_job(principal: Caller, job_id: str) -> dict[str, Any]:
        job = await service.database(service.db.jobs.get(principal.tenant, job_id), "jobs")
        if job is None or not await job_visible(principal, job):
            raise not_found("job")
        return job.to_dict()

    @router.post("/feedback", status_code=201, response_model=FeedbackOut)
    async def feedback(principal: Caller, request: FeedbackRequest) -> dict[str, Any]:
        """Rate an answer (by the `answer_id` every answer carries), with an optional comment."""
        stored = await service.database(
            service.db.answers.add_feedback(
                principal.tenant, principal.subject, request.answer_id, request.rating, request.comment
            ),
            "feedback",
        )
        if stored is None:
            raise not_found("answer")
        return stored.to_dict()

    @router.get("/feedback", response_model=list[FeedbackOut])
    async def list_feedback(
        principal: Caller, limit: PageLimit = 50, offset: PageOffset = 0
    ) -> list[dict[str, Any]]:
        """The tenant's feedback, newest first (admins)."""
        service.require_admin(principal)
        items = await service.database(service.db.answers.list_feedback(principal.tenant, limit, offset), "feedback")
        return [item.to_dict() for item in items]

    return router
