"""A-ASSOCIATE negotiation (PS3.7 Annex D, PS3.8 §7.1): decide accept or reject and build
the answer. Presentation contexts and roles go through pynetdicom's negotiation; access
control, limits and the user information items are ours.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import (
    PresentationContext,
    negotiate_as_acceptor,
    negotiate_as_requestor,
)

from pacsd import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsd.dul import pdu

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"

RESULT_NAMES = {
    0: "acceptance",
    1: "user-rejection",
    2: "no-reason",
    3: "abstract-syntax-not-supported",
    4: "transfer-syntaxes-not-supported",
}


@dataclass(frozen=True)
class AcceptedContext:
    """A presentation context in use on an established association."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    as_scu: bool  # the local AE may send requests of this SOP class
    as_scp: bool  # the local AE may answer requests of this SOP class


@dataclass
class AcceptorPolicy:
    ae_title: str
    check_called_ae: bool
    require_known_callers: bool
    known_callers: frozenset[str]
    # abstract syntax -> transfer syntaxes, in the acceptor's order of preference
    supported: dict[str, list[str]]
    max_pdu_length: int
    user_identity: str = "ignore"
    # SOP classes for which pacsd may also act as SCU on an association it accepted
    # (C-GET's storage sub-operations): abstract syntax -> (scu_role, scp_role) offered
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    _offered: list[PresentationContext] | None = field(default=None, init=False, repr=False, compare=False)
    # Recent decisions by request (see negotiate): id -> (weak reference to it, decision).
    _decisions: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False, compare=False)

    def offered(self) -> list[PresentationContext]:
        """The acceptor's side of context negotiation, built once: pynetdicom checks every
        UID as it is added, and a storage acceptor has hundreds of (class, syntax) pairs,
        which would cost more per association than negotiating the peer's proposal does."""
        if self._offered is None:
            offered = []
            for abstract, syntaxes in self.supported.items():
                cx = PresentationContext()
                cx.abstract_syntax = abstract
                for ts in syntaxes:
                    cx.add_transfer_syntax(ts)
                cx.scu_role, cx.scp_role = self.roles.get(abstract, (None, None))
                offered.append(cx)
            self._offered = offered
        return self._offered


@dataclass
class Decision:
    accepted: bool
    answer: bytes  # encoded A-ASSOCIATE-AC or -RJ PDU
    reason: str = ""
    reject: pdu.Reject | None = None
    contexts: list[AcceptedContext] = field(default_factory=list)
    rejected_contexts: list[tuple[int, str, str]] = field(default_factory=list)
    peer_max_pdu: int = 0
    peer_implementation: str = ""
    peer_version: str = ""
    user_identity: str = ""


def _reject(result: int, source: int, reason: int, why: str) -> Decision:
    rj = pdu.Reject(result, source, reason)
    return Decision(False, pdu.encode_reject(result, source, reason), why, reject=rj)


def reject_busy(why: str) -> Decision:
    return _reject(pdu.RJ_TRANSIENT, pdu.RJ_SOURCE_PRESENTATION, pdu.RJ_PRESENTATION_LOCAL_LIMIT, why)


# How many recent A-ASSOCIATE-RQs are remembered (decoded, and their answers), and up to what
# size: storescu's proposal of ~128 contexts is ~10 KB, and its decoded form ~9 times that.
# At most a few MiB, whatever peers send.
RECENT_REQUESTS = 32
CACHEABLE_REQUEST_BYTES = 32 * 1024


def negotiate(rq: A_ASSOCIATE, policy: AcceptorPolicy) -> Decision:
    """The acceptor's answer to an A-ASSOCIATE-RQ.

    The answer depends only on the request and the policy, and a modality sends the same
    request on every association. The protocol layer hands the same decoded request object
    for the same bytes (dul/protocol.py), so the answer to a request seen recently is reused:
    negotiating a storescu proposal of ~128 presentation contexts through pynetdicom costs
    ~5 ms (every UID validated as it is copied), which an association per instance pays
    each time. Nothing downstream changes a Decision or the request.
    """
    cached = policy._decisions.get(id(rq))
    if cached is not None and cached[0]() is rq:
        policy._decisions.move_to_end(id(rq))
        return cached[1]
    decision = _negotiate(rq, policy)
    # A weak reference: the protocol layer decides which requests stay in memory, and an id
    # whose request is gone answers nothing (the check above).
    policy._decisions[id(rq)] = (weakref.ref(rq), decision)
    while len(policy._decisions) > RECENT_REQUESTS:
        policy._decisions.popitem(last=False)
    return decision


def _negotiate(rq: A_ASSOCIATE, policy: AcceptorPolicy) -> Decision:
    called = (rq.called_ae_title or "").strip()
    calling = (rq.calling_ae_title or "").strip()
    if rq.application_context_name != APPLICATION_CONTEXT_NAME:
        return _reject(pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_USER_APPLICATION_CONTEXT,
                       f"application context {rq.application_context_name} not supported")
    if policy.check_called_ae and called != policy.ae_title:
        return _reject(pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_USER_CALLED_AE,
                       f"called AE title {called!r} is not {policy.ae_title!r}")
    if policy.require_known_callers and calling not in policy.known_callers:
        return _reject(pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_USER_CALLING_AE,
                       f"calling AE title {calling!r} is not a configured peer")

    peer_max = 0
    impl_uid = impl_version = ""
    roles: dict[str, tuple[bool | None, bool | None]] = {}
    async_window = False
    identity: UserIdentityNegotiation | None = None
    for item in rq.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max = item.maximum_length_received or 0
        elif isinstance(item, ImplementationClassUIDNotification):
            impl_uid = str(item.implementation_class_uid or "")
        elif isinstance(item, ImplementationVersionNameNotification):
            impl_version = str(item.implementation_version_name or "")
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        elif isinstance(item, AsynchronousOperationsWindowNegotiation):
            async_window = True
        elif isinstance(item, UserIdentityNegotiation):
            identity = item

    results, role_items = negotiate_as_acceptor(
        rq.presentation_context_definition_list, policy.offered(), roles or None
    )

    ac = A_ASSOCIATE()
    ac.application_context_name = APPLICATION_CONTEXT_NAME
    ac.called_ae_title = rq.called_ae_title
    ac.calling_ae_title = rq.calling_ae_title
    ac.result = 0x00
    ac.presentation_context_definition_results_list = results
    info: list = []
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = policy.max_pdu_length
    info.append(max_length)
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    info.append(impl)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    info.append(version)
    if async_window:
        # pacsd performs and invokes one operation at a time (PS3.7 D.3.3.3).
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        info.append(window)
    info.extend(role_items)
    identity_note = ""
    if identity is not None:
        identity_note = f"type {identity.user_identity_type}"
        if policy.user_identity == "accept" and identity.positive_response_requested:
            reply = UserIdentityNegotiation()
            reply.server_response = b""
            info.append(reply)
    ac.user_information = info

    accepted: list[AcceptedContext] = []
    rejected: list[tuple[int, str, str]] = []
    for cx in results:
        if cx.result == 0:
            accepted.append(AcceptedContext(
                cx.context_id, str(cx.abstract_syntax), str(cx.transfer_syntax[0]),
                as_scu=bool(cx.as_scu), as_scp=bool(cx.as_scp),
            ))
        else:
            rejected.append((cx.context_id, str(cx.abstract_syntax), RESULT_NAMES.get(cx.result, "?")))

    return Decision(
        True,
        A_ASSOCIATE_AC(ac).encode(),
        contexts=accepted,
        rejected_contexts=rejected,
        peer_max_pdu=peer_max,
        peer_implementation=impl_uid,
        peer_version=impl_version,
        user_identity=identity_note,
    )


# --- requestor side ------------------------------------------------------------------


@dataclass
class ProposedContext:
    abstract_syntax: str
    transfer_syntaxes: list[str]
    # Role selection to propose: (scu_role, scp_role), e.g. (False, True) for C-GET storage
    roles: tuple[bool, bool] | None = None


def build_request(
    calling_ae: str,
    called_ae: str,
    proposed: list[ProposedContext],
    max_pdu_length: int,
) -> tuple[bytes, list[PresentationContext]]:
    """Encode an A-ASSOCIATE-RQ; returns it with the contexts as proposed (for later)."""
    if not 1 <= len(proposed) <= 128:
        raise ValueError("an association proposes between 1 and 128 presentation contexts")
    rq = A_ASSOCIATE()
    rq.application_context_name = APPLICATION_CONTEXT_NAME
    rq.calling_ae_title = calling_ae
    rq.called_ae_title = called_ae
    contexts: list[PresentationContext] = []
    info: list = []
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu_length
    info.append(max_length)
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    info.append(impl)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    info.append(version)
    role_seen: set[str] = set()
    for index, p in enumerate(proposed):
        cx = PresentationContext()
        cx.context_id = 2 * index + 1
        cx.abstract_syntax = p.abstract_syntax
        for ts in p.transfer_syntaxes:
            cx.add_transfer_syntax(ts)
        if p.roles is not None:
            # accepted_as_requestor resolves the acceptor's reply against these
            cx.scu_role, cx.scp_role = p.roles
        contexts.append(cx)
        if p.roles is not None and p.abstract_syntax not in role_seen:
            role_seen.add(p.abstract_syntax)
            role = SCP_SCU_RoleSelectionNegotiation()
            role.sop_class_uid = p.abstract_syntax
            role.scu_role, role.scp_role = p.roles
            info.append(role)
    rq.presentation_context_definition_list = contexts
    rq.user_information = info
    return A_ASSOCIATE_RQ(rq).encode(), contexts


def accepted_as_requestor(
    proposed: list[PresentationContext], ac: A_ASSOCIATE
) -> tuple[list[AcceptedContext], int]:
    """Contexts the acceptor accepted, with our roles; and the acceptor's max PDU."""
    roles: dict[str, tuple[bool | None, bool | None]] = {}
    peer_max = 0
    for item in ac.user_information:
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        elif isinstance(item, MaximumLengthNotification):
            peer_max = item.maximum_length_received or 0
    results = negotiate_as_requestor(proposed, ac.presentation_context_definition_results_list, roles or None)
    accepted = [
        AcceptedContext(cx.context_id, str(cx.abstract_syntax), str(cx.transfer_syntax[0]),
                        as_scu=bool(cx.as_scu), as_scp=bool(cx.as_scp))
        for cx in results
        if cx.result == 0
    ]
    return accepted, peer_max
