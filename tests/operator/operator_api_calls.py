"""Every Kubernetes API call the operator makes, as (verb, API group, resource, scope): the least privilege the
chart's RBAC must grant, no more and no less (test_operator_rbac.py).

Why a checked-in list, not the set recorded in a run: which calls a run records depends on which tests ran
(a single file exercises a few paths). The list is deterministic; two checks keep it true:
- test_operator_rbac.py::test_every_reconcile_path_is_listed drives every reconcile path of the real
  operator and requires the calls recorded so far to be exactly the --all-namespaces list (nothing used is
  missing, nothing listed is dead);
- conftest.api_call_recorder fails the session if any operator test made a call outside the list.

The scope is "cluster" for a request without a namespace (kopf's watches with --all-namespaces, discovery
of CRDs), else "namespaced". A server-side apply counts as patch and create (harness.api_calls).
"""

from __future__ import annotations

NS, CLUSTER = "namespaced", "cluster"
OWNED_BY_APPLY = {  # children the operator server-side applies and deletes when no longer wanted
    "apps": ("deployments",),
    "": ("services", "persistentvolumeclaims"),
    "policy": ("poddisruptionbudgets",),
    "networking.k8s.io": ("ingresses",),
    "batch": ("jobs",),
    "monitoring.coreos.com": ("servicemonitors", "podmonitors"),
    "inference.networking.k8s.io": ("inferencepools",),
    "gateway.networking.k8s.io": ("httproutes",),
}
# kopf watches these (children: to restore one edited or deleted by hand, and follow the Deployment)
WATCHED = (("genserve.dev", "textgenerationservices"), ("apps", "deployments"), ("batch", "jobs"),
           ("", "services"), ("policy", "poddisruptionbudgets"), ("networking.k8s.io", "ingresses"))

_namespaced = {(verb, group, plural, NS) for group, plurals in OWNED_BY_APPLY.items() for plural in plurals
               for verb in ("get", "patch", "create", "delete")}
_namespaced |= {
    ("get", "genserve.dev", "textgenerationservices", NS),
    ("patch", "genserve.dev", "textgenerationservices", NS),  # kopf: finalizer, progress annotations
    ("patch", "genserve.dev", "textgenerationservices/status", NS),
    ("list", "batch", "jobs", NS),  # fill Jobs of an older model, to remove
    ("list", "", "pods", NS),  # the autoscaler's scrape targets
    ("get", "", "secrets", NS),  # by name: report a missing token / API-key / S3 Secret
    ("create", "", "events", NS),  # kopf.event()
}
_watches = {(verb, group, plural) for group, plural in WATCHED for verb in ("list", "watch")}
_crds = {(verb, "apiextensions.k8s.io", "customresourcedefinitions", CLUSTER) for verb in ("list", "watch")}

# kopf run --all-namespaces (the chart's default, and how the tests run it)
CALLS = frozenset(_namespaced | {(*w, CLUSTER) for w in _watches} | _crds)
# kopf run --all-namespaces --peering=<name>: the cluster-wide peering object (recorded by
# test_operator_restart.py, whose operators run so)
CLUSTER_PEERING_CALLS = frozenset((verb, "kopf.dev", "clusterkopfpeerings", CLUSTER)
                                  for verb in ("list", "watch", "patch"))

# kopf run --namespace=<ns>... (chart watchNamespaces): the same calls inside each namespace, and kopf's
# namespace observer lists and watches namespaces. Derived, not recorded: kmock 0.8 cannot serve
# GET /api/v1/namespaces (test_kmock_gaps.py), which kopf needs in that mode.
NAMESPACED_MODE_CALLS = frozenset(_namespaced | {(*w, NS) for w in _watches} | _crds
                                  | {(verb, "", "namespaces", CLUSTER) for verb in ("list", "watch")})
NAMESPACED_PEERING_CALLS = frozenset((verb, "kopf.dev", "kopfpeerings", NS) for verb in ("list", "watch", "patch"))

INFERENCE_GROUPS = ("inference.networking.k8s.io", "gateway.networking.k8s.io")
