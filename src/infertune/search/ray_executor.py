"""Trials on a Ray cluster (``infertune tune ... --executor ray [--ray-address HOST:PORT]``).

The one module that imports ray (``pip install 'infertune[ray]'``). Each trial is a few Ray tasks
(``search.stages``): ``build`` the variant from the source and its calibration's recipe, ``evaluate``
it on each shard of the evaluation set (``--ray-shard-samples`` feeds each, on as many workers),
``judge`` the shards' per-sample sums joined in order (exactly the verdict of the whole set, with
its bootstrap), and ``time_variant``. Models, feeds, reference outputs and recipes travel through
Ray's object store; a user metric travels as its file path and is imported there (the file must be
on a path every node shares); nothing of the user's is pickled. Tasks that die with their worker
are retried (``RETRIES``); an error of the variant itself is a failed trial, as it is locally.

The journal stays the single source of truth: only the driver (the search, in this process) writes
it, trial by trial as they finish, so a killed driver is resumed by running the same command again.

Machine kinds are never mixed. Every task asks for the resource ``infertune-<kind>`` where kind
(``fingerprint.kind_label``) hashes the driver's CPU model, ISA flags and GPUs: the trials run on
nodes of the driver's kind only. Each such node offers 1 of it: accuracy tasks take 1% (they run
side by side), a latency measurement takes all of it, so it has the node to itself. Label each node
of the driver's kind when starting it (``infertune ray-resources`` prints the flag for a machine):

    ray start --address HEAD:6379 --resources '{"infertune-<kind>": 1}'

Without an address, a Ray is started on this machine (and stopped at the end) with that resource.
The runoff among the finalists and the report's measurements run in the driver, a machine of the
target kind by construction.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import ray

from infertune.errors import BackendUnavailable, InfertuneError, UsageError
from infertune.fingerprint import kind_label, machine_kind, versions
from infertune.search import stages
from infertune.search.measure import Measured, TrialRunner, failed, finish
from infertune.search.trials import TrialSpec

RETRIES = 3  # a task whose worker dies (killed, node lost) is run again up to this many times
EVAL_SHARE = 0.01  # of a node's kind resource per accuracy task
DEFAULT_SHARD_SAMPLES = 256


def kind_resource() -> str:
    """The Ray resource that marks a node of this machine's kind."""
    return f"infertune-{kind_label()}"


def resources_flag() -> str:
    """What to give ``ray start --resources`` on a machine of this kind."""
    return json.dumps({kind_resource(): 1})


@dataclass
class Shipped:
    """One search's data in the object store."""

    source: ray.ObjectRef
    feeds: list[ray.ObjectRef]  # one list of feeds per shard
    refs: list[ray.ObjectRef]  # the float model's outputs per shard (tasks)
    timing_feed: ray.ObjectRef
    recipes: dict[tuple[str, str], ray.ObjectRef]


@dataclass
class Flight:
    spec: TrialSpec
    model: ray.ObjectRef
    verdict: ray.ObjectRef
    p50: ray.ObjectRef
    start: float


class RayExecutor:
    """Trials as Ray tasks on nodes of this machine's kind; see the module docstring."""

    def __init__(self, address: str | None = None, shard_samples: int | None = None) -> None:
        if shard_samples is not None and shard_samples < 1:
            raise UsageError(f"--ray-shard-samples must be >= 1, got {shard_samples}")
        self.address, self.shard_samples = address, shard_samples or DEFAULT_SHARD_SAMPLES
        self.resource = kind_resource()
        self.started = False
        self.shipped: dict[int, Shipped] = {}
        self.tasks: dict[str, ray.remote_function.RemoteFunction] = {}

    # ---- the cluster ------------------------------------------------------------------------------
    def connect(self) -> None:
        if ray.is_initialized():
            pass
        elif self.address:
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise BackendUnavailable(f"cannot reach the Ray cluster at {self.address}: {e}") from None
            self.started = True
        else:
            ray.init(num_cpus=os.cpu_count() or 1, resources={self.resource: 1}, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            self.started = True
        have = ray.cluster_resources().get(self.resource, 0)
        if have < 1:
            kind = machine_kind()
            raise UsageError(f"no node of the Ray cluster at {self.address or 'this machine'} offers the resource "
                             f"{self.resource} (machines of this kind: {kind['cpu']}, {' '.join(kind['isa'])}"
                             f"{', ' + ', '.join(kind['gpus']) if kind['gpus'] else ''}): start each node of this "
                             f"kind with ray start ... --resources '{resources_flag()}'")
        eval_opts = {"num_cpus": 1, "resources": {self.resource: EVAL_SHARE}, "max_retries": RETRIES}
        self.tasks = {name: ray.remote(getattr(stages, name)).options(**eval_opts)
                      for name in ("build", "reference", "evaluate", "judge")}
        self.tasks["time_variant"] = ray.remote(stages.time_variant).options(
            num_cpus=1, resources={self.resource: 1}, max_retries=RETRIES)

    def close(self) -> None:
        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False
        self.shipped.clear()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- trials -----------------------------------------------------------------------------------
    def run(self, runner: TrialRunner, specs: Sequence[TrialSpec]) -> Iterator[Measured]:
        if not specs:
            return
        if runner.budget.fn is not None and not hasattr(runner.budget.fn, "sha256"):
            raise UsageError("a metric given as a Python function cannot run on Ray workers (its code would have "
                             "to be pickled): put it in a file and give it as FILE.py:FUNC "
                             "(infertune.usercode.UserFunction)")
        if not self.tasks:
            self.connect()
        shipped = self.ship(runner)
        flights = [self.submit(runner, shipped, s) for s in specs]
        yield from self.collect(runner, flights)

    def ship(self, runner: TrialRunner) -> Shipped:
        """The source, the evaluation shards and their reference outputs, in the object store once."""
        key = id(runner)
        if key not in self.shipped:
            ev = runner.evaluator
            feeds = [ray.put(ev.feeds[i:i + self.shard_samples]) for i in range(0, len(ev.feeds), self.shard_samples)]
            source = ray.put(runner.source.to_bytes())
            refs = [self.tasks["reference"].remote(source, f, ev.settings) for f in feeds]
            self.shipped[key] = Shipped(source, feeds, refs, ray.put(ev.feeds[0]), {})
        return self.shipped[key]

    def submit(self, runner: TrialRunner, shipped: Shipped, spec: TrialSpec) -> Flight:
        start = time.perf_counter()
        recipe = None
        if spec.precision == "int8":  # FP16 is converted on the worker, FP32 is the source
            key = (spec.method, spec.target, spec.algorithms, spec.prepared)  # what the calibration depends on
            if key not in shipped.recipes:  # calibrated once, in the driver: every worker builds the same model
                shipped.recipes[key] = ray.put(runner.recipe(spec))
            recipe = shipped.recipes[key]
        doc = asdict(spec)
        t, ev, fn = self.tasks, runner.evaluator, runner.budget.fn
        model = t["build"].remote(shipped.source, recipe, doc, versions().get("infertune", "?"))
        settings = runner.eval_settings(spec)
        shards = [t["evaluate"].remote(shipped.source, model, f, r, doc, settings, fn is not None)
                  for f, r in zip(shipped.feeds, shipped.refs, strict=True)]
        verdict = t["judge"].remote(runner.budget, ev.labels, len(shards), *shards,
                                    *(shipped.refs + shipped.feeds if fn is not None else []))
        p50 = t["time_variant"].remote(shipped.source, model, shipped.timing_feed, doc, runner.latency_s,
                                       runner.run_settings(spec))
        return Flight(spec, model, verdict, p50, start)

    def collect(self, runner: TrialRunner, flights: list[Flight]) -> Iterator[Measured]:
        """Each trial as soon as its verdict and its latency are in (in any order)."""
        waiting = {ref: f for f in flights for ref in (f.verdict, f.p50)}
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1)
            flight = waiting.pop(ready[0])
            if flight.verdict not in waiting and flight.p50 not in waiting:
                yield self.landed(flight)

    def landed(self, flight: Flight) -> Measured:
        try:
            verdict, p50, model = ray.get([flight.verdict, flight.p50, flight.model])
        except ray.exceptions.RayError as e:  # the cluster lost it (after RETRIES), not the variant's fault
            raise InfertuneError(f"trial {flight.spec.label()} was lost on the Ray cluster after {RETRIES} "
                                 f"retries: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        seconds = time.perf_counter() - flight.start
        for part in (model, verdict, p50):
            if isinstance(part, stages.Failed):
                if part.stop:
                    raise part.error
                return Measured(failed(flight.spec, part.error, seconds))
        variant = None if model is None else stages.model_from(model)
        return finish(flight.spec, model is None, verdict, p50, seconds, variant)
