"""The Admin service: tokens, the history, volunteers (admin tokens only)."""

from __future__ import annotations

from coordinator.gateway import admin

from coordinator.model import retention

from coordinator.schedule import roster
from coordinator.gateway.auth import token_id
from nomoat.v1 import nomoat_pb2 as pb
from nomoat.v1 import nomoat_pb2_grpc as rpc

from coordinator.gateway.servicers.base import Deps, _answers


class AdminServicer(rpc.AdminServicer):
    """Admin-only calls (the interceptor lets only admin tokens through)."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    @_answers
    def CreateToken(self, request, context):
        token = admin.create_token(self.deps.registry, request.role, request.name)
        return pb.CreateTokenReply(token=token, token_id=token_id(token))

    @_answers
    def RevokeToken(self, request, context):
        admin.revoke_token(self.deps.registry, request.token)
        return pb.RevokeTokenReply(revoked=True)

    @_answers
    def ListTokens(self, request, context):
        return pb.ListTokensReply(tokens=[
            pb.TokenInfo(token_id=e.token_id, role=e.role, name=e.name, created=e.created)
            for e in self.deps.registry.list()
        ])

    @_answers
    def Rollback(self, request, context):
        number, loss = admin.rollback(self.deps.ledger, request.version)
        return pb.VersionReply(version=number, eval_loss=loss)

    @_answers
    def Unmerge(self, request, context):
        number, loss = admin.unmerge(self.deps.ledger, request.adapter_id)
        return pb.VersionReply(version=number, eval_loss=loss)

    @_answers
    def ListVolunteers(self, request, context):
        return pb.ListVolunteersReply(volunteers=[
            pb.VolunteerInfo(volunteer_id=v.volunteer_id, name=v.name, joined=v.joined, worker_ids=v.worker_ids,
                             active_workers=v.active_workers, standing=v.standing, trust_score=v.score,
                             reason=v.reason, role=v.role)
            for v in roster.listing(self.deps.ledger, self.deps.settings)])

    def Sweep(self, request, context):
        d = self.deps
        report = retention.sweep_under(d.settings, d.ledger, d.store, d.history.dir if d.history else None,
                                       d.operations.lock if d.operations else None, dry_run=request.dry_run)
        return pb.SweepReply(lines=report.lines(), blobs=report.blobs, bytes=report.bytes, records=report.records)


    @_answers
    def BanVolunteer(self, request, context):
        volunteer_id = roster.resolve(self.deps.ledger, request.volunteer_id)
        dropped = roster.ban(self.deps.ledger, self.deps.registry, volunteer_id)
        return pb.VolunteerReply(volunteer_id=volunteer_id, leases_dropped=dropped)

    @_answers
    def ClearVolunteer(self, request, context):
        volunteer_id = roster.resolve(self.deps.ledger, request.volunteer_id)
        roster.clear(self.deps.ledger, volunteer_id)
        return pb.VolunteerReply(volunteer_id=volunteer_id)

    @_answers
    def RotateJoinCode(self, request, context):
        kept = self.deps.settings.data_dir / roster.JOIN_CODE_FILE
        code = roster.rotate_join_code(self.deps.ledger, self.deps.registry, kept)
        return pb.RotateJoinCodeReply(join_code=code)
