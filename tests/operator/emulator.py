"""A kmock 0.8 KubernetesEmulator that behaves enough like a real API server to carry a kopf operator.

What it adds (see ../shared/notes/kmock.md for the gaps of 0.8; `test_kmock_gaps.py` pins them):
uid/resourceVersion/generation/creationTimestamp, 201 on create, generateName, 409/404/422 errors,
JSON patch with `test`, merge/strategic/apply patches (lists replaced whole), server-side apply that
creates, status subresource separation, finalizers with deletionTimestamp, watches that resume from a
resourceVersion and honour timeoutSeconds, label selectors, list kinds, and owner-reference garbage
collection (background cascade, standing in for kube-controller-manager's garbage collector).
Strategic merge of lists, validation and defaulting are not emulated.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import kmock
from kmock import KubernetesError, Payload, Request, Response
from kmock._internal import references

Key = tuple[Any, str | None, str]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(base: Any, patch: Any) -> Any:
    """RFC 7386 merge patch: dicts merge recursively, None deletes, everything else replaces."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return copy.deepcopy(patch)
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(base.get(key), value)
    return out


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def json_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 for the ops kopf and kubectl send: test, add, replace, remove."""
    obj = copy.deepcopy(obj)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if op["op"] == "test":
            current = node[int(last)] if isinstance(node, list) else node.get(last)
            if current != op["value"]:
                raise KubernetesError(422, "Invalid", f"the test at {op['path']} failed")
        elif op["op"] in ("add", "replace"):
            if isinstance(node, list):
                index = len(node) if last == "-" else int(last)
                node.insert(index, op["value"]) if op["op"] == "add" else node.__setitem__(index, op["value"])
            else:
                node[last] = op["value"]
        elif op["op"] == "remove":
            node.pop(int(last) if isinstance(node, list) else last)
        else:
            raise KubernetesError(422, "Invalid", f"unsupported JSON patch op {op['op']}")
    return obj


def parse_selector(text: str | None) -> list[tuple[str, str, set[str]]]:
    """Equality, set and existence label selectors: a=b, a!=b, a in (b,c), a notin (b), a, !a."""
    reqs: list[tuple[str, str, set[str]]] = []
    if not text:
        return reqs
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for part in (p.strip() for p in parts if p.strip()):
        if " notin " in part or " in " in part:
            op = "notin" if " notin " in part else "in"
            key, values = part.split(f" {op} ", 1)
            reqs.append((key.strip(), op, {v.strip() for v in values.strip("() ").split(",")}))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            reqs.append((key.strip(), "notin", {value.strip()}))
        elif "=" in part:
            key, value = part.split("=", 1)
            reqs.append((key.strip().rstrip("="), "in", {value.strip().lstrip("=")}))
        elif part.startswith("!"):
            reqs.append((part[1:], "!", set()))
        else:
            reqs.append((part, "exists", set()))
    return reqs


def labels_match(labels: dict[str, str], reqs: list[tuple[str, str, set[str]]]) -> bool:
    for key, op, values in reqs:
        ok = {"in": key in labels and labels[key] in values, "notin": labels.get(key) not in values,
              "exists": key in labels, "!": key not in labels}[op]
        if not ok:
            return False
    return True


@attrs.define(kw_only=True)
class Cluster(kmock.KubernetesEmulator):
    store: dict[Key, dict[str, Any]] = attrs.field(factory=dict, init=False)
    _rv: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _log: list[tuple[int, Any, dict[str, Any]]] = attrs.field(factory=list, init=False)
    _watchers: list[tuple[Request, asyncio.Queue]] = attrs.field(factory=list, init=False)

    # kmock 0.8 copies a returned Response's status onto the (shared) fallback reaction, so every
    # served action returns an explicit Response, or a 201 would stick to later answers
    async def _handle(self, request: Request):
        # skip the parent's own state tracking: every action is served by the methods below
        return await kmock.KubernetesScaffold._handle(self, request)

    # --- helpers -------------------------------------------------------------------------------
    def _info(self, resource: Any) -> references.ResourceInfo | None:
        for res in self._resources:
            if res == resource:
                return self._resources[res]
        return None

    def _has_status(self, resource: Any) -> bool:
        info = self._info(resource)
        return bool(info and "status" in info.subresources)

    def _matches(self, request: Request, key: Key, obj: dict[str, Any]) -> bool:
        resource, namespace, _ = key
        if resource != request.resource or (request.namespace and namespace != request.namespace):
            return False
        reqs = parse_selector(request.params.get("labelSelector"))
        return labels_match(obj.get("metadata", {}).get("labels") or {}, reqs)

    def _emit(self, resource: Any, kind: str, obj: dict[str, Any]) -> None:
        event = {"type": kind, "object": copy.deepcopy(obj)}
        self._log.append((int(obj["metadata"]["resourceVersion"]), resource, event))
        meta = obj["metadata"]
        for request, queue in self._watchers:
            if self._matches(request, (resource, meta.get("namespace"), meta["name"]), obj):
                queue.put_nowait(event)

    def _bump(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._rv))

    def _key(self, request: Request, name: str | None = None) -> Key:
        return (request.resource, request.namespace, name or request.name)

    def _remove(self, key: Key) -> None:
        obj = self.store.pop(key)
        self._bump(obj)
        self._emit(key[0], "DELETED", obj)
        self._collect_garbage(obj["metadata"]["uid"])

    def _mark_deleted(self, key: Key) -> dict[str, Any]:
        obj = self.store[key]
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = _now()
                self._bump(obj)
                self._emit(key[0], "MODIFIED", obj)
        else:
            self._remove(key)
        return obj

    def _collect_garbage(self, owner_uid: str) -> None:
        alive = {o["metadata"]["uid"] for o in self.store.values()}
        for key, obj in list(self.store.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if key in self.store and refs and any(r.get("uid") == owner_uid for r in refs):
                if not any(r.get("uid") in alive for r in refs):
                    self._mark_deleted(key)

    def _new(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise KubernetesError(422, "Invalid", "metadata.name or metadata.generateName is required")
        if request.namespace:
            meta["namespace"] = request.namespace
        key = self._key(request, meta["name"])
        if key in self.store:
            raise KubernetesError(409, "AlreadyExists", f"{meta['name']} already exists")
        info = self._info(request.resource)
        group, version = request.resource.group, request.resource.version
        obj.setdefault("apiVersion", f"{group}/{version}" if group else version)
        if info and info.kind:
            obj.setdefault("kind", info.kind)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if self._has_status(request.resource):
            obj.pop("status", None)
        self._bump(obj)
        self.store[key] = obj
        self._emit(request.resource, "ADDED", obj)
        return obj

    # --- served actions ------------------------------------------------------------------------
    async def _serve_create(self, request: Request) -> Payload:
        async with self._lock:
            return Response(status=201, payload=copy.deepcopy(self._new(request, request.data or {})))

    async def _serve_fetch(self, request: Request) -> Payload:
        async with self._lock:
            obj = self.store.get(self._key(request))
            if obj is None:
                raise KubernetesError(404, "NotFound", f"{request.name} not found")
            return Response(status=200, payload=copy.deepcopy(obj))

    async def _serve_list(self, request: Request) -> Payload:
        if self._info(request.resource) is None:
            raise KubernetesError(404, "NotFound", "the server could not find the requested resource")
        async with self._lock:
            items = [copy.deepcopy(o) for k, o in self.store.items() if self._matches(request, k, o)]
            info = self._info(request.resource)
            group, version = request.resource.group, request.resource.version
            return Response(status=200, payload={
                "apiVersion": f"{group}/{version}" if group else version, "kind": f"{info.kind or ''}List",
                "metadata": {"resourceVersion": str(self._last_rv())}, "items": items})

    def _last_rv(self) -> int:
        return self._log[-1][0] if self._log else 0

    async def _serve_update(self, request: Request) -> Payload:
        content_type = (request.headers.get("Content-Type") or "").split(";")[0]
        async with self._lock:
            key = self._key(request)
            old = self.store.get(key)
            if old is None:
                if content_type == "application/apply-patch+yaml":
                    return Response(status=201, payload=copy.deepcopy(self._new(request, request.data)))
                raise KubernetesError(404, "NotFound", f"{request.name} not found")
            if request.subresource not in (None, "status"):
                raise KubernetesError(405, "MethodNotAllowed", f"/{request.subresource} is not emulated")
            if isinstance(request.data, list):
                patched = json_patch(old, request.data)
            else:
                patched = merge(old, request.data or {})
            if request.subresource == "status":
                new = {**copy.deepcopy(old), "status": patched.get("status")}
                if new["status"] is None:
                    new.pop("status")
            else:
                new = patched
                if self._has_status(request.resource):
                    new.pop("status", None)
                    if "status" in old:
                        new["status"] = copy.deepcopy(old["status"])
            for field in ("uid", "creationTimestamp", "generation", "resourceVersion"):
                new["metadata"][field] = old["metadata"][field]
            if new == old:
                return Response(status=200, payload=copy.deepcopy(old))
            spec_of = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
            if spec_of(new) != spec_of(old):
                new["metadata"]["generation"] = old["metadata"]["generation"] + 1
            self._bump(new)
            self.store[key] = new
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                self._remove(key)
            else:
                self._emit(request.resource, "MODIFIED", new)
            return Response(status=200, payload=copy.deepcopy(new))

    async def _serve_delete(self, request: Request) -> Payload:
        if request.name is None:
            raise KubernetesError(405, "MethodNotAllowed", "deletecollection is not emulated")
        async with self._lock:
            key = self._key(request)
            if key not in self.store:
                raise KubernetesError(404, "NotFound", f"{request.name} not found")
            return Response(status=200, payload=copy.deepcopy(self._mark_deleted(key)))

    async def _serve_watch(self, request: Request) -> AsyncIterator[Payload]:
        yield b""
        since = request.params.get("resourceVersion")
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        queue: asyncio.Queue = asyncio.Queue()
        async with self._lock:
            if since and since != "0":
                backlog = [ev for rv, res, ev in self._log if rv > int(since) and res == request.resource
                           and self._matches(request, (res, ev["object"]["metadata"].get("namespace"),
                                                       ev["object"]["metadata"]["name"]), ev["object"])]
            else:
                backlog = [{"type": "ADDED", "object": copy.deepcopy(o)}
                           for k, o in self.store.items() if self._matches(request, k, o)]
            entry = (request, queue)
            self._watchers.append(entry)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            for event in backlog:
                yield event
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    yield await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    return
        finally:
            self._watchers.remove(entry)


def str_resource(res: Any) -> str:
    return f"{res.group}/{res.version}/{res.plural}" if res.group else f"{res.version}/{res.plural}"

