"""The index tables: patient → study → series → instance (SQLAlchemy Core).

Each level carries its C-FIND keys (PS3.4 C.6.1.1 / C.6.2.1 required, unique and the common
optional ones) as indexed columns, and all its attributes as DICOM JSON in `attrs`, so any
key can be returned without opening a blob. Counters are kept current by the index writer.
The schema is created and changed only through the Alembic revisions in pacsd/migrations.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _s(length: int) -> sa.String:
    return sa.String(length)


patients = sa.Table(
    "patients",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("patient_id", _s(64), nullable=False, index=True),
    sa.Column("issuer_of_patient_id", _s(64), nullable=False, server_default=""),
    sa.Column("patient_name", _s(324), nullable=False, server_default="", index=True),
    sa.Column("patient_birth_date", _s(8), nullable=False, server_default=""),
    sa.Column("patient_birth_time", _s(16), nullable=False, server_default=""),
    sa.Column("patient_sex", _s(16), nullable=False, server_default=""),
    sa.Column("num_studies", sa.Integer, nullable=False, server_default="0"),
    sa.Column("num_series", sa.Integer, nullable=False, server_default="0"),
    sa.Column("num_instances", sa.Integer, nullable=False, server_default="0"),
    sa.Column("attrs", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patients_identity"),
)

studies = sa.Table(
    "studies",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("patient_pk", sa.Integer, sa.ForeignKey("patients.pk"), nullable=False, index=True),
    sa.Column("study_instance_uid", _s(64), nullable=False, unique=True),
    sa.Column("study_date", _s(8), nullable=False, server_default="", index=True),
    sa.Column("study_time", _s(16), nullable=False, server_default=""),
    sa.Column("accession_number", _s(16), nullable=False, server_default="", index=True),
    sa.Column("study_id", _s(16), nullable=False, server_default=""),
    sa.Column("referring_physician_name", _s(324), nullable=False, server_default=""),
    sa.Column("study_description", _s(64), nullable=False, server_default=""),
    sa.Column("modalities_in_study", _s(256), nullable=False, server_default=""),
    sa.Column("sop_classes_in_study", sa.Text, nullable=False, server_default=""),
    sa.Column("num_series", sa.Integer, nullable=False, server_default="0"),
    sa.Column("num_instances", sa.Integer, nullable=False, server_default="0"),
    sa.Column("attrs", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

series = sa.Table(
    "series",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("study_pk", sa.Integer, sa.ForeignKey("studies.pk"), nullable=False, index=True),
    sa.Column("series_instance_uid", _s(64), nullable=False, unique=True),
    sa.Column("modality", _s(16), nullable=False, server_default="", index=True),
    sa.Column("series_number", sa.Integer, nullable=True),
    sa.Column("series_description", _s(64), nullable=False, server_default=""),
    sa.Column("series_date", _s(8), nullable=False, server_default=""),
    sa.Column("series_time", _s(16), nullable=False, server_default=""),
    sa.Column("body_part_examined", _s(16), nullable=False, server_default=""),
    sa.Column("performed_procedure_step_start_date", _s(8), nullable=False, server_default=""),
    sa.Column("performed_procedure_step_start_time", _s(16), nullable=False, server_default=""),
    sa.Column("num_instances", sa.Integer, nullable=False, server_default="0"),
    sa.Column("attrs", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("series_pk", sa.Integer, sa.ForeignKey("series.pk"), nullable=False, index=True),
    sa.Column("sop_instance_uid", _s(64), nullable=False, unique=True),
    sa.Column("sop_class_uid", _s(64), nullable=False, index=True),
    sa.Column("instance_number", sa.Integer, nullable=True),
    sa.Column("content_date", _s(8), nullable=False, server_default=""),
    sa.Column("content_time", _s(16), nullable=False, server_default=""),
    sa.Column("number_of_frames", sa.Integer, nullable=True),
    sa.Column("transfer_syntax_uid", _s(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", _s(64), nullable=False),
    sa.Column("blob_key", _s(128), nullable=False, unique=True),
    # Where the data set starts in the blob (after preamble and file meta), so retrieval
    # can send the stored bytes without parsing the file again.
    sa.Column("dataset_offset", sa.Integer, nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("calling_ae", _s(16), nullable=False, server_default=""),
    sa.Column("attrs", sa.Text, nullable=False),
)

# Storage Commitment (PS3.4 Annex J): a transaction is persisted before its N-ACTION-RSP,
# and stays until its N-EVENT-REPORT was delivered or it expired.
commitment_transactions = sa.Table(
    "commitment_transactions",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("transaction_uid", _s(64), nullable=False, unique=True),
    sa.Column("calling_ae", _s(16), nullable=False),
    # JSON list of [SOP Class UID, SOP Instance UID] as requested
    sa.Column("requested", sa.Text, nullable=False),
    # JSON of the report once computed: {"success": [[cls, inst]], "failed": [[cls, inst, reason]]}
    sa.Column("result", sa.Text, nullable=True),
    # pending (not yet reported) | delivered | expired
    sa.Column("state", _s(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("last_error", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# Instance Availability Notification (PS3.4 Annex R) to each peer with ian = true: one row per
# (study, peer) while an IAN is owed; a later instance of the study makes it due again.
ian_outbox = sa.Table(
    "ian_outbox",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("study_instance_uid", _s(64), nullable=False),
    sa.Column("peer_ae", _s(16), nullable=False),
    # pending | delivered | expired
    sa.Column("state", _s(16), nullable=False, index=True),
    # the study must be quiet until then ([ian] study_quiet_seconds after its last instance)
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_error", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("study_instance_uid", "peer_ae", name="uq_ian_outbox_study_peer"),
)
