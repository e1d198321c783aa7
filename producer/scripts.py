"""The Lua scripts podembed runs in Redis, each a module constant whose header names its KEYS and ARGV.

A `Script` declares the names of its KEYS and ARGV in order, and its source starts by binding each name
to its slot (`local record, done = KEYS[1], KEYS[2]`), so the Lua reads by name. `Script.run` takes the
keys (a job's `JobKeys`, say) and the arguments by name and sends them in the declared order: no caller
counts positions. The take script alone has as many KEYS as there are queues: they come as a list, its ARGV
by name (`ordered`).

Two sections: the job-record scripts (`producer.jobs`), and the rq-side scripts (`producer.batches`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from redis import Redis
from redis.client import Pipeline

from producer.connections import run_script

# Job-record scripts


@dataclass(frozen=True)
class Script:
    """A Lua script with its KEYS and ARGV named, in the order it receives them."""

    keys: tuple[str, ...]
    argv: tuple[str, ...]
    body: str

    @cached_property
    def source(self) -> str:
        return "\n".join([_bind("KEYS", self.keys), _bind("ARGV", self.argv), self.body])

    def run(self, client: Redis | Pipeline, keys: Mapping[str, str], **argv: object) -> object:
        """Run it on `client` (a pipeline queues it), taking its keys from `keys` and its ARGV from `argv`, by name."""
        return run_script(client, self.source, [keys[name] for name in self.keys], ordered(self.argv, argv))


def ordered(names: tuple[str, ...], values: Mapping[str, object]) -> list[object]:
    """`values` in the order `names` declares; a TypeError if they name other arguments."""
    if set(values) != set(names):
        raise TypeError(f"the script takes {', '.join(names)}; given {', '.join(values) or 'nothing'}")
    return [values[name] for name in names]


def _bind(table: str, names: tuple[str, ...]) -> str:
    slots = ", ".join(f"{table}[{i}]" for i in range(1, len(names) + 1))
    return f"local {', '.join(names)} = {slots}" if names else ""


# A job's keys that expire together, `ttl` past its last change (`producer.jobs.JobKeys` says what each holds).
JOB_KEYS = ("record", "done", "running", "failed", "errors", "batches", "episodes", "cancelled", "progress",
            "sizes")

# Shared end of the scripts that count a batch or the end of the enqueue: the job is over once it is wholly
# enqueued (records written before streaming have no flag) and every batch is done or failed for good, and
# then it is stamped `now`; every key of the job lives `ttl` past the last change. Answers JOB_ENDED (2) or
# COUNTED (1).
_JOB_OVER = """
local over = redis.call('HGET', record, 'enqueue_done') ~= '0'
   and redis.call('SCARD', done) + redis.call('HLEN', failed) >= tonumber(redis.call('HGET', record, 'batches_total'))
if over then redis.call('HSET', record, 'finished_at', now) end
for _, key in ipairs({record, done, running, failed, errors, batches, episodes, cancelled, progress, sizes}) do
  redis.call('EXPIRE', key, ttl)
end
if over then return 2 end
return 1
"""

# Mark the job wholly enqueued; answers as `_JOB_OVER`.
# KEYS: JOB_KEYS. ARGV: now, ttl.
ENQUEUE_DONE = Script(JOB_KEYS, ("now", "ttl"), """
redis.call('HSET', record, 'enqueue_done', '1')
""" + _JOB_OVER)

# Count a finished batch once, in its job and in the running totals (`{counter}\t{device}\t{model}` -> value);
# answers 0 (ALREADY_COUNTED) for a batch counted before (run again after its count: a crash or a MongoDB error
# came between), which still leaves the running set; else as `_JOB_OVER`.
# KEYS: JOB_KEYS, totals. ARGV: batch_id, embedded, skipped, gpu_seconds, cost_usd, device, model, tokens, now,
# ttl.
FINISH_BATCH = Script((*JOB_KEYS, "totals"), ("batch_id", "embedded", "skipped", "gpu_seconds", "cost_usd", "device",
                                              "model", "tokens", "now", "ttl"), """
redis.call('SREM', running, batch_id)
redis.call('HDEL', progress, batch_id)
if redis.call('SADD', done, batch_id) == 0 then return 0 end
redis.call('HDEL', failed, batch_id)
redis.call('HDEL', errors, batch_id)
redis.call('HINCRBY', record, 'embedded', embedded)
redis.call('HINCRBY', record, 'skipped', skipped)
redis.call('HINCRBYFLOAT', record, 'gpu_seconds', gpu_seconds)
redis.call('HINCRBYFLOAT', record, 'cost_usd', cost_usd)
redis.call('HSET', record, 'device', device)
local at = '\t' .. device .. '\t' .. model
redis.call('HINCRBY', totals, 'batches' .. at, 1)
redis.call('HINCRBY', totals, 'embedded' .. at, embedded)
redis.call('HINCRBY', totals, 'skipped' .. at, skipped)
redis.call('HINCRBY', totals, 'tokens' .. at, tokens)
redis.call('HINCRBYFLOAT', totals, 'gpu_seconds' .. at, gpu_seconds)
redis.call('HINCRBYFLOAT', totals, 'cost_usd' .. at, cost_usd)
""" + _JOB_OVER)

# Mark a batch running. Answers -1 if the job has no such batch (it ended and expired, or never existed; `index`
# is -1 for an id that is not one of the job's), else 1 if an earlier run counted it already, 0 if not.
# KEYS: record, done, running. ARGV: batch_id, index (the batch's in its job).
CLAIM_BATCH = Script(("record", "done", "running"), ("batch_id", "index"), """
local total = redis.call('HGET', record, 'batches_total')
if not total or tonumber(index) < 0 or tonumber(index) >= tonumber(total) then return -1 end
redis.call('SADD', running, batch_id)
return redis.call('SISMEMBER', done, batch_id)
""")

# Count a batch failed for good, with its reason; answers 0 for a batch counted done (it stays done), else as
# `_JOB_OVER`.
# KEYS: JOB_KEYS. ARGV: batch_id, n_chunks, reason, now, ttl.
FAIL_BATCH = Script(JOB_KEYS, ("batch_id", "n_chunks", "reason", "now", "ttl"), """
if redis.call('SISMEMBER', done, batch_id) == 1 then return 0 end
redis.call('SREM', running, batch_id)
redis.call('HDEL', progress, batch_id)
redis.call('HSET', failed, batch_id, n_chunks)
redis.call('HSET', errors, batch_id, reason)
""" + _JOB_OVER)

# Add `stored` chunks to a running batch's progress; answers 0 (and keeps no entry) for a batch already
# counted, else 1.
# KEYS: done, progress. ARGV: batch_id, stored, ttl.
STORED_SO_FAR = Script(("done", "progress"), ("batch_id", "stored", "ttl"), """
if redis.call('SISMEMBER', done, batch_id) == 1 then return 0 end
redis.call('HINCRBY', progress, batch_id, stored)
redis.call('EXPIRE', progress, ttl)
return 1
""")

# Claim the delivery of a job's end to its notify URL: answers the URL if this caller now owns the delivery,
# nil if the job asked for none or another process claimed it first.
# KEYS: record. ARGV: none.
CLAIM_NOTIFY = Script(("record",), (), """
local url = redis.call('HGET', record, 'notify_url')
if not url then return false end
if redis.call('HSETNX', record, 'notify_state', 'sending') == 0 then return false end
return url
""")


# rq-side scripts

# Takes the next batch from the queues in priority order (`producer.batches.take`).
# KEYS: the queues highest first, then their intermediate lists, then their scheduled registries (the same
#   order), then the backfill's share credit.
# ARGV: share (the backfill's share in `scale`ths, 0: strict priority), scale (what a whole share is worth),
#   hash_prefix (the prefix of a batch's hash key, rq's job hash).
# The batch's hash is not among KEYS (its id is known only here): fine on a single Redis, which is all rq
# supports. Returns {index of the queue, batch id, the batch's hash as a flat list}, or, when every queue is
# empty, {-1, the earliest scheduled retry's score (false: none)}.
TAKE = Script(keys=(), argv=("share", "scale", "hash_prefix"), body="""
share, scale = tonumber(share), tonumber(scale)
local n = (#KEYS - 1) / 3
local credit = KEYS[#KEYS]
local pick = 0
for i = 1, n do
  if redis.call('LLEN', KEYS[i]) > 0 then pick = i; break end
end
if pick == 0 then
  local due = false
  for i = 2 * n + 1, 3 * n do
    local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')[2]
    if first and (not due or tonumber(first) < tonumber(due)) then due = first end
  end
  return {-1, due}
end
if share > 0 and pick < n and redis.call('LLEN', KEYS[n]) > 0 then
  if redis.call('INCRBY', credit, share) >= scale then
    redis.call('DECRBY', credit, scale)
    pick = n
  end
end
local batch_id = redis.call('LMOVE', KEYS[pick], KEYS[n + pick], 'LEFT', 'RIGHT')
return {pick - 1, batch_id, redis.call('HGETALL', hash_prefix .. batch_id)}
""")


# Puts a batch that was taken but not started back on its queue (`producer.batches.lifecycle`).
# KEYS: queue.
# ARGV: batch_id, behind (the batch put back earlier that this one goes right behind; "": none, or that one
#   was taken again since: then it goes to the front).
# Returns 1 when it went right behind `behind`, 0 when it went to the front.
PUT_BACK = Script(keys=("queue",), argv=("batch_id", "behind"), body="""
if behind ~= '' and redis.call('LINSERT', queue, 'AFTER', behind, batch_id) > 0 then return 1 end
redis.call('LPUSH', queue, batch_id)
return 0
""")

