"""The lifecycle side of the keep-alive policy (`policies.keep_alive`): idle times and pre-warms.

One `KeepAlive` per cluster. The router tells it of every arrival (`arrived`), the workers of every
outcome (`finished`), so it knows, per model, how many requests are in flight in the cluster; when
none is left the model's use has ended, and the next arrival's distance to that end is an idle time,
which the policy records. A worker whose queue runs empty asks `window_s` how long its instance stays
active:

- the policy's windows have no pre-warm: `keep_alive_s`;
- they have one and the GPU can pre-warm (it has a prefetcher, which a run gives every GPU when its
  keep-alive policy pre-warms and its retention keeps weights, and the model runs on one GPU): 0, so
  the instance ends now, and a process waits `prewarm_s`, then (unless the model was requested
  meanwhile, or every request of the run already has its outcome) marks the model expected for
  `keep_alive_s` and asks that GPU's prefetcher to load the model's missing units (`Prefetcher.prewarm`);
- else `prewarm_s + keep_alive_s`: what the policy expected of the model, as a keep-alive.

While a model is expected, a pre-warm of another model never displaces its units (`displaceable`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tangram_sim.policies.keep_alive import KeepAlivePolicy, Windows

if TYPE_CHECKING:
    from tangram_sim.core.router import Cluster
    from tangram_sim.core.worker import GpuWorker


class KeepAlive:
    """Per-model uses and pre-warms of a cluster (see the module docstring)."""

    def __init__(self, cluster: Cluster, policy: KeepAlivePolicy) -> None:
        self.cluster = cluster
        self.policy = policy
        self.in_flight: dict[str, int] = {}  # model -> its requests without an outcome
        self.ended: dict[str, float] = {}  # model -> end of its last use, until its next arrival
        self.arrivals: dict[str, int] = {}  # model -> arrivals so far (a pre-warm checks none came since)
        self.expected: dict[str, float] = {}  # model -> end of the window a pre-warm keeps it in

    def arrived(self, model: str, now: float) -> None:
        """A request for `model` arrived (once per request, not when a request is placed again)."""
        n = self.in_flight.get(model, 0)
        if n == 0:
            end = self.ended.pop(model, None)
            if end is not None:
                self.policy.record_idle(model, now - end)
        self.in_flight[model] = n + 1
        self.arrivals[model] = self.arrivals.get(model, 0) + 1
        self.expected.pop(model, None)  # it came: its next use decides its next windows

    def finished(self, model: str, now: float) -> None:
        """A request for `model` has its outcome (completed or rejected)."""
        n = self.in_flight[model] - 1
        self.in_flight[model] = n
        if n == 0:
            self.ended[model] = now

    def window_s(self, worker: GpuWorker) -> float:
        """How long `worker`'s idle instance stays active from now (see the module docstring)."""
        inst = worker.instance
        assert inst is not None
        env = self.cluster.env
        windows = self.policy.windows(inst.model, env.now)
        if windows.prewarm_s <= 0:
            return windows.keep_alive_s
        if worker.prefetch is None or len(inst.group) > 1:
            return windows.prewarm_s + windows.keep_alive_s
        env.process(self._prewarm(worker, inst.model, windows, self.arrivals.get(inst.model, 0)))
        return 0.0

    def wants(self, model: str, now: float) -> bool:
        """Is `model` in the window of a pre-warm (so a pre-warm of it is still worth loading)?"""
        return self.expected.get(model, -1.0) >= now

    def displaceable(self, owners: frozenset[str], now: float) -> bool:
        """May a pre-warm evict units owned by `owners`? Not while one of them is expected."""
        return not any(self.wants(m, now) for m in owners)

    def _prewarm(self, worker: GpuWorker, model: str, windows: Windows, arrivals: int):
        c = self.cluster
        yield c.env.timeout(windows.prewarm_s)
        if self.arrivals.get(model, 0) != arrivals or c.finished >= c.total_requests:
            return  # requested meanwhile (its instance or a cold start took it), or the run is over
        now = c.env.now
        self.expected[model] = now + windows.keep_alive_s
        c.recorder.log(now, worker.gpu_id, "prewarm", -1, model)
        assert worker.prefetch is not None
        worker.prefetch.prewarm(model)
