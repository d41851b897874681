"""TrainerLookup: asks the trainer about a run the streamer has not seen.

A viewer may subscribe to a run that no trainer published to this streamer since
it started: a run that ended, or one from before a restart. The trainer (its run
store) knows: :meth:`TrainerLookup.describe` answers the run's status and its
stored scalar history (down-sampled), or None when no such run exists.
"""

from __future__ import annotations

import logging

import grpc

from tensorwire.calls.channels import ChannelPool
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.errors import UnavailableError
from tensorwire.rpc.auth import ClientSecurity
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc

log = logging.getLogger(__name__)


class TrainerLookup:
    """GetRun + GetRunScalars against the trainer at ``target``."""

    def __init__(self, target: str, *, timeout_s: float = 3.0,
                 security: ClientSecurity | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._pool = ChannelPool(target, min_size=1, max_size=2, name=f"lookup {target}",
                                 health_check_interval_s=0, security=security)

    async def describe(self, run_id: str, max_points: int) -> tuple[cpb.RunStatus, cpb.ScalarBatch] | None:
        """The run's status and stored history; None if the trainer has no such run.
        Raises UnavailableError when the trainer cannot answer."""
        try:
            async with self._pool.acquire() as channel:
                stub = tpb_grpc.TrainerServiceStub(channel)
                # Both at once (a grpc.aio call starts when made): a new viewer's first
                # chart waits for the slower one only. A failed one cancels the other.
                run_call = stub.GetRun(tpb.GetRunRequest(run_id=run_id), timeout=self.timeout_s)
                scalars_call = stub.GetRunScalars(
                    tpb.GetRunScalarsRequest(run_id=run_id, max_points=max_points), timeout=self.timeout_s)
                try:
                    run = (await run_call).run
                    scalars = (await scalars_call).scalars
                finally:
                    run_call.cancel()  # no-op once done
                    scalars_call.cancel()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise UnavailableError(f"trainer {self.target} did not answer about run {run_id!r}: "
                                   f"{exc.code().name} {exc.details()}") from None
        status = cpb.RunStatus(
            run_id=run.run_id, task=run.task, state=run.state, step=run.step,
            steps_per_second=run.steps_per_second, produced_at=run.produced_at,
            metrics=run.metrics, params=run.params, error=run.error,
        )
        return status, scalars

    async def aclose(self) -> None:
        await self._pool.aclose()
