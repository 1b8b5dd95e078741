"""A-ASSOCIATE negotiation (PS3.7 Annex D, PS3.8 §7.1) against pynetdicom-decoded PDUs."""

from __future__ import annotations

import dataclasses

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)

from pacsd import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsd.dul import pdu
from pacsd.dul.negotiation import (
    APPLICATION_CONTEXT_NAME,
    AcceptedContext,
    AcceptorPolicy,
    ProposedContext,
    accepted_as_requestor,
    build_request,
    negotiate,
)

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _policy(**changes) -> AcceptorPolicy:
    policy = AcceptorPolicy(
        ae_title="PACSD",
        check_called_ae=True,
        require_known_callers=False,
        known_callers=frozenset(),
        supported={VERIFICATION: [EXPLICIT, IMPLICIT]},
        max_pdu_length=16384,
    )
    return dataclasses.replace(policy, **changes)


def _request(
    proposed: list[ProposedContext] | None = None,
    *,
    calling: str = "STORESCU",
    called: str = "PACSD",
    max_pdu: int = 32768,
    extra_user_info: list = (),
):
    """The A-ASSOCIATE primitive the acceptor sees, taken off encoded bytes, and the
    contexts as proposed."""
    proposed = proposed or [ProposedContext(VERIFICATION, [IMPLICIT, EXPLICIT])]
    raw, contexts = build_request(calling, called, proposed, max_pdu)
    if extra_user_info:
        decoded = A_ASSOCIATE_RQ()
        decoded.decode(raw)
        primitive = decoded.to_primitive()
        primitive.user_information = list(primitive.user_information) + list(extra_user_info)
        raw = A_ASSOCIATE_RQ(primitive).encode()
    pdu.check_associate_items(raw[6:], pdu.A_ASSOCIATE_RQ_TYPE)
    rq = A_ASSOCIATE_RQ()
    rq.decode(raw)
    return rq.to_primitive(), contexts


def _ac(answer: bytes):
    assert answer[0] == pdu.A_ASSOCIATE_AC_TYPE
    pdu.check_associate_items(answer[6:], pdu.A_ASSOCIATE_AC_TYPE)
    ac = A_ASSOCIATE_AC()
    ac.decode(answer)
    return ac.to_primitive()


def _of_type(primitive, cls) -> list:
    return [item for item in primitive.user_information if isinstance(item, cls)]


def _results(ac) -> dict[int, tuple[int, str]]:
    return {
        cx.context_id: (cx.result, str(cx.transfer_syntax[0]) if cx.transfer_syntax else None)
        for cx in ac.presentation_context_definition_results_list
    }


# --- build_request ------------------------------------------------------------------


def test_build_request_encodes_what_was_asked():
    rq, contexts = _request(
        [ProposedContext(VERIFICATION, [IMPLICIT]), ProposedContext(CT_IMAGE, [EXPLICIT, IMPLICIT])],
        calling="MODALITY", called="PACSD", max_pdu=12345,
    )
    assert rq.calling_ae_title == "MODALITY"
    assert rq.called_ae_title == "PACSD"
    assert rq.application_context_name == APPLICATION_CONTEXT_NAME
    proposed = rq.presentation_context_definition_list
    assert [(cx.context_id, cx.abstract_syntax, cx.transfer_syntax) for cx in proposed] == [
        (1, VERIFICATION, [IMPLICIT]),
        (3, CT_IMAGE, [EXPLICIT, IMPLICIT]),
    ]
    assert [cx.context_id for cx in contexts] == [1, 3]
    (max_length,) = _of_type(rq, MaximumLengthNotification)
    assert max_length.maximum_length_received == 12345
    (impl,) = _of_type(rq, ImplementationClassUIDNotification)
    assert impl.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    (version,) = _of_type(rq, ImplementationVersionNameNotification)
    assert version.implementation_version_name == IMPLEMENTATION_VERSION_NAME
    assert _of_type(rq, SCP_SCU_RoleSelectionNegotiation) == []


def test_build_request_one_role_item_per_sop_class():
    rq, _ = _request([
        ProposedContext(CT_IMAGE, [EXPLICIT], roles=(False, True)),
        ProposedContext(CT_IMAGE, [IMPLICIT], roles=(False, True)),
        ProposedContext(MR_IMAGE, [IMPLICIT], roles=(True, True)),
    ])
    roles = {r.sop_class_uid: (r.scu_role, r.scp_role) for r in _of_type(rq, SCP_SCU_RoleSelectionNegotiation)}
    assert roles == {CT_IMAGE: (False, True), MR_IMAGE: (True, True)}
    assert len(_of_type(rq, SCP_SCU_RoleSelectionNegotiation)) == 2


@pytest.mark.parametrize("count", [0, 129])
def test_build_request_context_count_limits(count):
    with pytest.raises(ValueError):
        build_request("A", "B", [ProposedContext(VERIFICATION, [IMPLICIT])] * count, 16384)


def test_build_request_128_contexts_use_odd_ids_up_to_255():
    raw, contexts = build_request("A", "B", [ProposedContext(VERIFICATION, [IMPLICIT])] * 128, 16384)
    assert [cx.context_id for cx in contexts] == list(range(1, 256, 2))
    pdu.check_associate_items(raw[6:], pdu.A_ASSOCIATE_RQ_TYPE)


# --- accept / reject ----------------------------------------------------------------


def test_accept_verification():
    rq, _ = _request(max_pdu=32768)
    decision = negotiate(rq, _policy())
    assert decision.accepted
    assert decision.reject is None
    assert decision.contexts == [AcceptedContext(1, VERIFICATION, EXPLICIT, as_scu=False, as_scp=True)]
    assert decision.rejected_contexts == []
    assert decision.peer_max_pdu == 32768
    assert decision.peer_implementation == IMPLEMENTATION_CLASS_UID
    assert decision.peer_version == IMPLEMENTATION_VERSION_NAME
    assert decision.user_identity == ""


def test_ac_carries_our_max_pdu_and_implementation():
    rq, _ = _request(calling="STORESCU", called="PACSD", max_pdu=65536)
    ac = _ac(negotiate(rq, _policy(max_pdu_length=16384)).answer)
    assert ac.result == 0
    assert ac.application_context_name == APPLICATION_CONTEXT_NAME
    assert ac.called_ae_title == "PACSD"
    assert ac.calling_ae_title == "STORESCU"
    (max_length,) = _of_type(ac, MaximumLengthNotification)
    assert max_length.maximum_length_received == 16384
    (impl,) = _of_type(ac, ImplementationClassUIDNotification)
    assert impl.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    (version,) = _of_type(ac, ImplementationVersionNameNotification)
    assert version.implementation_version_name == IMPLEMENTATION_VERSION_NAME
    assert _of_type(ac, AsynchronousOperationsWindowNegotiation) == []
    assert _of_type(ac, UserIdentityNegotiation) == []
    assert _of_type(ac, SCP_SCU_RoleSelectionNegotiation) == []


def test_called_ae_mismatch_is_rejected():
    rq, _ = _request(called="OTHER")
    decision = negotiate(rq, _policy())
    assert not decision.accepted
    assert decision.reject == pdu.Reject(1, 1, 7)
    assert decision.answer == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x07"
    assert decision.contexts == []
    assert "OTHER" in decision.reason
    # AE titles are case sensitive
    rq, _ = _request(called="pacsd")
    assert negotiate(rq, _policy()).reject == pdu.Reject(1, 1, 7)


def test_called_ae_not_checked_when_disabled():
    rq, _ = _request(called="OTHER")
    decision = negotiate(rq, _policy(check_called_ae=False))
    assert decision.accepted and len(decision.contexts) == 1


def test_unknown_caller_is_rejected_when_required():
    rq, _ = _request(calling="STRANGER")
    policy = _policy(require_known_callers=True, known_callers=frozenset({"CT1", "VIEWER"}))
    decision = negotiate(rq, policy)
    assert not decision.accepted
    assert decision.reject == pdu.Reject(1, 1, 3)
    assert decision.answer == pdu.encode_reject(1, 1, 3)
    # a configured caller gets in; unknown callers get in when not required
    rq, _ = _request(calling="VIEWER")
    assert negotiate(rq, policy).accepted
    rq, _ = _request(calling="STRANGER")
    assert negotiate(rq, _policy(known_callers=frozenset({"CT1"}))).accepted


def test_wrong_application_context_is_rejected():
    rq, _ = _request()
    rq.application_context_name = "1.2.840.10008.3.1.1.2"
    decision = negotiate(rq, _policy())
    assert not decision.accepted
    assert decision.reject == pdu.Reject(1, 1, 2)
    assert decision.answer == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x02"


def test_acceptor_transfer_syntax_preference_wins():
    rq, _ = _request([ProposedContext(VERIFICATION, [IMPLICIT, EXPLICIT])])
    decision = negotiate(rq, _policy(supported={VERIFICATION: [EXPLICIT, IMPLICIT]}))
    assert [cx.transfer_syntax for cx in decision.contexts] == [EXPLICIT]
    assert _results(_ac(decision.answer)) == {1: (0, EXPLICIT)}
    # ...and the other way round
    rq, _ = _request([ProposedContext(VERIFICATION, [EXPLICIT, IMPLICIT])])
    decision = negotiate(rq, _policy(supported={VERIFICATION: [IMPLICIT, EXPLICIT]}))
    assert [cx.transfer_syntax for cx in decision.contexts] == [IMPLICIT]


def test_unsupported_abstract_syntax():
    rq, _ = _request([
        ProposedContext(VERIFICATION, [IMPLICIT]),
        ProposedContext(CT_IMAGE, [IMPLICIT]),
    ])
    decision = negotiate(rq, _policy())
    assert decision.accepted
    assert [cx.context_id for cx in decision.contexts] == [1]
    assert decision.rejected_contexts == [(3, CT_IMAGE, "abstract-syntax-not-supported")]
    results = _results(_ac(decision.answer))
    assert results[1] == (0, IMPLICIT)
    assert results[3][0] == 3


def test_unsupported_transfer_syntax_only():
    rq, _ = _request([ProposedContext(VERIFICATION, [JPEG_BASELINE])])
    decision = negotiate(rq, _policy())
    assert decision.contexts == []
    assert decision.rejected_contexts == [(1, VERIFICATION, "transfer-syntaxes-not-supported")]
    assert _results(_ac(decision.answer))[1][0] == 4


def test_async_operations_window_is_answered_1_1():
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    rq, _ = _request(extra_user_info=[window])
    (proposed,) = _of_type(rq, AsynchronousOperationsWindowNegotiation)
    assert proposed.maximum_number_operations_invoked == 5
    ac = _ac(negotiate(rq, _policy()).answer)
    (answer,) = _of_type(ac, AsynchronousOperationsWindowNegotiation)
    assert answer.maximum_number_operations_invoked == 1
    assert answer.maximum_number_operations_performed == 1


def _identity(positive: bool) -> UserIdentityNegotiation:
    item = UserIdentityNegotiation()
    item.user_identity_type = 2
    item.positive_response_requested = positive
    item.primary_field = b"alice"
    item.secondary_field = b"secret"
    return item


@pytest.mark.parametrize(
    ("setting", "positive", "answered"),
    [
        ("accept", True, True),
        ("accept", False, False),
        ("ignore", True, False),
        ("ignore", False, False),
    ],
)
def test_user_identity_response(setting, positive, answered):
    rq, _ = _request(extra_user_info=[_identity(positive)])
    (proposed,) = _of_type(rq, UserIdentityNegotiation)
    assert proposed.positive_response_requested is positive
    decision = negotiate(rq, _policy(user_identity=setting))
    assert decision.accepted
    assert decision.user_identity == "type 2"
    replies = _of_type(_ac(decision.answer), UserIdentityNegotiation)
    assert len(replies) == (1 if answered else 0)
    if answered:
        assert replies[0].server_response == b""


def test_role_selection_answered_per_policy():
    rq, _ = _request([
        ProposedContext(VERIFICATION, [IMPLICIT]),
        ProposedContext(CT_IMAGE, [EXPLICIT], roles=(False, True)),
        ProposedContext(MR_IMAGE, [EXPLICIT], roles=(False, True)),
    ])
    policy = _policy(
        supported={VERIFICATION: [IMPLICIT], CT_IMAGE: [EXPLICIT], MR_IMAGE: [EXPLICIT]},
        roles={CT_IMAGE: (False, True)},  # MR: no policy, so no role reply
    )
    decision = negotiate(rq, policy)
    by_uid = {cx.abstract_syntax: cx for cx in decision.contexts}
    # CT: the requestor is SCP, so pacsd (acceptor) acts as SCU, as for C-GET sub-operations
    assert (by_uid[CT_IMAGE].as_scu, by_uid[CT_IMAGE].as_scp) == (True, False)
    # MR and Verification: default roles, pacsd is SCP
    assert (by_uid[MR_IMAGE].as_scu, by_uid[MR_IMAGE].as_scp) == (False, True)
    assert (by_uid[VERIFICATION].as_scu, by_uid[VERIFICATION].as_scp) == (False, True)
    ac = _ac(decision.answer)
    roles = {str(r.sop_class_uid): (r.scu_role, r.scp_role) for r in _of_type(ac, SCP_SCU_RoleSelectionNegotiation)}
    assert roles == {CT_IMAGE: (False, True)}


def test_role_selection_cannot_grant_what_was_not_proposed():
    rq, _ = _request([ProposedContext(CT_IMAGE, [EXPLICIT], roles=(False, True))])
    policy = _policy(supported={CT_IMAGE: [EXPLICIT]}, roles={CT_IMAGE: (True, True)})
    decision = negotiate(rq, policy)
    (role,) = _of_type(_ac(decision.answer), SCP_SCU_RoleSelectionNegotiation)
    assert (role.scu_role, role.scp_role) == (False, True)
    (cx,) = decision.contexts
    assert (cx.as_scu, cx.as_scp) == (True, False)


# --- requestor side -----------------------------------------------------------------


def test_accepted_as_requestor():
    rq, proposed = _request(
        [
            ProposedContext(VERIFICATION, [IMPLICIT, EXPLICIT]),
            ProposedContext(CT_IMAGE, [EXPLICIT]),
            ProposedContext(MR_IMAGE, [JPEG_BASELINE]),
        ],
        max_pdu=65536,
    )
    policy = _policy(supported={VERIFICATION: [EXPLICIT, IMPLICIT], MR_IMAGE: [EXPLICIT]}, max_pdu_length=20000)
    ac = _ac(negotiate(rq, policy).answer)
    accepted, peer_max = accepted_as_requestor(proposed, ac)
    assert peer_max == 20000
    assert accepted == [AcceptedContext(1, VERIFICATION, EXPLICIT, as_scu=True, as_scp=False)]


def test_accepted_as_requestor_with_roles():
    rq, proposed = _request([
        ProposedContext(VERIFICATION, [IMPLICIT]),
        ProposedContext(CT_IMAGE, [EXPLICIT], roles=(False, True)),
    ])
    policy = _policy(
        supported={VERIFICATION: [IMPLICIT], CT_IMAGE: [EXPLICIT]},
        roles={CT_IMAGE: (False, True)},
    )
    ac = _ac(negotiate(rq, policy).answer)
    accepted, peer_max = accepted_as_requestor(proposed, ac)
    assert peer_max == 16384
    assert accepted == [
        AcceptedContext(1, VERIFICATION, IMPLICIT, as_scu=True, as_scp=False),
        AcceptedContext(3, CT_IMAGE, EXPLICIT, as_scu=False, as_scp=True),
    ]


def test_requestor_roles_fall_back_to_scu_when_the_acceptor_ignores_them():
    rq, proposed = _request([ProposedContext(CT_IMAGE, [EXPLICIT], roles=(False, True))])
    decision = negotiate(rq, _policy(supported={CT_IMAGE: [EXPLICIT]}))  # no roles policy
    ac = _ac(decision.answer)
    assert _of_type(ac, SCP_SCU_RoleSelectionNegotiation) == []
    accepted, _ = accepted_as_requestor(proposed, ac)
    assert accepted == [AcceptedContext(1, CT_IMAGE, EXPLICIT, as_scu=True, as_scp=False)]


# -- the same request again -----------------------------------------------------------------


def test_a_request_seen_again_gets_the_same_answer_without_negotiating_again(monkeypatch):
    from pacsd.dul import negotiation

    policy = _policy()
    rq, _ = _request()
    first = negotiate(rq, policy)
    assert first.accepted

    def must_not_run(*args):
        raise AssertionError("negotiated again")

    monkeypatch.setattr(negotiation, "_negotiate", must_not_run)
    assert negotiate(rq, policy) is first
    monkeypatch.undo()
    # Another request with the same content: its own answer, byte for byte the same.
    again, _ = _request()
    assert again is not rq
    answer = negotiate(again, policy)
    assert answer is not first and answer.answer == first.answer


def test_the_answer_follows_the_request_not_only_its_contexts():
    policy = _policy(require_known_callers=True, known_callers=frozenset({"CT1"}))
    known, _ = _request(calling="CT1")
    stranger, _ = _request(calling="STRANGER")
    assert negotiate(known, policy).accepted
    refused = negotiate(stranger, policy)
    assert not refused.accepted and refused.reject.reason == pdu.RJ_USER_CALLING_AE
    assert negotiate(known, policy).accepted  # each request keeps its own answer


def test_only_recent_requests_are_kept():
    from pacsd.dul.negotiation import RECENT_REQUESTS

    policy = _policy()
    first, _ = _request()
    answer = negotiate(first, policy)
    others = [_request(calling=f"SCU{n}")[0] for n in range(RECENT_REQUESTS)]  # kept alive
    for rq in others:
        negotiate(rq, policy)
    assert len(policy._decisions) == RECENT_REQUESTS
    assert negotiate(first, policy) is not answer  # forgotten, negotiated afresh


async def test_the_same_request_bytes_are_decoded_once(monkeypatch):
    """The protocol layer keeps recently decoded A-ASSOCIATE-RQs by their bytes, so a
    repeated request reaches negotiate() as the same object (and its answer is reused)."""
    from pacsd.dul import protocol

    seen = []
    ulp = protocol.UpperLayerProtocol(None, is_requestor=False, max_pdata_length=16384,
                                      artim_timeout=5, network_timeout=5)
    monkeypatch.setattr(ulp, "_peer_pdu", lambda event, payload: seen.append(payload.data))
    raw, _ = build_request("SCU", "PACSD", [ProposedContext(CT_IMAGE, [EXPLICIT])], 16384)
    other, _ = build_request("OTHER", "PACSD", [ProposedContext(CT_IMAGE, [EXPLICIT])], 16384)
    for request in (raw, raw, other, raw):
        ulp._associate_rq(memoryview(request[6:]))
    assert seen[0] is seen[1] is seen[3]
    assert seen[2] is not seen[0] and seen[2].calling_ae_title.strip() == "OTHER"


async def test_large_requests_are_not_kept(monkeypatch):
    """Only requests up to CACHEABLE_REQUEST_BYTES are remembered: a peer cannot make pacsd
    hold its megabyte-sized requests."""
    from pacsd.dul import protocol
    from pacsd.dul.negotiation import CACHEABLE_REQUEST_BYTES

    seen = []
    ulp = protocol.UpperLayerProtocol(None, is_requestor=False, max_pdata_length=16384,
                                      artim_timeout=5, network_timeout=5)
    monkeypatch.setattr(ulp, "_peer_pdu", lambda event, payload: seen.append(payload.data))
    syntaxes = [f"1.2.840.10008.1.2.4.{n}" for n in range(50, 80)]
    proposed = [ProposedContext(f"1.2.840.10008.5.1.4.1.1.{n}", syntaxes) for n in range(1, 101)]
    raw, _ = build_request("SCU", "PACSD", proposed, 16384)
    assert len(raw) > CACHEABLE_REQUEST_BYTES
    for _ in range(2):
        ulp._associate_rq(memoryview(raw[6:]))
    assert seen[0] is not seen[1]
