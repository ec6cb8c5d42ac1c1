"""Retries a child's restore that failed on a transient API error. kopf retries a failed create/update handler
(main.tgs_reconcile raises kopf.TemporaryError) but never an event handler, so without this a child deleted
or edited by hand during an API hiccup would only come back with the next periodic resync.

One retry loop per owner at a time, on its own thread (the handlers are sync and block on the API; a loop
sleeps between attempts without holding one of kopf's executor workers): a request for an owner whose loop
is already waiting or running only asks that loop for one more pass. Each attempt is a whole reconcile pass
of the owner, read afresh, so it restores whatever is missing by then (level-based); the backoff is the
reconcile's own (controller.retry_delay: 0.5 s doubling, capped at 60 s)."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable

from kubernetes.client.exceptions import ApiException

from genserve.operator import controller

Key = tuple[str, str]  # the owner's (namespace, name)
logger = logging.getLogger("genserve.operator.restore")


def describe(error: BaseException) -> str:
    """One line (an ApiException's own text carries the headers and the body)."""
    if isinstance(error, ApiException):
        return f"{error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"


def restore_owner(ctx: controller.Context, namespace: str, name: str) -> None:
    """One attempt: a reconcile pass of the owner as it is now; nothing when it is gone or going."""
    owner = ctx.kube.get(controller.KIND, namespace, name)
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return
    controller.reconcile_service(ctx, owner, logger)


class OwnerRetries:
    def __init__(self, attempt: Callable[[str, str], None],
                 is_transient: Callable[[BaseException], bool] = controller.is_transient,
                 delay: Callable[[int], float] = controller.retry_delay):
        self._attempt, self._is_transient, self._delay = attempt, is_transient, delay
        self._lock = threading.Lock()
        self._requests: dict[Key, int] = {}  # owners with a loop -> requests so far (a pass covers those before it)
        self._stopping = threading.Event()

    def request(self, namespace: str, name: str) -> bool:
        """Ask for a retried reconcile of the owner; True when this started its loop."""
        key = (namespace, name)
        with self._lock:
            if self._stopping.is_set():
                return False
            if key in self._requests:
                self._requests[key] += 1  # the loop makes one more pass after the one it may be in
                return False
            self._requests[key] = 1
        # the loop runs in a copy of the handler's context: kopf.event() reads kopf's context variables
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._loop, key), name=f"restore {namespace}/{name}",
                         daemon=True).start()
        return True

    def pending(self) -> list[Key]:
        with self._lock:
            return sorted(self._requests)

    def stop(self) -> None:
        """The operator is stopping: waiting loops end now, a running attempt ends with its request."""
        with self._lock:
            self._stopping.set()

    def _loop(self, key: Key) -> None:
        retry = 0
        try:
            while not self._stopping.wait(self._delay(retry)):
                with self._lock:
                    covered = self._requests[key]
                try:
                    self._attempt(*key)
                except Exception as e:
                    if not self._is_transient(e):
                        # e.g. an invalid spec, already Degraded by the pass (a permanent API error on a child
                        # does not even raise: the pass records it as Degraded ApplyFailed); a retry repeats it
                        logger.warning(f"restore of {key[0]}/{key[1]} stopped: {describe(e)}")
                        return
                    retry += 1
                    logger.info(f"restore of {key[0]}/{key[1]} failed ({describe(e)}); "
                                f"retry {retry + 1} in {self._delay(retry):g} s")
                    continue
                with self._lock:
                    if self._requests[key] == covered:
                        logger.info(f"restore of {key[0]}/{key[1]}: a pass completed on retry {retry + 1}")
                        return
                retry = 0  # asked again while this pass ran: one more, as soon as a first retry would be
        finally:
            with self._lock:
                self._requests.pop(key, None)
