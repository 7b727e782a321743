"""The job store in Redis: the source of truth for every job (DESIGN §5).

Keys (prefix ``generalrm:``)::

    job:{id}          hash; every field JSON-encoded (id, kind, queue, spec, status, attempt, ...)
    job:{id}:cancel   set by a cancel request, read by the running trainer at step boundaries
    job:{id}:lease    the token of the one worker running the job; expires unless heartbeats renew it
    jobs              sorted set of job ids by creation time (listing; pruned past the retention)
    jobs:active       set of ids not yet in a final state (what the reaper looks at)
    jobs:counts       hash: jobs per status, moved by every transition (what /metrics reads)

A finished record expires ``retention_seconds`` after it ends (GENERALRM_JOB_RETENTION_SECONDS).

Every state transition is one Lua script, so the checks and the writes are atomic: a worker
can only claim a job nobody holds, only the lease holder can write progress or a final
status, and a cancel cannot slip between a worker's check and its claim. Staleness is the
lease's TTL in Redis, so it needs no clock agreement between hosts.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from training.atomic import utc_now

PREFIX = "generalrm:"
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
CANCEL_KEY_TTL_SECONDS = 30 * 24 * 3600
FIELDS = (
    "id", "kind", "queue", "spec", "status", "attempt", "max_attempts", "heartbeat", "worker",
    "progress", "metrics", "artifacts", "error", "attempts", "cancel_requested",
    "created_at", "updated_at", "finished_at",
)

# Every script that changes a status moves the per-status counters with it (COUNTS: a hash),
# so /metrics reads one hash instead of every record; a record that reaches a final status
# expires after the retention period (job_retention_seconds), with its cancel key.
_PRELUDE = """
local function move(counts, from, to)
  if from == to then return end
  if from then redis.call('HINCRBY', counts, from, -1) end
  redis.call('HINCRBY', counts, to, 1)
end
local function expire_finished(record, cancel, ttl)
  redis.call('EXPIRE', record, ttl)
  redis.call('DEL', cancel)
end
"""

# KEYS: record, lease, cancel, active, counts   ARGV: token, lease_ms, now, max_attempts, worker,
# job_id, exhausted_error, retention
_CLAIM = _PRELUDE + """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return {'missing'} end
local status = cjson.decode(raw)
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  return {'finished', status}
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'updated_at', ARGV[3], 'finished_at', ARGV[3])
  redis.call('SREM', KEYS[4], ARGV[6])
  move(KEYS[5], status, 'cancelled')
  expire_finished(KEYS[1], KEYS[3], ARGV[8])
  return {'cancelled'}
end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'owned'} end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') + 1
if attempt > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', '"failed"', 'error', ARGV[7], 'updated_at', ARGV[3],
    'finished_at', ARGV[3])
  redis.call('DEL', KEYS[2])
  redis.call('SREM', KEYS[4], ARGV[6])
  move(KEYS[5], status, 'failed')
  expire_finished(KEYS[1], KEYS[3], ARGV[8])
  return {'exhausted', tostring(attempt - 1)}
end
redis.call('HSET', KEYS[1], 'attempt', tostring(attempt), 'status', '"running"',
  'heartbeat', ARGV[3], 'worker', ARGV[5], 'updated_at', ARGV[3])
move(KEYS[5], status, 'running')
return {'claimed', tostring(attempt)}
"""

# KEYS: record, lease   ARGV: token, field1, value1, ...
_UPDATE_IF_OWNER = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# KEYS: record, lease, active, cancel, counts   ARGV: token, job_id, status, retention,
# too_late_note, field1, value1, ...
_FINISH_IF_OWNER = _PRELUDE + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local previous = cjson.decode(redis.call('HGET', KEYS[1], 'status'))
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[3] == 'succeeded' and redis.call('EXISTS', KEYS[4]) == 1 then
  -- a cancel that arrived after the results were published: said so, not silently dropped
  redis.call('HSET', KEYS[1], 'cancel_outcome', ARGV[5])
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
move(KEYS[5], previous, ARGV[3])
expire_finished(KEYS[1], KEYS[4], ARGV[4])
return 1
"""

# KEYS: record, lease   ARGV: token, lease_ms, now
_RENEW = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'heartbeat', ARGV[3])
return 1
"""

# KEYS: record, lease, cancel, active, counts   ARGV: now, max_attempts, job_id, exhausted_error,
# retention
_REAP = _PRELUDE + """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then redis.call('SREM', KEYS[4], ARGV[3]); return 'missing' end
local status = cjson.decode(raw)
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  redis.call('SREM', KEYS[4], ARGV[3]); return 'finished'
end
if status ~= 'running' then return 'queued' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'alive' end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'updated_at', ARGV[1], 'finished_at', ARGV[1])
  redis.call('SREM', KEYS[4], ARGV[3])
  move(KEYS[5], status, 'cancelled')
  expire_finished(KEYS[1], KEYS[3], ARGV[5])
  return 'cancelled'
end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
if attempt >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', '"failed"', 'error', ARGV[4], 'updated_at', ARGV[1],
    'finished_at', ARGV[1])
  redis.call('SREM', KEYS[4], ARGV[3])
  move(KEYS[5], status, 'failed')
  expire_finished(KEYS[1], KEYS[3], ARGV[5])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', '"queued"', 'updated_at', ARGV[1])
move(KEYS[5], status, 'queued')
return 'requeued'
"""

# KEYS: record, lease, counts   ARGV: token, now
_RELEASE_IF_OWNER = _PRELUDE + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '1')
redis.call('HSET', KEYS[1], 'status', '"queued"', 'attempt', tostring(math.max(attempt - 1, 0)),
  'updated_at', ARGV[2])
redis.call('DEL', KEYS[2])
move(KEYS[3], 'running', 'queued')
return 1
"""

# KEYS: record, cancel, active, counts   ARGV: now, job_id, ttl_seconds, retention
_CANCEL = _PRELUDE + """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return 'missing' end
local status = cjson.decode(raw)
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  return 'ended:' .. status
end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
redis.call('HSET', KEYS[1], 'cancel_requested', 'true', 'updated_at', ARGV[1])
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'finished_at', ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[2])
  move(KEYS[4], status, 'cancelled')
  expire_finished(KEYS[1], KEYS[2], ARGV[4])
  return 'cancelled'
end
return 'cancelling'
"""

# KEYS: record   ARGV: now. A queued job's message was sent again: its clock restarts.
_TOUCH_IF_QUEUED = """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw or cjson.decode(raw) ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
return 1
"""

CANCEL_TOO_LATE = ("too late: the job had already published its results when the cancel "
                   "arrived; it is kept as succeeded")


def record_time() -> str:
    """Job-record timestamps: ISO-8601 UTC to the millisecond (ordering within a second)."""
    return utc_now("milliseconds")


def new_job_id() -> str:
    return uuid.uuid4().hex


def json_safe(value: Any) -> Any:
    """NaN and infinities become None: records are served as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(json_safe(value), default=str)


def _encode(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for key, value in fields.items():
        flat += [key, _dumps(value)]
    return flat


def _decode(raw: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    record = {}
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        record[key] = json.loads(value)
    return record


@dataclass(frozen=True)
class ClaimResult:
    """What :meth:`JobStore.claim` decided: ``outcome`` is claimed, owned, finished,
    cancelled, exhausted or missing; ``attempt`` is set when claimed or exhausted."""

    outcome: str
    attempt: int = 0
    status: str | None = None


class JobStore:
    """Reads and atomic transitions of job records; knows nothing of Celery or training."""

    def __init__(self, client: redis.Redis, retention_seconds: int = 7 * 24 * 3600) -> None:
        self.redis = client
        self.retention_seconds = int(retention_seconds)
        self._touch_if_queued = client.register_script(_TOUCH_IF_QUEUED)
        self._claim = client.register_script(_CLAIM)
        self._update_if_owner = client.register_script(_UPDATE_IF_OWNER)
        self._finish_if_owner = client.register_script(_FINISH_IF_OWNER)
        self._renew = client.register_script(_RENEW)
        self._reap = client.register_script(_REAP)
        self._cancel = client.register_script(_CANCEL)
        self._release_if_owner = client.register_script(_RELEASE_IF_OWNER)

    @classmethod
    def from_url(cls, url: str, retention_seconds: int = 7 * 24 * 3600) -> JobStore:
        # short timeouts: an API route must answer 503 quickly when Redis is gone, not hang
        return cls(
            redis.Redis.from_url(
                url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=15
            ),
            retention_seconds,
        )

    # ------------------------------------------------------------------ keys
    @staticmethod
    def record_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def cancel_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}:cancel"

    @staticmethod
    def lease_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}:lease"

    @staticmethod
    def drain_key(worker: str) -> str:
        return f"{PREFIX}worker:{worker}:draining"

    INDEX_KEY = f"{PREFIX}jobs"
    ACTIVE_KEY = f"{PREFIX}jobs:active"
    COUNTS_KEY = f"{PREFIX}jobs:counts"

    # ------------------------------------------------------------------ reads
    def ping(self) -> bool:
        return bool(self.redis.ping())

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(self.record_key(job_id))
        return _decode(raw) if raw else None

    def list(self, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        """Newest first; ``status`` filters (scanning further back as needed)."""
        found: list[dict[str, Any]] = []
        start, chunk = 0, max(limit, 50)
        while len(found) < limit:
            ids = self.redis.zrevrange(self.INDEX_KEY, start, start + chunk - 1)
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.record_key(job_id.decode()))
            for raw in pipe.execute():
                if raw:
                    record = _decode(raw)
                    if status is None or record.get("status") == status:
                        found.append(record)
            start += chunk
        return found[:limit]

    def counts(self) -> dict[str, int]:
        """Jobs per status (for ``/metrics``): one hash read, kept by the transitions. Queued
        and running are the jobs now in that state; the final statuses count every job that
        ended so, including records expired since."""
        raw = self.redis.hgetall(self.COUNTS_KEY)
        counts = dict.fromkeys(STATUSES, 0)
        for key, value in raw.items():
            counts[key.decode() if isinstance(key, bytes) else key] = int(value)
        return counts

    def prune_index(self) -> int:
        """Drop listing entries of records that have expired (older than the retention)."""
        horizon = time.time() - self.retention_seconds
        return int(self.redis.zremrangebyscore(self.INDEX_KEY, 0, horizon))

    def active_ids(self) -> list[str]:
        return sorted(member.decode() for member in self.redis.smembers(self.ACTIVE_KEY))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(job_id)))

    def stop_requests(self, job_id: str, worker: str) -> tuple[bool, bool]:
        """(cancel asked for the job, the worker is shutting down) in one round trip."""
        cancel, drain = self.redis.mget(self.cancel_key(job_id), self.drain_key(worker))
        return cancel is not None, drain is not None

    def set_draining(self, worker: str, draining: bool, ttl_seconds: int = 3600) -> None:
        """Mark a worker as shutting down: its running job checkpoints and goes back to the
        queue. Cleared when a worker of that name starts."""
        if draining:
            self.redis.set(self.drain_key(worker), "1", ex=ttl_seconds)
        else:
            self.redis.delete(self.drain_key(worker))

    def lease_holder(self, job_id: str) -> str | None:
        value = self.redis.get(self.lease_key(job_id))
        return value.decode() if value is not None else None

    # ------------------------------------------------------------------ transitions
    def create(
        self, job_id: str, kind: str, queue: str, spec: dict[str, Any], max_attempts: int
    ) -> dict[str, Any]:
        created = record_time()
        record = {
            "id": job_id, "kind": kind, "queue": queue, "spec": spec, "status": "queued",
            "attempt": 0, "max_attempts": max_attempts, "heartbeat": None, "worker": None,
            "progress": {}, "metrics": {}, "artifacts": {}, "error": None, "attempts": [],
            "cancel_requested": False, "created_at": created, "updated_at": created,
            "finished_at": None,
        }
        pipe = self.redis.pipeline(transaction=True)
        encoded = {key: _dumps(value) for key, value in record.items()}
        pipe.hset(self.record_key(job_id), mapping=encoded)
        pipe.zadd(self.INDEX_KEY, {job_id: time.time()})
        pipe.sadd(self.ACTIVE_KEY, job_id)
        pipe.hincrby(self.COUNTS_KEY, "queued", 1)
        pipe.execute()
        return record

    def delete(self, job_id: str) -> None:
        """Forget a job whose submission could not be enqueued."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.record_key(job_id), self.cancel_key(job_id), self.lease_key(job_id))
        pipe.zrem(self.INDEX_KEY, job_id)
        pipe.srem(self.ACTIVE_KEY, job_id)
        pipe.hincrby(self.COUNTS_KEY, "queued", -1)
        pipe.execute()

    def touch_if_queued(self, job_id: str) -> bool:
        """Restart a queued job's clock (its message was just sent again)."""
        return bool(self._touch_if_queued(keys=[self.record_key(job_id)],
                                          args=[json.dumps(record_time())]))

    def claim(
        self, job_id: str, token: str, lease_seconds: float, max_attempts: int, worker: str
    ) -> ClaimResult:
        error = {
            "type": "AttemptsExhausted",
            "message": f"the job was started {max_attempts} times and its worker died every "
            "time (killed, out of memory, or crashed); giving up. Its checkpoints are kept "
            "under artifacts/jobs/<id>/.",
        }
        reply = self._claim(
            keys=[self.record_key(job_id), self.lease_key(job_id), self.cancel_key(job_id),
                  self.ACTIVE_KEY, self.COUNTS_KEY],
            args=[token, int(lease_seconds * 1000), json.dumps(record_time()), max_attempts,
                  json.dumps(worker), job_id, json.dumps(error), self.retention_seconds],
        )
        outcome = reply[0].decode()
        if outcome in ("claimed", "exhausted"):
            return ClaimResult(outcome, attempt=int(reply[1]))
        if outcome == "finished":
            return ClaimResult(outcome, status=reply[1].decode())
        return ClaimResult(outcome)

    def update_if_owner(self, job_id: str, token: str, **fields: Any) -> bool:
        fields.setdefault("updated_at", record_time())
        return bool(
            self._update_if_owner(
                keys=[self.record_key(job_id), self.lease_key(job_id)],
                args=[token, *_encode(fields)],
            )
        )

    def finish_if_owner(self, job_id: str, token: str, status: str, **fields: Any) -> bool:
        """Write a final status and release the lease, if ``token`` still holds it."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"{status!r} is not a final status")
        now = record_time()
        fields.update(status=status)
        fields.setdefault("updated_at", now)
        fields.setdefault("finished_at", now)
        return bool(
            self._finish_if_owner(
                keys=[self.record_key(job_id), self.lease_key(job_id), self.ACTIVE_KEY,
                      self.cancel_key(job_id), self.COUNTS_KEY],
                args=[token, job_id, status, self.retention_seconds, json.dumps(CANCEL_TOO_LATE),
                      *_encode(fields)],
            )
        )

    def release_if_owner(self, job_id: str, token: str) -> bool:
        """Hand a stopped (checkpointed) job back: status queued, this attempt not counted."""
        return bool(self._release_if_owner(
            keys=[self.record_key(job_id), self.lease_key(job_id), self.COUNTS_KEY],
            args=[token, json.dumps(record_time())],
        ))

    def renew(self, job_id: str, token: str, lease_seconds: float) -> bool:
        return bool(
            self._renew(
                keys=[self.record_key(job_id), self.lease_key(job_id)],
                args=[token, int(lease_seconds * 1000), json.dumps(record_time())],
            )
        )

    def release(self, job_id: str, token: str) -> None:
        """Drop the lease without a final status (the job goes back to the reaper)."""
        self.redis.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end",
            1, self.lease_key(job_id), token,
        )

    def reap(self, job_id: str, max_attempts: int, stale_seconds: float) -> str:
        """Decide about one active job whose worker may be gone.

        Returns ``requeued`` (status set back to queued: the caller must enqueue it),
        ``failed`` (attempt cap reached), ``cancelled`` (cancel was asked), ``alive``,
        ``queued``, ``finished`` or ``missing``.
        """
        error = {
            "type": "WorkerLost",
            "message": f"no heartbeat for {stale_seconds:g}s on attempt {max_attempts} of "
            f"{max_attempts}: the worker died every time (killed, out of memory, or crashed); "
            "giving up. Its checkpoints are kept under artifacts/jobs/<id>/.",
        }
        reply = self._reap(
            keys=[self.record_key(job_id), self.lease_key(job_id), self.cancel_key(job_id),
                  self.ACTIVE_KEY, self.COUNTS_KEY],
            args=[json.dumps(record_time()), max_attempts, job_id, json.dumps(error),
                  self.retention_seconds],
        )
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def cancel(self, job_id: str) -> str:
        """Ask a job to stop. Returns ``cancelled`` (it was queued: done at once),
        ``cancelling`` (running: its trainer will stop at the next step), ``ended:<status>``
        (it had already ended: nothing changes), or ``missing``."""
        reply = self._cancel(
            keys=[self.record_key(job_id), self.cancel_key(job_id), self.ACTIVE_KEY,
                  self.COUNTS_KEY],
            args=[json.dumps(record_time()), job_id, CANCEL_KEY_TTL_SECONDS,
                  self.retention_seconds],
        )
        return reply.decode() if isinstance(reply, bytes) else str(reply)
