"""The DICOM Upper Layer state machine against PS3.8 §9.2, one transition at a time.

TABLE_9_10 below is the state transition table of PS3.8 §9.2.3 (Table 9-10), written out
by hand cell by cell, in the standard's layout: one row per event Evt1..Evt19, one column
per state Sta1..Sta13, "" where the standard leaves the cell empty. It is deliberately not
derived from `machine.TRANSITIONS`.

ACTION_OUTCOME says, for each action of PS3.8 §9.2.2 (Table 9-6 association
establishment, 9-7 data transfer, 9-8 release, 9-9 abort), what the machine must do: the
next state and the effects, in the order the standard lists them.

Every one of the 19 x 13 cells is then checked: a fresh Machine is put in the cell's state,
fed the cell's event, and must end in the state and emit the effects that the cell's
action prescribes. An empty cell must raise InvalidTransition for a local primitive
(the service user asked for something the protocol forbids) and be ignored, with no
effects, for a PDU, transport or timer event (the peer or the network did it).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from pacsd.dul import pdu
from pacsd.dul.machine import (
    CloseTransport,
    ConnectTransport,
    Event,
    Indicate,
    InvalidTransition,
    Machine,
    Payload,
    Primitive,
    Send,
    StartArtim,
    StopArtim,
    State,
)

# --- PS3.8 Table 9-10, as printed ------------------------------------------------------

STATE_COLUMNS = (
    "Sta1", "Sta2", "Sta3", "Sta4", "Sta5", "Sta6", "Sta7",
    "Sta8", "Sta9", "Sta10", "Sta11", "Sta12", "Sta13",
)  # fmt: skip

# fmt: off
TABLE_9_10: dict[str, tuple[str, ...]] = {
    #          Sta1    Sta2    Sta3    Sta4    Sta5    Sta6    Sta7    Sta8    Sta9    Sta10    Sta11   Sta12   Sta13
    # A-ASSOCIATE request (local user)
    "Evt1":  ("AE-1", "",     "",     "",     "",     "",     "",     "",     "",     "",      "",     "",     ""),
    # Transport connect confirmation (local transport service)
    "Evt2":  ("",     "",     "",     "AE-2", "",     "",     "",     "",     "",     "",      "",     "",     ""),
    # A-ASSOCIATE-AC PDU (received on transport connection)
    "Evt3":  ("",     "AA-1", "AA-8", "",     "AE-3", "AA-8", "AA-8", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-6"),
    # A-ASSOCIATE-RJ PDU (received on transport connection)
    "Evt4":  ("",     "AA-1", "AA-8", "",     "AE-4", "AA-8", "AA-8", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-6"),
    # Transport connection indication (local transport service)
    "Evt5":  ("AE-5", "",     "",     "",     "",     "",     "",     "",     "",     "",      "",     "",     ""),
    # A-ASSOCIATE-RQ PDU (received on transport connection)
    "Evt6":  ("",     "AE-6", "AA-8", "",     "AA-8", "AA-8", "AA-8", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-7"),
    # A-ASSOCIATE response primitive (accept)
    "Evt7":  ("",     "",     "AE-7", "",     "",     "",     "",     "",     "",     "",      "",     "",     ""),
    # A-ASSOCIATE response primitive (reject)
    "Evt8":  ("",     "",     "AE-8", "",     "",     "",     "",     "",     "",     "",      "",     "",     ""),
    # P-DATA request primitive
    "Evt9":  ("",     "",     "",     "",     "",     "DT-1", "",     "AR-7", "",     "",      "",     "",     ""),
    # P-DATA-TF PDU
    "Evt10": ("",     "AA-1", "AA-8", "",     "AA-8", "DT-2", "AR-6", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-6"),
    # A-RELEASE request primitive
    "Evt11": ("",     "",     "",     "",     "",     "AR-1", "",     "",     "",     "",      "",     "",     ""),
    # A-RELEASE-RQ PDU (received on open transport connection)
    "Evt12": ("",     "AA-1", "AA-8", "",     "AA-8", "AR-2", "AR-8", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-6"),
    # A-RELEASE-RP PDU (received on transport connection)
    "Evt13": ("",     "AA-1", "AA-8", "",     "AA-8", "AA-8", "AR-3", "AA-8", "AA-8", "AR-10", "AR-3", "AA-8", "AA-6"),
    # A-RELEASE response primitive
    "Evt14": ("",     "",     "",     "",     "",     "",     "",     "AR-4", "AR-9", "",      "",     "AR-4", ""),
    # A-ABORT request primitive
    "Evt15": ("",     "",     "AA-1", "AA-2", "AA-1", "AA-1", "AA-1", "AA-1", "AA-1", "AA-1",  "AA-1", "AA-1", ""),
    # A-ABORT PDU (received on open transport connection)
    "Evt16": ("",     "AA-2", "AA-3", "",     "AA-3", "AA-3", "AA-3", "AA-3", "AA-3", "AA-3",  "AA-3", "AA-3", "AA-2"),
    # Transport connection closed indication (local transport service)
    "Evt17": ("",     "AA-5", "AA-4", "AA-4", "AA-4", "AA-4", "AA-4", "AA-4", "AA-4", "AA-4",  "AA-4", "AA-4", "AR-5"),
    # ARTIM timer expired (association reject/release timer)
    "Evt18": ("",     "AA-2", "",     "",     "",     "",     "",     "",     "",     "",      "",     "",     "AA-2"),
    # Unrecognized or invalid PDU received
    "Evt19": ("",     "AA-1", "AA-8", "",     "AA-8", "AA-8", "AA-8", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-7"),
}
# fmt: on

# Events that are primitives issued by the local service user: the user must not issue one
# where the table has no action for it.
LOCAL_PRIMITIVES = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


def event_of(name: str) -> Event:
    return Event(int(name.removeprefix("Evt")))


def state_of(name: str) -> State:
    return State(int(name.removeprefix("Sta")))


def cell(event_name: str, state_name: str) -> str:
    return TABLE_9_10[event_name][STATE_COLUMNS.index(state_name)]


# --- PDUs, written out byte by byte from PS3.8 §9.3 ------------------------------------

# Table 9-24 / 9-25: type, reserved, length 4, four reserved bytes.
A_RELEASE_RQ_BYTES = bytes([0x05, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00])
A_RELEASE_RP_BYTES = bytes([0x06, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00])
# Table 9-21: A-ASSOCIATE-RJ, result 1 (permanent), source 2 (ACSE), reason 2 (protocol version)
A_ASSOCIATE_RJ_BYTES = bytes([0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x01, 0x02, 0x02])

# Opaque stand-ins: the machine passes these through without looking inside.
RQ_BYTES = b"\x01\x00<an encoded A-ASSOCIATE-RQ>"
AC_BYTES = b"\x02\x00<an encoded A-ASSOCIATE-AC>"
RJ_BYTES = b"\x03\x00<an encoded A-ASSOCIATE-RJ>"
PDATA_OUT = b"\x04\x00<a P-DATA-TF to send>"
PDATA_IN = b"<a received P-DATA-TF body>"


class Token:
    """A decoded PDU the machine hands up untouched; compared by identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


RQ_PRIMITIVE = Token("received A-ASSOCIATE-RQ")
AC_PRIMITIVE = Token("received A-ASSOCIATE-AC")
RJ_RECEIVED = pdu.Reject(pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_USER_NO_REASON)
USER_ABORT = pdu.Abort(source=0, reason=0)  # Table 9-26 source 0: DICOM UL service-user
PROVIDER_ABORT = pdu.Abort(source=2, reason=1)  # source 2: service-provider, unrecognized PDU


# --- Matchers for effects the standard does not pin down to the byte -------------------


class AbortPDU:
    """Equal to a Send whose data is a well-formed A-ABORT PDU (PS3.8 Table 9-26).

    `source` None accepts either defined source (0 service-user, 2 service-provider).
    """

    def __init__(self, source: int | None = None) -> None:
        self.source = source

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Send) or not isinstance(other.data, (bytes, bytearray)):
            return False
        d = bytes(other.data)
        if len(d) != 10 or d[0] != 0x07 or d[1] != 0 or d[2:6] != b"\x00\x00\x00\x04":
            return False
        if d[6] != 0 or d[7] != 0:  # reserved
            return False
        source, reason = d[8], d[9]
        if source not in (0, 2) or (self.source is not None and source != self.source):
            return False
        if source == 0:
            return reason == 0  # "not significant", sent as 00H
        return reason in (0, 1, 2, 4, 5, 6)

    def __repr__(self) -> str:
        return f"Send(<A-ABORT PDU, source {'any' if self.source is None else self.source}>)"


class IndicationOf:
    """Equal to Indicate(primitive, <any payload>)."""

    def __init__(self, primitive: Primitive) -> None:
        self.primitive = primitive

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Indicate) and other.primitive is self.primitive

    def __repr__(self) -> str:
        return f"Indicate({self.primitive.name}, <any>)"


# --- What each action does: PS3.8 Tables 9-6 to 9-9 ------------------------------------

Outcome = tuple[State, list[Any]]
S = State
P = Primitive


def _ae_6(p: Payload, requestor: bool) -> Outcome:
    # Stop ARTIM; if the A-ASSOCIATE-RQ is acceptable to the service provider, issue the
    # A-ASSOCIATE indication (Sta3); otherwise send the A-ASSOCIATE-RJ and start ARTIM (Sta13).
    if p.acceptable:
        return S.STA3, [StopArtim(), Indicate(P.ASSOCIATE_INDICATION, p.data)]
    return S.STA13, [StopArtim(), Send(p.reject_pdu), StartArtim()]


def _aa_3(p: Payload, requestor: bool) -> Outcome:
    # Service-user initiated abort -> A-ABORT indication, else A-P-ABORT indication;
    # either way close the transport connection.
    user = p.data.source == 0
    primitive = P.ABORT_INDICATION if user else P.P_ABORT_INDICATION
    return S.STA1, [Indicate(primitive, p.data), CloseTransport()]


ACTION_OUTCOME: dict[str, Callable[[Payload, bool], Outcome]] = {
    # Table 9-6, association establishment
    "AE-1": lambda p, r: (S.STA4, [ConnectTransport()]),
    "AE-2": lambda p, r: (S.STA5, [Send(RQ_BYTES)]),  # the RQ given with Evt1
    "AE-3": lambda p, r: (S.STA6, [Indicate(P.ASSOCIATE_ACCEPTED, p.data)]),
    "AE-4": lambda p, r: (S.STA1, [Indicate(P.ASSOCIATE_REJECTED, p.data), CloseTransport()]),
    "AE-5": lambda p, r: (S.STA2, [StartArtim()]),
    "AE-6": _ae_6,
    "AE-7": lambda p, r: (S.STA6, [Send(p.data)]),
    "AE-8": lambda p, r: (S.STA13, [Send(p.data), StartArtim()]),
    # Table 9-7, data transfer
    "DT-1": lambda p, r: (S.STA6, [Send(p.data)]),
    "DT-2": lambda p, r: (S.STA6, [Indicate(P.P_DATA_INDICATION, p.data)]),
    # Table 9-8, association release
    "AR-1": lambda p, r: (S.STA7, [Send(A_RELEASE_RQ_BYTES)]),
    "AR-2": lambda p, r: (S.STA8, [IndicationOf(P.RELEASE_INDICATION)]),
    "AR-3": lambda p, r: (S.STA1, [IndicationOf(P.RELEASE_CONFIRMATION), CloseTransport()]),
    "AR-4": lambda p, r: (S.STA13, [Send(A_RELEASE_RP_BYTES), StartArtim()]),
    "AR-5": lambda p, r: (S.STA1, [StopArtim()]),
    "AR-6": lambda p, r: (S.STA7, [Indicate(P.P_DATA_INDICATION, p.data)]),
    "AR-7": lambda p, r: (S.STA8, [Send(p.data)]),
    "AR-8": lambda p, r: (S.STA9 if r else S.STA10, [IndicationOf(P.RELEASE_INDICATION)]),
    "AR-9": lambda p, r: (S.STA11, [Send(A_RELEASE_RP_BYTES)]),
    "AR-10": lambda p, r: (S.STA12, [IndicationOf(P.RELEASE_CONFIRMATION)]),
    # Table 9-9, association abort
    "AA-1": lambda p, r: (S.STA13, [AbortPDU(), StartArtim()]),  # (re)start ARTIM
    "AA-2": lambda p, r: (S.STA1, [StopArtim(), CloseTransport()]),
    "AA-3": _aa_3,
    "AA-4": lambda p, r: (S.STA1, [IndicationOf(P.P_ABORT_INDICATION)]),
    "AA-5": lambda p, r: (S.STA1, [StopArtim()]),
    "AA-6": lambda p, r: (S.STA13, []),  # ignore the PDU
    "AA-7": lambda p, r: (S.STA13, [AbortPDU()]),
    "AA-8": lambda p, r: (
        S.STA13,
        [AbortPDU(source=2), IndicationOf(P.P_ABORT_INDICATION), StartArtim()],
    ),
}


# --- Test plumbing ----------------------------------------------------------------------


def payload_for(event_name: str) -> Payload:
    """A realistic payload for the event.

    Events whose action may send an A-ABORT carry abort_source 0 (service-user): AA-8 must
    send a service-provider A-ABORT whatever the payload says.
    """
    user = {"abort_source": pdu.ABORT_SOURCE_USER, "abort_reason": 0}
    return {
        "Evt1": lambda: Payload(data=RQ_BYTES),
        "Evt3": lambda: Payload(data=AC_PRIMITIVE, **user),
        "Evt4": lambda: Payload(data=RJ_RECEIVED, **user),
        "Evt6": lambda: Payload(data=RQ_PRIMITIVE, acceptable=True, reject_pdu=A_ASSOCIATE_RJ_BYTES, **user),
        "Evt7": lambda: Payload(data=AC_BYTES),
        "Evt8": lambda: Payload(data=RJ_BYTES),
        "Evt9": lambda: Payload(data=PDATA_OUT),
        "Evt10": lambda: Payload(data=PDATA_IN, **user),
        "Evt16": lambda: Payload(data=USER_ABORT),
        "Evt19": lambda: Payload(
            abort_source=pdu.ABORT_SOURCE_PROVIDER, abort_reason=pdu.ABORT_REASON_UNRECOGNIZED_PDU
        ),
    }.get(event_name, lambda: Payload(**user))()


def machine_in(state: State, requestor: bool) -> Machine:
    m = Machine(is_requestor=requestor)
    m.state = state
    if state is State.STA4:
        # Sta4 is only reached through Evt1, which hands over the A-ASSOCIATE-RQ to send.
        m.pending_associate_rq = RQ_BYTES
    return m


ALL_CELLS = [(e, s) for e in TABLE_9_10 for s in STATE_COLUMNS]


# --- The table itself -------------------------------------------------------------------


def test_table_is_19_events_by_13_states() -> None:
    assert list(TABLE_9_10) == [f"Evt{n}" for n in range(1, 20)]
    assert all(len(row) == 13 for row in TABLE_9_10.values())
    assert len(ALL_CELLS) == 247


def test_every_action_in_the_table_is_defined_and_used() -> None:
    used = {a for row in TABLE_9_10.values() for a in row if a}
    assert used == set(ACTION_OUTCOME)


def test_machine_names_the_same_action_in_every_cell() -> None:
    mismatches = []
    for event_name, state_name in ALL_CELLS:
        m = machine_in(state_of(state_name), requestor=True)
        got = m.action_for(event_of(event_name)) or ""
        want = cell(event_name, state_name)
        if got != want:
            mismatches.append(f"{event_name}/{state_name}: machine {got or '-'}, standard {want or '-'}")
    assert not mismatches, "\n".join(mismatches)


# --- Every cell: next state and effects ---------------------------------------------------


@pytest.mark.parametrize(("event_name", "state_name"), ALL_CELLS, ids=[f"{e}-{s}" for e, s in ALL_CELLS])
def test_transition(event_name: str, state_name: str) -> None:
    event, state = event_of(event_name), state_of(state_name)
    action = cell(event_name, state_name)
    for requestor in (True, False):
        m = machine_in(state, requestor)
        p = payload_for(event_name)
        where = f"{event_name} in {state_name} ({'requestor' if requestor else 'acceptor'})"
        if not action and event_name in LOCAL_PRIMITIVES:
            with pytest.raises(InvalidTransition):
                m.handle(event, p)
            assert m.state is state, f"{where}: rejected primitive changed the state"
        elif not action:
            assert m.handle(event, p) == [], f"{where}: empty cell must be ignored"
            assert m.state is state, f"{where}: empty cell changed the state"
        else:
            want_state, want_effects = ACTION_OUTCOME[action](p, requestor)
            effects = m.handle(event, p)
            assert m.state is want_state, f"{where} -> {action}: next state"
            assert effects == want_effects, f"{where} -> {action}: effects"


# --- Branches of conditional actions that the cell sweep takes only one way ----------------


def test_ae6_unacceptable_rq_sends_the_reject_and_waits_for_close() -> None:
    m = machine_in(State.STA2, requestor=False)
    p = Payload(data=RQ_PRIMITIVE, acceptable=False, reject_pdu=A_ASSOCIATE_RJ_BYTES)
    effects = m.handle(Event.EVT6, p)
    assert m.state is State.STA13
    assert effects == [StopArtim(), Send(A_ASSOCIATE_RJ_BYTES), StartArtim()]
    assert (m.state, effects) == ACTION_OUTCOME["AE-6"](p, False)


AA_3_STATES = [s for s in STATE_COLUMNS if cell("Evt16", s) == "AA-3"]


@pytest.mark.parametrize("state_name", AA_3_STATES)
@pytest.mark.parametrize(
    ("abort", "primitive"),
    [(USER_ABORT, Primitive.ABORT_INDICATION), (PROVIDER_ABORT, Primitive.P_ABORT_INDICATION)],
    ids=["user-source", "provider-source"],
)
def test_aa3_indication_follows_abort_source(state_name: str, abort: pdu.Abort, primitive: Primitive) -> None:
    m = machine_in(state_of(state_name), requestor=True)
    effects = m.handle(Event.EVT16, Payload(data=abort))
    assert m.state is State.STA1
    assert effects == [Indicate(primitive, abort), CloseTransport()]


@pytest.mark.parametrize(("requestor", "next_state"), [(True, State.STA9), (False, State.STA10)])
def test_ar8_release_collision_side_depends_on_role(requestor: bool, next_state: State) -> None:
    m = machine_in(State.STA7, requestor)
    assert m.handle(Event.EVT12) == [Indicate(Primitive.RELEASE_INDICATION)]
    assert m.state is next_state


@pytest.mark.parametrize(
    "state_name", [s for s in STATE_COLUMNS if "AA-8" in {cell(e, s) for e in TABLE_9_10}]
)
def test_aa8_sends_a_service_provider_abort_whatever_the_payload_says(state_name: str) -> None:
    m = machine_in(state_of(state_name), requestor=False)
    payload = Payload(abort_source=pdu.ABORT_SOURCE_USER, abort_reason=0)
    effects = m.handle(Event.EVT19, payload)
    assert m.state is State.STA13
    assert effects[0] == AbortPDU(source=2)
    assert bytes(effects[0].data)[8] == 2


@pytest.mark.parametrize(
    ("event", "state"),
    [(Event.EVT15, State.STA6), (Event.EVT10, State.STA2)],
    ids=["Evt15-Sta6", "Evt10-Sta2"],
)
def test_aa1_abort_has_service_user_source_by_default(event: Event, state: State) -> None:
    m = machine_in(state, requestor=True)
    effects = m.handle(event, Payload())
    assert effects[0] == AbortPDU(source=0)


def test_rejected_associate_request_is_not_remembered() -> None:
    m = machine_in(State.STA6, requestor=True)
    with pytest.raises(InvalidTransition):
        m.handle(Event.EVT1, Payload(data=b"late RQ"))
    assert m.pending_associate_rq == b""
    assert m.state is State.STA6


# --- End-to-end sequences -----------------------------------------------------------------


def step(m: Machine, event: Event, payload: Payload | None, state: State, effects: list[Any]) -> None:
    got = m.handle(event, payload)
    assert m.state is state, f"{event.name}: expected {state.name}, machine is in {m.state.name}"
    assert got == effects, f"{event.name}"


def associated(requestor: bool) -> Machine:
    m = Machine(is_requestor=requestor)
    if requestor:
        step(m, Event.EVT1, Payload(data=RQ_BYTES), State.STA4, [ConnectTransport()])
        step(m, Event.EVT2, None, State.STA5, [Send(RQ_BYTES)])
        step(m, Event.EVT3, Payload(data=AC_PRIMITIVE), State.STA6,
             [Indicate(Primitive.ASSOCIATE_ACCEPTED, AC_PRIMITIVE)])  # fmt: skip
    else:
        step(m, Event.EVT5, None, State.STA2, [StartArtim()])
        step(m, Event.EVT6, Payload(data=RQ_PRIMITIVE), State.STA3,
             [StopArtim(), Indicate(Primitive.ASSOCIATE_INDICATION, RQ_PRIMITIVE)])  # fmt: skip
        step(m, Event.EVT7, Payload(data=AC_BYTES), State.STA6, [Send(AC_BYTES)])
    assert m.established
    return m


def test_requestor_association_setup_sends_the_rq_given_at_evt1() -> None:
    m = Machine(is_requestor=True)
    assert m.state is State.STA1
    assert not m.established
    step(m, Event.EVT1, Payload(data=RQ_BYTES), State.STA4, [ConnectTransport()])
    assert not m.established
    step(m, Event.EVT2, None, State.STA5, [Send(RQ_BYTES)])
    step(m, Event.EVT3, Payload(data=AC_PRIMITIVE), State.STA6,
         [Indicate(Primitive.ASSOCIATE_ACCEPTED, AC_PRIMITIVE)])  # fmt: skip
    assert m.established
    step(m, Event.EVT9, Payload(data=PDATA_OUT), State.STA6, [Send(PDATA_OUT)])
    step(m, Event.EVT10, Payload(data=PDATA_IN), State.STA6,
         [Indicate(Primitive.P_DATA_INDICATION, PDATA_IN)])  # fmt: skip


def test_requestor_association_rejected_by_peer() -> None:
    m = Machine(is_requestor=True)
    step(m, Event.EVT1, Payload(data=RQ_BYTES), State.STA4, [ConnectTransport()])
    step(m, Event.EVT2, None, State.STA5, [Send(RQ_BYTES)])
    step(m, Event.EVT4, Payload(data=RJ_RECEIVED), State.STA1,
         [Indicate(Primitive.ASSOCIATE_REJECTED, RJ_RECEIVED), CloseTransport()])  # fmt: skip


def test_acceptor_association_setup() -> None:
    m = associated(requestor=False)
    step(m, Event.EVT10, Payload(data=PDATA_IN), State.STA6,
         [Indicate(Primitive.P_DATA_INDICATION, PDATA_IN)])  # fmt: skip
    step(m, Event.EVT9, Payload(data=PDATA_OUT), State.STA6, [Send(PDATA_OUT)])


def test_acceptor_rejects_then_peer_closes() -> None:
    m = Machine(is_requestor=False)
    step(m, Event.EVT5, None, State.STA2, [StartArtim()])
    step(m, Event.EVT6, Payload(data=RQ_PRIMITIVE), State.STA3,
         [StopArtim(), Indicate(Primitive.ASSOCIATE_INDICATION, RQ_PRIMITIVE)])  # fmt: skip
    step(m, Event.EVT8, Payload(data=RJ_BYTES), State.STA13, [Send(RJ_BYTES), StartArtim()])
    step(m, Event.EVT17, None, State.STA1, [StopArtim()])


def test_normal_release_requestor_side() -> None:
    m = associated(requestor=True)
    step(m, Event.EVT11, None, State.STA7, [Send(A_RELEASE_RQ_BYTES)])
    # the peer may still be sending data before it answers
    step(m, Event.EVT10, Payload(data=PDATA_IN), State.STA7,
         [Indicate(Primitive.P_DATA_INDICATION, PDATA_IN)])  # fmt: skip
    step(m, Event.EVT13, None, State.STA1,
         [Indicate(Primitive.RELEASE_CONFIRMATION), CloseTransport()])  # fmt: skip


def test_normal_release_acceptor_side() -> None:
    m = associated(requestor=False)
    step(m, Event.EVT12, None, State.STA8, [Indicate(Primitive.RELEASE_INDICATION)])
    # the local user may still send data before it answers
    step(m, Event.EVT9, Payload(data=PDATA_OUT), State.STA8, [Send(PDATA_OUT)])
    step(m, Event.EVT14, None, State.STA13, [Send(A_RELEASE_RP_BYTES), StartArtim()])
    step(m, Event.EVT17, None, State.STA1, [StopArtim()])


def test_release_collision_requestor_side() -> None:
    m = associated(requestor=True)
    step(m, Event.EVT11, None, State.STA7, [Send(A_RELEASE_RQ_BYTES)])
    step(m, Event.EVT12, None, State.STA9, [Indicate(Primitive.RELEASE_INDICATION)])
    step(m, Event.EVT14, None, State.STA11, [Send(A_RELEASE_RP_BYTES)])
    step(m, Event.EVT13, None, State.STA1,
         [Indicate(Primitive.RELEASE_CONFIRMATION), CloseTransport()])  # fmt: skip


def test_release_collision_acceptor_side() -> None:
    m = associated(requestor=False)
    step(m, Event.EVT11, None, State.STA7, [Send(A_RELEASE_RQ_BYTES)])
    step(m, Event.EVT12, None, State.STA10, [Indicate(Primitive.RELEASE_INDICATION)])
    step(m, Event.EVT13, None, State.STA12, [Indicate(Primitive.RELEASE_CONFIRMATION)])
    step(m, Event.EVT14, None, State.STA13, [Send(A_RELEASE_RP_BYTES), StartArtim()])
    step(m, Event.EVT17, None, State.STA1, [StopArtim()])


def test_release_collision_both_ends_together() -> None:
    """Feed each machine the PDUs the other sends: both must end idle."""
    req, acc = associated(requestor=True), associated(requestor=False)
    (req_rq,) = req.handle(Event.EVT11)
    (acc_rq,) = acc.handle(Event.EVT11)
    assert req_rq == acc_rq == Send(A_RELEASE_RQ_BYTES)
    req.handle(Event.EVT12)  # acceptor's RQ reaches the requestor
    acc.handle(Event.EVT12)  # requestor's RQ reaches the acceptor
    assert (req.state, acc.state) == (State.STA9, State.STA10)
    assert req.handle(Event.EVT14) == [Send(A_RELEASE_RP_BYTES)]  # requestor answers first
    assert acc.handle(Event.EVT13) == [Indicate(Primitive.RELEASE_CONFIRMATION)]
    assert acc.handle(Event.EVT14) == [Send(A_RELEASE_RP_BYTES), StartArtim()]
    assert req.handle(Event.EVT13) == [Indicate(Primitive.RELEASE_CONFIRMATION), CloseTransport()]
    assert acc.handle(Event.EVT17) == [StopArtim()]
    assert (req.state, acc.state) == (State.STA1, State.STA1)


def test_artim_expires_before_any_associate_rq() -> None:
    m = Machine(is_requestor=False)
    step(m, Event.EVT5, None, State.STA2, [StartArtim()])
    step(m, Event.EVT18, None, State.STA1, [StopArtim(), CloseTransport()])
    # the close indication that follows lands in an empty cell and is ignored
    step(m, Event.EVT17, None, State.STA1, [])


def test_artim_expires_while_waiting_for_close() -> None:
    m = associated(requestor=False)
    step(m, Event.EVT12, None, State.STA8, [Indicate(Primitive.RELEASE_INDICATION)])
    step(m, Event.EVT14, None, State.STA13, [Send(A_RELEASE_RP_BYTES), StartArtim()])
    step(m, Event.EVT18, None, State.STA1, [StopArtim(), CloseTransport()])


def test_local_abort_during_data_transfer() -> None:
    m = associated(requestor=True)
    effects = m.handle(Event.EVT15, Payload(abort_source=pdu.ABORT_SOURCE_USER, abort_reason=0))
    assert m.state is State.STA13
    assert effects == [AbortPDU(source=0), StartArtim()]
    # a PDU still in flight is ignored, the peer's own abort closes the connection
    step(m, Event.EVT10, Payload(data=PDATA_IN), State.STA13, [])
    step(m, Event.EVT16, Payload(data=USER_ABORT), State.STA1, [StopArtim(), CloseTransport()])


def test_peer_abort_during_data_transfer() -> None:
    m = associated(requestor=False)
    step(m, Event.EVT16, Payload(data=USER_ABORT), State.STA1,
         [Indicate(Primitive.ABORT_INDICATION, USER_ABORT), CloseTransport()])  # fmt: skip


def test_invalid_pdu_during_data_transfer_aborts_as_provider() -> None:
    m = associated(requestor=False)
    effects = m.handle(
        Event.EVT19,
        Payload(abort_source=pdu.ABORT_SOURCE_PROVIDER, abort_reason=pdu.ABORT_REASON_UNRECOGNIZED_PDU),
    )
    assert m.state is State.STA13
    assert effects == [AbortPDU(source=2), IndicationOf(Primitive.P_ABORT_INDICATION), StartArtim()]
    step(m, Event.EVT19, Payload(), State.STA13, [AbortPDU()])  # AA-7
    step(m, Event.EVT17, None, State.STA1, [StopArtim()])


def test_transport_lost_during_data_transfer() -> None:
    m = associated(requestor=True)
    effects = m.handle(Event.EVT17)
    assert m.state is State.STA1
    assert effects == [IndicationOf(Primitive.P_ABORT_INDICATION)]
    with pytest.raises(InvalidTransition):
        m.handle(Event.EVT9, Payload(data=PDATA_OUT))
    assert m.state is State.STA1
