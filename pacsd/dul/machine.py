"""The DICOM Upper Layer state machine of PS3.8 §9.2, as data and without IO.

The machine is fed events (Evt1–Evt19 of PS3.8 Table 9-6) and answers with the effects the
IO layer must carry out (send these bytes, arm the ARTIM timer, close the transport, tell
the service user). It never touches a socket or a clock, so every transition of Table 9-10
can be tested by feeding it one event.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, Callable

from pacsd.dul import pdu


class State(IntEnum):
    """PS3.8 Table 9-1."""

    STA1 = 1  # Idle
    STA2 = 2  # Transport connection open, awaiting A-ASSOCIATE-RQ PDU
    STA3 = 3  # Awaiting local A-ASSOCIATE response primitive
    STA4 = 4  # Awaiting transport connection opening to complete
    STA5 = 5  # Awaiting A-ASSOCIATE-AC or -RJ PDU
    STA6 = 6  # Association established, ready for data transfer
    STA7 = 7  # Awaiting A-RELEASE-RP PDU
    STA8 = 8  # Awaiting local A-RELEASE response primitive
    STA9 = 9  # Release collision requestor side, awaiting A-RELEASE response
    STA10 = 10  # Release collision acceptor side, awaiting A-RELEASE-RP PDU
    STA11 = 11  # Release collision requestor side, awaiting A-RELEASE-RP PDU
    STA12 = 12  # Release collision acceptor side, awaiting A-RELEASE response
    STA13 = 13  # Awaiting transport connection close indication


class Event(IntEnum):
    """PS3.8 Table 9-10 (rows): the events of the upper-layer state machine."""

    EVT1 = 1  # A-ASSOCIATE request (local user)
    EVT2 = 2  # Transport connect confirmation (local transport)
    EVT3 = 3  # A-ASSOCIATE-AC PDU received
    EVT4 = 4  # A-ASSOCIATE-RJ PDU received
    EVT5 = 5  # Transport connection indication (local transport)
    EVT6 = 6  # A-ASSOCIATE-RQ PDU received
    EVT7 = 7  # A-ASSOCIATE response primitive (accept)
    EVT8 = 8  # A-ASSOCIATE response primitive (reject)
    EVT9 = 9  # P-DATA request primitive
    EVT10 = 10  # P-DATA-TF PDU received
    EVT11 = 11  # A-RELEASE request primitive
    EVT12 = 12  # A-RELEASE-RQ PDU received
    EVT13 = 13  # A-RELEASE-RP PDU received
    EVT14 = 14  # A-RELEASE response primitive
    EVT15 = 15  # A-ABORT request primitive
    EVT16 = 16  # A-ABORT PDU received
    EVT17 = 17  # Transport connection closed indication
    EVT18 = 18  # ARTIM timer expired
    EVT19 = 19  # Unrecognized or invalid PDU received


class Primitive(Enum):
    """Indications and confirmations the machine hands up to the service user."""

    ASSOCIATE_INDICATION = "A-ASSOCIATE indication"
    ASSOCIATE_ACCEPTED = "A-ASSOCIATE confirmation (accept)"
    ASSOCIATE_REJECTED = "A-ASSOCIATE confirmation (reject)"
    P_DATA_INDICATION = "P-DATA indication"
    RELEASE_INDICATION = "A-RELEASE indication"
    RELEASE_CONFIRMATION = "A-RELEASE confirmation"
    ABORT_INDICATION = "A-ABORT indication"
    P_ABORT_INDICATION = "A-P-ABORT indication"


# Effects: what the IO layer must do, in order.
@dataclass(frozen=True)
class ConnectTransport:
    pass


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class StartArtim:
    pass


@dataclass(frozen=True)
class StopArtim:
    pass


@dataclass(frozen=True)
class CloseTransport:
    pass


@dataclass(frozen=True)
class Indicate:
    primitive: Primitive
    payload: Any = None


Effect = ConnectTransport | Send | StartArtim | StopArtim | CloseTransport | Indicate


class InvalidTransition(Exception):
    """A local primitive was issued in a state where Table 9-10 does not allow it."""


@dataclass
class Payload:
    """What an event carries.

    data: an encoded PDU to send (Evt1, Evt7, Evt8, Evt9) or the decoded PDU received
    (Evt3, Evt4, Evt6, Evt10, Evt16). acceptable: for Evt6, whether the service provider
    can take the A-ASSOCIATE-RQ (protocol version); reject_pdu: the A-ASSOCIATE-RJ to send
    when it cannot. abort_source/abort_reason: the A-ABORT to send when the action sends one.

    AA-1 is "send A-ABORT (service-user source)" in PS3.8, and that is the default. When
    AA-1 answers a PDU the peer should not have sent (Sta2: anything but an
    A-ASSOCIATE-RQ), the IO layer passes the service-provider source with the reason, so
    the peer learns it made a protocol error (PS3.8 Table 9-26 reasons 1-6).
    """

    data: Any = None
    acceptable: bool = True
    reject_pdu: bytes = b""
    abort_source: int = pdu.ABORT_SOURCE_USER
    abort_reason: int = 0


Action = Callable[["Machine", Payload], tuple[State, list[Effect]]]


# --- Actions, PS3.8 Tables 9-6 to 9-9 -------------------------------------------------


def ae_1(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA4, [ConnectTransport()]


def ae_2(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    # Evt2 carries no PDU; the A-ASSOCIATE-RQ was given with Evt1 and kept.
    return State.STA5, [Send(m.pending_associate_rq)]


def ae_3(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA6, [Indicate(Primitive.ASSOCIATE_ACCEPTED, p.data)]


def ae_4(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA1, [Indicate(Primitive.ASSOCIATE_REJECTED, p.data), CloseTransport()]


def ae_5(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA2, [StartArtim()]


def ae_6(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    if p.acceptable:
        return State.STA3, [StopArtim(), Indicate(Primitive.ASSOCIATE_INDICATION, p.data)]
    return State.STA13, [StopArtim(), Send(p.reject_pdu), StartArtim()]


def ae_7(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA6, [Send(p.data)]


def ae_8(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA13, [Send(p.data), StartArtim()]


def dt_1(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA6, [Send(p.data)]


def dt_2(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA6, [Indicate(Primitive.P_DATA_INDICATION, p.data)]


def ar_1(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA7, [Send(pdu.A_RELEASE_RQ)]


def ar_2(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA8, [Indicate(Primitive.RELEASE_INDICATION)]


def ar_3(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA1, [Indicate(Primitive.RELEASE_CONFIRMATION), CloseTransport()]


def ar_4(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA13, [Send(pdu.A_RELEASE_RP), StartArtim()]


def ar_5(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA1, [StopArtim()]


def ar_6(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA7, [Indicate(Primitive.P_DATA_INDICATION, p.data)]


def ar_7(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA8, [Send(p.data)]


def ar_8(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    nxt = State.STA9 if m.is_requestor else State.STA10
    return nxt, [Indicate(Primitive.RELEASE_INDICATION)]


def ar_9(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA11, [Send(pdu.A_RELEASE_RP)]


def ar_10(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA12, [Indicate(Primitive.RELEASE_CONFIRMATION)]


def aa_1(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    # Restarting a running ARTIM is StartArtim again: the IO layer re-arms it.
    return State.STA13, [Send(pdu.encode_abort(p.abort_source, p.abort_reason)), StartArtim()]


def aa_2(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA1, [StopArtim(), CloseTransport()]


def aa_3(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    abort = p.data
    user_initiated = abort is not None and abort.source == pdu.ABORT_SOURCE_USER
    prim = Primitive.ABORT_INDICATION if user_initiated else Primitive.P_ABORT_INDICATION
    return State.STA1, [Indicate(prim, abort), CloseTransport()]


def aa_4(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA1, [Indicate(Primitive.P_ABORT_INDICATION, p.data)]


def aa_5(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA1, [StopArtim()]


def aa_6(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA13, []


def aa_7(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    return State.STA13, [Send(pdu.encode_abort(p.abort_source, p.abort_reason))]


def aa_8(m: Machine, p: Payload) -> tuple[State, list[Effect]]:
    abort = pdu.Abort(pdu.ABORT_SOURCE_PROVIDER, p.abort_reason)
    return State.STA13, [
        Send(pdu.encode_abort(abort.source, abort.reason)),
        Indicate(Primitive.P_ABORT_INDICATION, abort),
        StartArtim(),
    ]


ACTIONS: dict[str, Action] = {
    "AE-1": ae_1, "AE-2": ae_2, "AE-3": ae_3, "AE-4": ae_4,
    "AE-5": ae_5, "AE-6": ae_6, "AE-7": ae_7, "AE-8": ae_8,
    "DT-1": dt_1, "DT-2": dt_2,
    "AR-1": ar_1, "AR-2": ar_2, "AR-3": ar_3, "AR-4": ar_4, "AR-5": ar_5,
    "AR-6": ar_6, "AR-7": ar_7, "AR-8": ar_8, "AR-9": ar_9, "AR-10": ar_10,
    "AA-1": aa_1, "AA-2": aa_2, "AA-3": aa_3, "AA-4": aa_4,
    "AA-5": aa_5, "AA-6": aa_6, "AA-7": aa_7, "AA-8": aa_8,
}  # fmt: skip


def _row(**cells: str) -> dict[State, str]:
    return {State[f"STA{k[3:]}"]: v for k, v in cells.items()}


_STA6_TO_12 = range(6, 13)


def _span(action: str, states: range) -> dict[str, str]:
    return {f"sta{n}": action for n in states}


# PS3.8 Table 9-10: for each event, the action to take in each state. A state missing
# from an event's row is a cell the standard leaves empty (the event cannot happen there).
TRANSITIONS: dict[Event, dict[State, str]] = {
    Event.EVT1: _row(sta1="AE-1"),
    Event.EVT2: _row(sta4="AE-2"),
    Event.EVT3: _row(sta2="AA-1", sta3="AA-8", sta5="AE-3", **_span("AA-8", _STA6_TO_12), sta13="AA-6"),
    Event.EVT4: _row(sta2="AA-1", sta3="AA-8", sta5="AE-4", **_span("AA-8", _STA6_TO_12), sta13="AA-6"),
    Event.EVT5: _row(sta1="AE-5"),
    Event.EVT6: _row(sta2="AE-6", sta3="AA-8", sta5="AA-8", **_span("AA-8", _STA6_TO_12), sta13="AA-7"),
    Event.EVT7: _row(sta3="AE-7"),
    Event.EVT8: _row(sta3="AE-8"),
    Event.EVT9: _row(sta6="DT-1", sta8="AR-7"),
    Event.EVT10: _row(
        sta2="AA-1", sta3="AA-8", sta5="AA-8", sta6="DT-2", sta7="AR-6",
        **_span("AA-8", range(8, 13)), sta13="AA-6",
    ),
    Event.EVT11: _row(sta6="AR-1"),
    Event.EVT12: _row(
        sta2="AA-1", sta3="AA-8", sta5="AA-8", sta6="AR-2", sta7="AR-8",
        **_span("AA-8", range(8, 13)), sta13="AA-6",
    ),
    Event.EVT13: _row(
        sta2="AA-1", sta3="AA-8", sta5="AA-8", sta6="AA-8", sta7="AR-3", sta8="AA-8",
        sta9="AA-8", sta10="AR-10", sta11="AR-3", sta12="AA-8", sta13="AA-6",
    ),
    Event.EVT14: _row(sta8="AR-4", sta9="AR-9", sta12="AR-4"),
    Event.EVT15: _row(sta3="AA-1", sta4="AA-2", sta5="AA-1", **_span("AA-1", _STA6_TO_12)),
    Event.EVT16: _row(sta2="AA-2", sta3="AA-3", sta5="AA-3", **_span("AA-3", _STA6_TO_12), sta13="AA-2"),
    Event.EVT17: _row(
        sta2="AA-5", sta3="AA-4", sta4="AA-4", sta5="AA-4", **_span("AA-4", _STA6_TO_12), sta13="AR-5"
    ),
    Event.EVT18: _row(sta2="AA-2", sta13="AA-2"),
    Event.EVT19: _row(sta2="AA-1", sta3="AA-8", sta5="AA-8", **_span("AA-8", _STA6_TO_12), sta13="AA-7"),
}  # fmt: skip

# Events that come from the network or the transport: the peer decides when they happen,
# so an empty cell for them is the peer's protocol error, not ours.
PEER_EVENTS = frozenset(
    {Event.EVT2, Event.EVT3, Event.EVT4, Event.EVT5, Event.EVT6, Event.EVT10,
     Event.EVT12, Event.EVT13, Event.EVT16, Event.EVT17, Event.EVT18, Event.EVT19}
)  # fmt: skip


@dataclass
class Machine:
    """One association's upper-layer state. `is_requestor` decides AR-8's next state."""

    is_requestor: bool
    state: State = State.STA1
    pending_associate_rq: bytes = b""

    def action_for(self, event: Event) -> str | None:
        return TRANSITIONS[event].get(self.state)

    def handle(self, event: Event, payload: Payload | None = None) -> list[Effect]:
        """Apply `event`; return the effects in the order the IO layer must apply them."""
        payload = payload or Payload()
        name = self.action_for(event)
        if name is None:
            if event in PEER_EVENTS:
                # A cell Table 9-10 leaves empty for a peer event (a stale timer, a
                # transport event after close): nothing to do, stay where we are.
                return []
            raise InvalidTransition(f"{event.name} is not allowed in {self.state.name}")
        if event is Event.EVT1:
            self.pending_associate_rq = payload.data
        self.state, effects = ACTIONS[name](self, payload)
        return effects

    @property
    def established(self) -> bool:
        return self.state is State.STA6
