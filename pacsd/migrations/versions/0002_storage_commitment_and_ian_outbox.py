"""storage commitment and IAN outbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('commitment_transactions',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('transaction_uid', sa.String(length=64), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('requested', sa.Text(), nullable=False),
    sa.Column('result', sa.Text(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_commitment_transactions')),
    sa.UniqueConstraint('transaction_uid', name=op.f('uq_commitment_transactions_transaction_uid'))
    )
    with op.batch_alter_table('commitment_transactions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_commitment_transactions_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_commitment_transactions_state'), ['state'], unique=False)

    op.create_table('ian_outbox',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('peer_ae', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_ian_outbox')),
    sa.UniqueConstraint('study_instance_uid', 'peer_ae', name='uq_ian_outbox_study_peer')
    )
    with op.batch_alter_table('ian_outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ian_outbox_due_at'), ['due_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_ian_outbox_state'), ['state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('ian_outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ian_outbox_state'))
        batch_op.drop_index(batch_op.f('ix_ian_outbox_due_at'))

    op.drop_table('ian_outbox')
    with op.batch_alter_table('commitment_transactions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_commitment_transactions_state'))
        batch_op.drop_index(batch_op.f('ix_commitment_transactions_next_attempt_at'))

    op.drop_table('commitment_transactions')
