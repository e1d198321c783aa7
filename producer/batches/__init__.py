"""A batch's life in rq, in one place: everything podembed does with rq's objects, keys, registries,
scheduler and scripts.

A batch is one rq job (`BatchJob`); "job" elsewhere in podembed means a podembed job, a set of batches.

- `job`: the batch job class, loading, evicting and reading batches;
- `take`: the next batch from the queues in priority order;
- `lifecycle`: a taken batch registered, claimed, finished, failed or put back, and its heartbeats;
- `worker`: the rq worker whose bookkeeping the drain uses;
- `upkeep`: rq's registry maintenance, due retries, the scheduler's locks;
- `registries`: what the producer, the fleet view and the launcher read of the queues and registries.

Where rq offers an operation publicly it is used; where only an internal will do, the call says so and
names the rq version it was read from (3.0.0, the pin of config/constraints.txt).
`tests/test_rq_contract.py` checks each of those internals, by name.
"""
